"""Native CPU FFF kernel (placeholder until the kernel lands)."""

from __future__ import annotations

import torch

from ..kernel import FFFKernel


class NativeCPUKernel(FFFKernel):
    """AVX-512/AVX2 C++ kernel built on first use."""

    name = "native"
    description = "native C++ CPU kernel"
    devices = ("cpu",)
    dtypes = (torch.float32,)

    def extra_reason(self, device: torch.device) -> str | None:  # noqa: D102
        return "not built in this version"

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        raise NotImplementedError

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        raise NotImplementedError
