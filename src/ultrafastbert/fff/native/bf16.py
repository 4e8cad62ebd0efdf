"""The native CPU FFF kernel in bfloat16 end to end (``fff_cpu_bf16.cpp``; docs/precision.md).

Inputs, weights and outputs are bfloat16; logits, activations and output sums are fp32. The
routing dot products use AVX512-BF16 (``_mm512_dpbf16_ps``) where the CPU has it, else widen
bf16 to fp32 exactly and use fp32 FMAs (AVX-512, then AVX2). It is built into the same library
as the fp32 kernel (``build``), on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InputError, ResourceError
from ..kernel import WEIGHT_FORMATS, FFFKernel
from . import build

#: The kernel's paths, best first, with the op's numeric code.
ISA_CODES = {"avx512bf16": 3, "avx512": 2, "avx2": 1}
#: Environment switch forcing a path (e.g. ``avx512`` to time the widening fallback on a CPU
#: that has AVX512-BF16); read when a kernel without an explicit ``isa`` is first loaded.
ISA_ENV = "ULTRAFASTBERT_BF16_ISA"


def cpu_path() -> str:
    """The best path the loaded library runs on this CPU: ``avx512bf16``, ``avx512``, ``avx2``
    or ``""`` (the library must be loaded)."""
    return torch.ops.ultrafastbert.fff_bf16_isa()


@dataclass(frozen=True)
class NativeBF16Packed:
    """The kernel's copy of the weights (checkpoint node order, tree-major heap order).

    w_in: ``(K*N, d)`` bfloat16 routing rows. b_in: ``(K*N,)`` float32 (zeros without a bias).
    w_out: ``(K*N, d)`` bfloat16 output rows (``linear_out.weight`` transposed). All contiguous.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor


class NativeBF16Kernel(FFFKernel):
    """bfloat16 inputs and weights -> bfloat16 outputs, fp32 accumulation.

    Args:
        isa: ``None`` for the best path of this CPU (or the one ``ULTRAFASTBERT_BF16_ISA``
            names), or ``"avx512bf16"``/``"avx512"``/``"avx2"`` to force one (so the widening
            fallback can be tested on a CPU with AVX512-BF16).
    """

    name = "native-bf16"
    description = "native C++ CPU kernel in bfloat16 (AVX512-BF16 dot products, else widening)"
    devices = ("cpu",)
    dtypes = (torch.bfloat16,)
    #: For bfloat16 inputs every format means bfloat16 weights: the weights are the layer's own.
    weight_formats = WEIGHT_FORMATS

    def __init__(self, isa: str | None = None):
        if isa is not None and isa not in ISA_CODES:
            raise InputError(f"isa must be None or one of {tuple(ISA_CODES)}, got {isa!r}")
        self._isa = isa
        self._isa_code = 0
        self._forward: Callable[..., Any] | None = None
        self._forward_nodes: Callable[..., Any] | None = None

    def extra_reason(self, device: torch.device) -> str | None:
        """Why the kernel cannot run: disabled, CPU, toolchain, build failure or a forced path
        this CPU lacks (builds once)."""
        if self._forward is not None:
            return None
        library = build.status()
        if isinstance(library, str):
            return library
        ops = torch.ops.ultrafastbert
        best = cpu_path()
        isa = self._isa or os.environ.get(ISA_ENV) or best
        if isa not in ISA_CODES:
            return f"{ISA_ENV}={isa!r} is not one of {tuple(ISA_CODES)}; fix or unset it"
        if ISA_CODES[isa] > ISA_CODES.get(best, 0):
            return f"this CPU does not support the {isa} path (best: {best or 'none'})"
        self._isa_code = ISA_CODES[isa]
        forward, forward_nodes = ops.fff_bf16_forward.default, ops.fff_bf16_forward_nodes.default
        self._forward = getattr(forward, "_op", forward)  # the C++ callable: one frame less
        self._forward_nodes = getattr(forward_nodes, "_op", forward_nodes)
        return None

    @property
    def isa(self) -> str | None:
        """The path in use (None until the kernel is loaded)."""
        return {code: isa for isa, code in ISA_CODES.items()}.get(self._isa_code)

    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> NativeBF16Packed:
        """bfloat16 rows (no copy when ``w_in`` already is contiguous bf16); see the class doc."""
        w_in = w_in.detach()
        bias = b_in.detach() if b_in is not None else w_in.new_zeros(w_in.shape[0])
        return NativeBF16Packed(w_in.to(torch.bfloat16).contiguous(), bias.float().contiguous(),
                                w_out.detach().t().to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor, packed: NativeBF16Packed, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(T, d)`` bfloat16 contiguous -> ``y`` ``(T, d)`` bfloat16, nodes
        ``(T, K, D+1)`` | None."""
        if self._forward is None:
            reason = self.unavailable_reason(x.device, x.dtype)
            if reason is not None:
                raise ResourceError(f"the native bf16 FFF kernel cannot run: {reason}")
        assert self._forward is not None and self._forward_nodes is not None
        if return_nodes:
            return self._forward_nodes(x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                                       self._isa_code)
        return self._forward(x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                             self._isa_code), None
