"""``"auto"`` for a layer whose best kernel depends on the tokens per call: a kernel that sends
each call to the kernel the dispatcher chose for its token count (``dispatch.plan``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .kernel import FFFKernel

if TYPE_CHECKING:
    from .dispatch import Choice


class SplitByTokens(FFFKernel):
    """A kernel that hands each call to the kernel of the :class:`Choice` covering its token
    count; ``label`` prefixes its name (``auto(...)``, ``auto-train(...)``)."""

    def __init__(self, choices: list[Choice], kernels: dict[str, FFFKernel], label: str):
        self.choices = choices
        self._kernels = [(c.min_tokens, kernels[c.kernel]) for c in choices]
        first = kernels[choices[0].kernel]
        self.name = f"{label}(" + ", ".join(f"{c.kernel}: {c.tokens}" for c in choices) + ")"
        self.description = "; ".join(c.reason for c in choices)
        self.devices, self.dtypes = first.devices, first.dtypes

    def kernel_for(self, tokens: int) -> FFFKernel:
        """The kernel a call of ``tokens`` tokens runs on."""
        chosen = self._kernels[0][1]
        for min_tokens, kernel in self._kernels:
            if tokens >= min_tokens:
                chosen = kernel
        return chosen


class TokenSplit(SplitByTokens):
    """``"auto"`` for a layer whose best kernel depends on the tokens per call: each call runs
    on the kernel of the :class:`Choice` covering its token count (packed for each)."""

    trains = False

    def __init__(self, choices: list[Choice], kernels: dict[str, FFFKernel]):
        super().__init__(choices, kernels, "auto")
        self.weight_formats = kernels[choices[0].kernel].weight_formats

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        return {k.name: k.pack(w_in, b_in, w_out, n_trees, depth, weight_format)
                for _, k in self._kernels}

    def forward(self, x: torch.Tensor, packed: Any, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(T, d)`` on the kernel chosen for ``T`` tokens."""
        kernel = self.kernel_for(x.shape[0])
        return kernel.forward(x, packed[kernel.name], n_trees, depth, return_nodes)
