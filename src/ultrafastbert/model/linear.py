"""``nn.Linear`` that multiplies with a oneDNN-prepacked weight during CPU inference.

PyTorch's ``nn.Linear`` on the CPU calls MKL with the weight in its plain layout, repacking it
inside every call. oneDNN can keep a copy of the weight reordered once into its GEMM's blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, as ``torch.compile``'s CPU backend does);
on this project's CPUs that is 10-15% faster at 1,024 tokens and about 2x at one token, for
float32 and bfloat16. The encoder's attention projections and dense feed-forward use
:class:`InferenceLinear`, so the dense baselines built from the same code get the same GEMMs.

The packed copy is an inference-only cache: it is built on the first eval-mode call without
autograd, rebuilt when the weight or bias changes (in place or replaced), dropped by
``train()``, and never saved, copied or pickled. Everything else (training, autograd, autocast,
other devices and dtypes) runs the plain ``nn.Linear``. ``ULTRAFASTBERT_PACKED_LINEAR=0`` turns
the packed path off.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.cache import PackedCache, fingerprint
from ..utils.env import switched_off

logger = logging.getLogger(__name__)

ENV_SWITCH = "ULTRAFASTBERT_PACKED_LINEAR"
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packed_linear_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a packed oneDNN linear cannot serve ``device`` / ``dtype``, or None when it can."""
    value = switched_off(ENV_SWITCH)
    if value is not None:
        return f"disabled by {ENV_SWITCH}={value}"
    if device.type != "cpu":
        return f"device {device} (packing is a CPU path)"
    if dtype not in PACKED_DTYPES:
        return f"dtype {dtype} (packing serves float32 and bfloat16)"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "this PyTorch lacks mkldnn._reorder_linear_weight / _linear_pointwise"
    return None


class InferenceLinear(nn.Linear):
    """``nn.Linear`` (same parameters, init and checkpoint names) with a packed inference path.

    ``forward(x (..., in_features)) -> (..., out_features)``. In eval mode, with autograd and
    autocast off and ``x`` on the CPU in the weight's dtype (float32 or bfloat16), it runs
    oneDNN's GEMM on a prepacked copy of the weight; otherwise exactly ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._cache = PackedCache()  # the oneDNN-packed weight; see utils.cache

    @property
    def _packed(self) -> torch.Tensor | None:
        """The packed weight while the cache holds one, else None."""
        return self._cache.value

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> InferenceLinear:
        """An ``InferenceLinear`` sharing ``linear``'s parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        if torch.compiler.is_compiling():  # Inductor packs weights itself; the cache's
            return F.linear(x, self.weight, self.bias)  # data_ptr reads would break the graph
        packed = self._packed_weight(x)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The cached packed weight when this call may use it (building it if needed)."""
        weight, bias = self.weight, self.bias
        if (self.training or torch.is_grad_enabled() or x.dtype is not weight.dtype
                or x.device.type != "cpu" or weight.device.type != "cpu"
                or torch._C._is_any_autocast_enabled()):
            return None
        params = (weight, bias)
        key = fingerprint(params)
        packed = self._cache.lookup(key)
        if packed is not None:
            return packed
        reason = packed_linear_unavailable(weight.device, weight.dtype)
        if reason is not None:
            logger.debug("plain nn.Linear: %s", reason)
            return None
        return self._cache.store(params, key, torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), None))

    def train(self, mode: bool = True) -> InferenceLinear:
        """Switch mode; drops the packed copy (training will change the weight)."""
        self._cache.clear()
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> InferenceLinear:
        """``.to()``, ``.half()`` ...: the packed copy belongs to the old tensors."""
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)


def use_packed_linears(module: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` inside ``module`` by an :class:`InferenceLinear`
    sharing its parameters (used to give a third-party model, e.g. Hugging Face ``BertModel``,
    the same GEMMs as ours). Returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, InferenceLinear.from_linear(child))
                replaced += 1
    return replaced
