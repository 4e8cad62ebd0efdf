"""Training recipes as typed data: the crammed pretraining recipe, schedules, optimizer groups.

The crammed recipe (docs/design.md §1.3): AdamW (lr 1e-3, betas 0.9/0.98, eps 1e-12, weight decay 0.01,
none on norms, biases and scalars), gradient clipping 0.5, and two functions of *progress*
``p`` in ``[0, 1]`` (elapsed / budget, or step / max-steps):

- learning rate ``peak * min(0.25 + p, 4 - 4p)``: 0.25 x peak at the start, the peak at 75%,
  zero at the end;
- batch size ramped linearly from the micro-batch to the target over the first 60% of progress,
  realised as ``accumulation(p)`` micro-batches per optimizer step.

A schedule is any object with ``lr_factor(p) -> float`` and ``accumulation(p) -> int``
(:class:`ultrafastbert.train.loop.Schedule`); :class:`WarmupCosineSchedule` is the fine-tuning
one (GLUE-sane: cosine with 10% linear warm-up, no accumulation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils.options import option, positive_int


def _positive(name: str, value: float | int, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an int" if integer else "a number"
        raise ConfigError(f"{name} must be {what} > 0, got {value!r}")


def _clip(progress: float) -> float:
    return min(max(float(progress), 0.0), 1.0)


@dataclass(frozen=True)
class CrammedRecipe:
    """The crammed pretraining recipe.

    Batch sizes count sequences over all data-parallel ranks together; each rank processes
    ``micro_batch / world_size`` sequences per forward pass.

    Attributes:
        lr: peak learning rate.
        betas, eps, weight_decay: AdamW settings (decay on weight matrices only).
        grad_clip: maximum global gradient norm.
        micro_batch: sequences per forward pass (the batch at the start of the ramp).
        target_batch: sequences per optimizer step once the ramp is done (8,192 full-scale);
            a multiple of ``micro_batch``.
        ramp_fraction: share of progress over which the batch ramps up (0.6).
    """

    lr: float = option(1e-3, help="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-12
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    micro_batch: int = option(128, parse=positive_int, metavar="N",
                              help="sequences per forward pass over all processes; the ramp "
                                   "starts here")
    target_batch: int = option(8192, flags="--batch-size", parse=positive_int, metavar="N",
                               help="sequences per optimizer step at the end of the batch "
                                    "ramp, over all processes")
    ramp_fraction: float = 0.6

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("lr", "eps", "grad_clip", "ramp_fraction"):
            _positive(name, getattr(self, name))
        for name in ("micro_batch", "target_batch"):
            _positive(name, getattr(self, name), integer=True)
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if self.ramp_fraction > 1:
            raise ConfigError(f"ramp_fraction must be in (0, 1], got {self.ramp_fraction!r}")
        if self.target_batch % self.micro_batch:
            raise ConfigError(f"target_batch ({self.target_batch}) must be a multiple of "
                              f"micro_batch ({self.micro_batch}); e.g. --batch-size "
                              f"{self.target_batch // self.micro_batch * self.micro_batch or self.micro_batch}")

    def schedule(self) -> CrammedSchedule:
        """The recipe's learning-rate factor and batch ramp."""
        return CrammedSchedule(self.micro_batch, self.target_batch, self.ramp_fraction)

    def optimizer(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW over ``model``'s trainable parameters, weight decay on matrices only."""
        return torch.optim.AdamW(parameter_groups(model, self.weight_decay), lr=self.lr,
                                 betas=self.betas, eps=self.eps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass(frozen=True)
class CrammedSchedule:
    """``lr_factor(p) = min(0.25 + p, 4 - 4p)``; batch ramp via gradient accumulation."""

    micro_batch: int
    target_batch: int
    ramp_fraction: float = 0.6

    def lr_factor(self, progress: float) -> float:
        """Multiplier of the peak learning rate at ``progress`` (clipped to [0, 1])."""
        p = _clip(progress)
        return max(0.0, min(0.25 + p, 4.0 - 4.0 * p))

    def batch_size(self, progress: float) -> int:
        """Sequences per optimizer step at ``progress``: ``micro_batch * accumulation(p)``."""
        return self.micro_batch * self.accumulation(progress)

    def accumulation(self, progress: float) -> int:
        """Micro-batches per optimizer step: ``floor(ramp(p) / micro_batch)``, at least 1, with
        ``ramp(p) = micro + (target - micro) * min(p / ramp_fraction, 1)``."""
        ramp = min(_clip(progress) / self.ramp_fraction, 1.0)
        sequences = self.micro_batch + (self.target_batch - self.micro_batch) * ramp
        return max(1, math.floor(sequences / self.micro_batch + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": "crammed", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Linear warm-up over ``warmup`` of progress, then cosine decay to zero; fixed batch.

    The fine-tuning schedule (GLUE-sane: ``warmup=0.1``).
    """

    warmup: float = 0.1
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup!r}")
        _positive("accumulation_steps", self.accumulation_steps, integer=True)

    def lr_factor(self, progress: float) -> float:
        """0 -> 1 linearly during warm-up, then ``0.5 * (1 + cos(pi * q))`` with ``q`` the
        progress after warm-up, rescaled to [0, 1]."""
        p = _clip(progress)
        if p < self.warmup:
            return p / self.warmup
        q = (p - self.warmup) / (1.0 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * q))

    def accumulation(self, progress: float) -> int:
        """Always ``accumulation_steps``."""
        return self.accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": "warmup-cosine", **dataclasses.asdict(self)}


def decays(param: nn.Parameter) -> bool:
    """Whether weight decay applies: matrices (ndim >= 2) yes; norms, biases, scalars no."""
    return param.ndim >= 2


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (weight matrices, embeddings) and ``no_decay`` (LayerNorm
    weights and biases, all biases, scalars such as the position scale). Tied parameters
    appear once; frozen ones are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    names: dict[str, list[str]] = {"decay": [], "no_decay": []}
    for name, param in model.named_parameters():  # shared parameters are yielded once
        if not param.requires_grad:
            continue
        group = "decay" if decays(param) and not _in_norm(model, name) else "no_decay"
        (decay if group == "decay" else no_decay).append(param)
        names[group].append(name)
    return [{"params": decay, "weight_decay": weight_decay, "names": names["decay"]},
            {"params": no_decay, "weight_decay": 0.0, "names": names["no_decay"]}]


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _in_norm(model: nn.Module, param_name: str) -> bool:
    module_name = param_name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, _NORMS)
