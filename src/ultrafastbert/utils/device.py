"""Checking a ``--device`` before any work: a CUDA device without CUDA is a clear error."""

from __future__ import annotations

import torch

from ..errors import InputError, ResourceError


def require_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``torch.device(name)``, checked to exist on this machine.

    Raises:
        InputError: ``name`` is not a device name.
        ResourceError: a CUDA device, but this torch has no CUDA or no such GPU is visible.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N "
                         f"({err})") from None
    reason = device_unavailable_reason(device)
    if reason is not None:
        raise ResourceError(f"{flag} {device}: {reason}")
    return device


def device_unavailable_reason(device: torch.device) -> str | None:
    """Why ``device`` cannot be used here (None when it can); only CUDA devices are checked."""
    if device.type != "cuda":
        return None
    if torch.version.cuda is None and torch.version.hip is None:
        return (f"this torch ({torch.__version__}) is built without CUDA; use --device cpu, "
                "or install a CUDA build of torch")
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES); use "
                "--device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"only {count} CUDA device(s) are visible (cuda:0 ... cuda:{count - 1})"
    return None
