"""Data-parallel training under ``torchrun``: process group, device, DDP wrapping, collectives.

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and the rendezvous variables for
several nodes); without them the run is a single process and every collective is a no-op. The
backend is NCCL when the processes use CUDA devices and gloo on the CPU. Only rank 0 writes
checkpoints and metrics; batch sizes are global, so a run gives the same optimizer steps on
any number of processes.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import RunError
from ..utils.device import require_device

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Collective timeout: generous, because rank 0 may pack a large corpus while others wait.
TIMEOUT = timedelta(hours=2)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` ->
    ``cuda:<local_rank>``; anything else as given. A CUDA device without CUDA is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = require_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (keeps time-based decisions in step)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable objects only)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes, or return a single-process context.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``cuda`` means
            ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    return DistContext(rank, world, local, dev)


def shutdown(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group, after a barrier when ``wait`` (not after an error)."""
    if ctx.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def main_first(ctx: DistContext, fn: Callable[[], T], *, others: bool = True) -> T | None:
    """Run ``fn`` on rank 0 first, then (``others``) on the other ranks; they return None
    otherwise.

    Used to let rank 0 claim the output folder or pack the corpus before the others find the
    cache. When ``fn`` fails on rank 0, the others raise too instead of waiting forever.
    """
    if ctx.is_main:
        try:
            result = fn()
        except BaseException:
            ctx.broadcast_float(0.0)
            raise
        ctx.broadcast_float(1.0)
        return result
    if ctx.broadcast_float(0.0) != 1.0:
        raise RunError(f"rank {ctx.rank}: rank 0 failed (its error message says why)")
    return fn() if others else None


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` for several processes; ``model`` itself otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffer sync at every forward: the models here have no running statistics, only
    # fixed tables. (Newer torch renamed the option.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, **{option: False})  # type: ignore[arg-type]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and DDP wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = inner
        else:
            return model
