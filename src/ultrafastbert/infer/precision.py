"""Precision per part of the encoder: the dense linears in float32, bfloat16 or int8.

``precision`` names what the dense linears (attention Q/K/V and output projections, a dense
feed-forward block, pooler, heads) compute in; the rest follows:

========== ==================================== =================== ==========================
precision  dense linears                        hidden states, norms FFF blocks
========== ==================================== =================== ==========================
float32    oneDNN GEMM, prepacked fp32 weight   float32             float32 kernel
bfloat16   oneDNN GEMM, prepacked bf16 weight   bfloat16            float32 kernel (cast in/out)
int8       int8 weights, one scale per output   float32             float32 kernel
           row; activations quantized per call
           (PyTorch's quantized dynamic linear)
========== ==================================== =================== ==========================

No GEMM is written here: the int8 path is ``torch.ops.quantized.linear_dynamic`` (FBGEMM /
oneDNN, VNNI dot products where the CPU has them) on a weight quantized per output channel,
which keeps the pooled cosine that per-tensor scales lose (docs/precision.md).

:func:`unavailable` says why a precision cannot run on this CPU. A CPU is treated as lacking
VNNI / AVX512-BF16 when ``ULTRAFASTBERT_CPU_FLAGS_OFF`` names the flag (comma-separated, e.g.
``avx512_vnni,avx512_bf16,amx_int8,amx_bf16,avx_vnni``): how the fallback is tested on a CPU
that has them.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..model.linear import InferenceLinear
from ..utils.machine import ENV_FLAGS_OFF as ENV_FLAGS_OFF  # re-exported: the switch's name
from ..utils.machine import flags_switched_off

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "int8")
CHOICES = (*PRECISIONS, "auto")
#: Flags that make each low precision worth running (any one of them).
NEEDED_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"),
                "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
STREAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}


def validate(precision: str) -> str:
    """``precision`` when it is one of :data:`CHOICES`, else an error naming the set."""
    if precision not in CHOICES:
        raise InputError(f"precision must be one of {CHOICES}, got {precision!r}")
    return precision


@cache
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``), less those :data:`ENV_FLAGS_OFF` names."""
    return _proc_flags() - flags_switched_off()


def unavailable(precision: str, device: torch.device | str = "cpu") -> str | None:
    """Why ``precision`` cannot run (or would not be fast) here, or None when it can."""
    validate(precision)
    if precision == "float32" or precision == "auto":
        return None
    if torch.device(device).type != "cpu":
        return None if precision == "bfloat16" else f"int8 linears are a CPU path, not {device}"
    flags = cpu_flags()
    if not any(f in flags for f in NEEDED_FLAGS[precision]):
        switched = os.environ.get(ENV_FLAGS_OFF)
        why = f" ({ENV_FLAGS_OFF}={switched})" if switched else ""
        return (f"this CPU has none of {NEEDED_FLAGS[precision]}{why}: {precision} would run "
                "emulated, slower than float32")
    if precision == "int8" and "fbgemm" not in torch.backends.quantized.supported_engines \
            and "x86" not in torch.backends.quantized.supported_engines:
        return "this PyTorch has no x86/fbgemm quantized engine"
    return None


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one scale per output row, and a float bias.

    ``forward(x (..., in) float32) -> (..., out) float32``; ``x`` is quantized to uint8 per call
    (one scale per call: dynamic quantization). Built from an ``nn.Linear`` (a copy; the source
    is not changed).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        q = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed: Any = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``."""
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def fused(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose outputs are those of ``linears`` stacked (Q, K, V -> QKV)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = any(lin.bias is not None for lin in linears)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            assert out.bias is not None
            out.bias.copy_(torch.cat([
                lin.bias.detach() if lin.bias is not None
                else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
                for lin in linears]))
    return out


def make_linear(linear: nn.Linear, precision: str) -> nn.Module:
    """``linear`` for inference at ``precision`` (float32 shares its parameters; the others copy
    them). Input and output in :data:`STREAM_DTYPES` of ``precision``."""
    if precision == "int8":
        return Int8Linear(linear)
    if precision == "bfloat16":
        copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=torch.bfloat16)
        with torch.no_grad():
            copy.weight.copy_(linear.weight)
            if linear.bias is not None:
                assert copy.bias is not None
                copy.bias.copy_(linear.bias)
        linear = copy
    return InferenceLinear.from_linear(linear).eval()


class CastLayerNorm(nn.Module):
    """A LayerNorm's parameters in the stream dtype: ``(..., d)`` -> ``(..., d)``."""

    def __init__(self, norm: nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = None if norm.weight is None else norm.weight.detach().to(dtype)
        self.bias = None if norm.bias is None else norm.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of ``x``."""
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def norm_for(norm: nn.LayerNorm, dtype: torch.dtype) -> nn.Module:
    """``norm`` itself when its dtype is ``dtype``, else a cast copy."""
    if norm.weight is None or norm.weight.dtype == dtype:
        return norm
    return CastLayerNorm(norm, dtype)
