"""Routing during distillation: hard throughout, or soft annealed to hard (``soft-to-hard``).

With ``soft-to-hard`` every FFF block routes softly (:mod:`~ultrafastbert.model.soft_routing`:
each node weighted by the probability of reaching it, gates ``sigmoid(logit / (tau * rms))``)
at a temperature that falls linearly with the distillation's progress ``g`` in [0, 1] over both
phases, ``tau(g) = temperature * (1 - g / hard_from)``, and is hard from ``g = hard_from`` on:
the last steps train the hard-routed model itself, which is what is saved (its inference
semantics unchanged). The layer-by-layer phase covers ``g`` in ``[0, layerwise_share]``, the
end-to-end phase the rest (by each phase's own progress: steps or time).

The temperature is set by the phase's schedule (:class:`RoutingSchedule`, wrapping the
learning-rate schedule), which the training loop consults at the start of every step, so a
resumed phase continues at the temperature of its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..model.soft_routing import set_soft_routing

ROUTING_SCHEDULES = ("hard", "soft-to-hard")


@dataclass(frozen=True)
class SoftToHard:
    """The temperature as a function of the distillation's progress (module docstring)."""

    temperature: float = 0.25
    hard_from: float = 0.8

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"--soft-temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.hard_from <= 1.0:
            raise InputError(f"--hard-from must be in (0, 1], got {self.hard_from}")

    def at(self, progress: float) -> float:
        """``tau`` at overall progress ``progress`` (0: hard routing)."""
        if progress >= self.hard_from:
            return 0.0
        return self.temperature * (1.0 - max(progress, 0.0) / self.hard_from)


@dataclass
class RoutingSchedule:
    """A phase's learning-rate schedule (``inner``) that also sets the blocks' routing
    temperature at every step: phase progress ``p`` is overall progress ``start + span * p``.
    """

    inner: Any
    blocks: Sequence[Any]
    anneal: SoftToHard
    start: float
    span: float

    def lr_factor(self, progress: float) -> float:
        """Set the temperature for this step, then the inner schedule's factor."""
        set_soft_routing(list(self.blocks), self.anneal.at(self.start + self.span * progress))
        return float(self.inner.lr_factor(progress))

    def accumulation(self, progress: float) -> int:
        """The inner schedule's micro-batches per step."""
        return int(self.inner.accumulation(progress))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in the checkpoints)."""
        inner = self.inner.to_dict() if hasattr(self.inner, "to_dict") else repr(self.inner)
        return {"kind": "soft-to-hard routing", "temperature": self.anneal.temperature,
                "hard_from": self.anneal.hard_from, "start": self.start, "span": self.span,
                "lr": inner}


def phase_span(phase: str, layerwise_share: float) -> tuple[float, float]:
    """``(start, span)`` of ``phase``'s share of the overall progress."""
    if phase == "layerwise":
        return 0.0, layerwise_share
    return layerwise_share, 1.0 - layerwise_share
