"""One place picks the FFF kernel, for inference and for training.

Kernels are tried in priority order (GPU kernel, native CPU kernel, vectorised PyTorch); each
declares the devices and dtypes it serves, whether it has a training path, and says why it
refuses. ``"auto"`` takes the first that can run; an explicitly named kernel that cannot run is an
error, never a silent fallback.
"""

from __future__ import annotations

import logging

import torch

from ..errors import InputError
from ..utils.device import device_unavailable_reason
from .kernel import FFFKernel, validate_weight_format

logger = logging.getLogger(__name__)


_REGISTRY: dict[str, FFFKernel] = {}


def registry() -> dict[str, FFFKernel]:
    """All known kernels by name, fastest first (imports their modules lazily, at first use).

    Filled once into a module dict rather than behind ``functools.cache``: ``torch.compile``
    ignores such caches and would re-run (and re-create the kernels) inside every trace.
    """
    if not _REGISTRY:
        from .native import NativeBF16Kernel, NativeCPUKernel
        from .torch_kernel import TorchKernel
        from .triton_impl import TritonKernel

        kernels: list[FFFKernel] = [TritonKernel(), NativeCPUKernel(), NativeBF16Kernel(),
                                    TorchKernel()]
        _REGISTRY.update((k.name, k) for k in kernels)
    return _REGISTRY


def explain(device: torch.device | str, dtype: torch.dtype, weight_format: str = "fp32",
            training: bool = False) -> list[tuple[str, str | None]]:
    """``(name, reason)`` for every kernel, in priority order; reason None means it can run
    (for inference, or with ``training`` for the differentiable forward)."""
    device = torch.device(device)
    missing = device_unavailable_reason(device)
    if missing is not None:  # no kernel runs on a device that is not there
        return [(name, f"device {device} is not available: {missing}") for name in registry()]
    return [(name, k.unavailable_reason(device, dtype, weight_format, training=training))
            for name, k in registry().items()]


def select(name: str, device: torch.device | str, dtype: torch.dtype,
           weight_format: str = "fp32", training: bool = False) -> FFFKernel:
    """The kernel to use: ``name`` (``"auto"`` or a registered name) for this device and dtype,
    for inference or (``training``) for the differentiable forward.

    Raises:
        InputError: unknown name, or a named kernel that cannot run here (with the reason), or
            ``"auto"`` with no kernel available (with every kernel's reason).
    """
    validate_weight_format(weight_format)
    device = torch.device(device)
    kernels = registry()
    if name != "auto":
        if name not in kernels:
            raise InputError(f"unknown FFF implementation {name!r}; choose 'auto' or one of "
                             f"{sorted(kernels)}")
        reason = kernels[name].unavailable_reason(device, dtype, weight_format,
                                                  training=training)
        if reason is not None:
            mode = "train" if training else "run"
            raise InputError(f"FFF implementation {name!r} cannot {mode} on {device} / {dtype} / "
                             f"weights {weight_format}: {reason}")
        return kernels[name]
    reasons = explain(device, dtype, weight_format, training=training)
    for kname, reason in reasons:
        if reason is None:
            return kernels[kname]
    detail = "; ".join(f"{n}: {r}" for n, r in reasons)
    mode = "train" if training else "run"
    raise InputError(f"no FFF implementation can {mode} on {device} / {dtype} / weights "
                     f"{weight_format} ({detail})")


def describe(device: torch.device | str, dtype: torch.dtype = torch.float32,
             weight_format: str = "fp32", training: bool | None = None) -> str:
    """A human-readable table of the kernels and whether each can run here: for inference,
    for training, or (``training=None``) both, one section each."""
    if training is None:
        return "\n".join(["inference:", describe(device, dtype, weight_format, False), "",
                          "training:", describe(device, dtype, "fp32", True)])
    lines = []
    for name, reason in explain(device, dtype, weight_format, training=training):
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"{name:8s} {status}  ({registry()[name].description})")
    return "\n".join(lines)
