"""The one training loop, shared by pretraining and fine-tuning.

What varies between uses is passed in: the model (any module whose ``forward(**inputs)``
returns an object with ``.loss``, the mean over that micro-batch's targets), the optimizer, a
:class:`Schedule` (learning-rate factor and gradient accumulation as functions of progress) and
a :class:`BatchSource` (micro-batches, with a resumable state). The loop does the rest:

- an optimizer step = ``schedule.accumulation(p)`` micro-batches, gradients accumulated, then
  clipping and ``optimizer.step()``; ``p`` = step / max_steps or elapsed / budget;
- every target (masked token, labelled example) weighs the same in a step's loss, whatever the
  micro-batching or the number of processes: each micro-batch's mean loss is scaled by its
  share of the step's targets (counted over all ranks). Micro-batch size and world size are
  runtime choices and change the result only by float rounding;
- bf16 autocast (``precision="bf16"``), optional ``torch.compile``, DDP (``ctx``);
- ``metrics.jsonl`` (one line per step), a progress bar (loss, tokens/s, time left),
  periodic and final checkpoints, and exact resumption (:meth:`Trainer.restore`).

Only rank 0 writes files. Data sources serve, on every rank, that rank's share of one global
micro-batch and keep a rank-independent state, so rank 0's checkpoint resumes every rank.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ConfigError, Interrupted, RunError
from ..utils.oserrors import writing
from .checkpoint import (
    CHECKPOINT_DIR,
    CheckpointInfo,
    latest_checkpoint,
    load_checkpoint,
    remove_orphans,
    save_checkpoint,
    step_dir_name,
)
from .distributed import DistContext, wrap_ddp
from .metrics import METRICS_FILE, MetricsLog

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
#: With a time budget, the longest an optimizer step may take, as a share of the budget.
BUDGET_STEP_SHARE = 0.02
#: A ``max_steps`` run expected to take longer than this (seconds) is announced as a warning.
LONG_RUN_S = 2 * 3600


# ------------------------------------------------------------------------------ interfaces
@dataclass(frozen=True)
class MicroBatch:
    """This rank's share of one global micro-batch.

    Attributes:
        inputs: keyword arguments of ``model.forward`` (CPU or device tensors), e.g.
            ``input_ids`` ``(b, S)`` and ``labels`` ``(b, S)``.
        n_targets: what the model's mean loss averages over (masked tokens, examples).
        n_tokens: tokens processed (for throughput), e.g. ``b * S`` or the non-pad count.
    """

    inputs: dict[str, torch.Tensor]
    n_targets: int
    n_tokens: int

    @property
    def n_sequences(self) -> int:
        """Rows in this share (the leading dimension of the first input)."""
        return int(next(iter(self.inputs.values())).shape[0])


class BatchSource(Protocol):
    """Micro-batches for the loop. ``state_dict()`` must be the same on every rank."""

    def next_batch(self, rank: int, world_size: int) -> MicroBatch:
        """``rank``'s share of the next global micro-batch (advances the state)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors and plain values)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        ...


class Schedule(Protocol):
    """Learning-rate factor and micro-batches per step as functions of progress in [0, 1]."""

    def lr_factor(self, progress: float) -> float:
        """Multiplier of each parameter group's initial learning rate."""
        ...

    def accumulation(self, progress: float) -> int:
        """Micro-batches per optimizer step (>= 1)."""
        ...


# ------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LoopConfig:
    """How long to train and what to write. Exactly one of ``max_steps``/``budget_s``.

    Attributes:
        max_steps: optimizer steps; progress = step / max_steps (reproducible).
        budget_s: wall-clock seconds; progress = elapsed / budget (the paper's setting).
        grad_clip: maximum global gradient norm, or None for no clipping.
        precision: ``fp32`` or ``bf16`` (autocast of the forward pass).
        compile: wrap the model in ``torch.compile``.
        save_every_steps, save_every_s: periodic checkpoints (either, both or neither).
        keep_checkpoints: how many of the newest checkpoints to keep.
        progress_bar: show a tqdm bar on rank 0.
        out_dir: where ``metrics.jsonl`` and ``checkpoints/`` go; None writes nothing.
        description: label of the progress bar.
    """

    max_steps: int | None = None
    budget_s: float | None = None
    grad_clip: float | None = None
    precision: str = "fp32"
    compile: bool = False
    save_every_steps: int | None = None
    save_every_s: float | None = None
    keep_checkpoints: int = 1
    progress_bar: bool = True
    out_dir: Path | None = None
    description: str = "train"

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.budget_s is None):
            raise ConfigError("give exactly one of max_steps and budget_s (got "
                              f"{self.max_steps!r} and {self.budget_s!r})")
        for name in ("max_steps", "save_every_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("budget_s", "save_every_s", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the run done: ``step / max_steps`` or ``elapsed / budget``."""
        if self.max_steps is not None:
            return step / self.max_steps
        assert self.budget_s is not None  # exactly one of the two is set (__post_init__)
        return elapsed_s / self.budget_s

    def done(self, step: int, elapsed_s: float) -> bool:
        """Whether the run is over."""
        return self.progress(step, elapsed_s) >= 1.0


@dataclass
class TrainState:
    """Counters that a checkpoint restores: optimizer steps, tokens, training seconds."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as written to ``metrics.jsonl``.

    ``loss`` is the mean over the step's targets on all ranks; ``tokens`` is cumulative;
    ``batch_size`` counts sequences over all ranks; ``elapsed`` is training seconds so far.
    """

    step: int
    loss: float
    lr: float
    tokens: int
    elapsed: float
    progress: float
    batch_size: int
    accumulation: int
    grad_norm: float
    tokens_per_s: float

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record."""
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """The run's end: counters, this session's throughput and the last step's statistics."""

    state: TrainState
    tokens_per_s: float
    last: StepStats | None
    checkpoint: CheckpointInfo | None
    history: list[StepStats] = field(default_factory=list)


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs optimizer steps until ``config`` says stop; see the module docstring.

    Args:
        model: the plain module, already on its device.
        optimizer: over ``model``'s parameters; each group's ``initial_lr`` (default: its
            ``lr``) is the peak the schedule scales.
        schedule: a :class:`Schedule`.
        data: a :class:`BatchSource`.
        config: a :class:`LoopConfig`.
        ctx: the distributed context (default: one process on the model's device).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 data: BatchSource, config: LoopConfig, ctx: DistContext | None = None) -> None:
        self.module = model
        self.ctx = ctx or DistContext(device=_device_of(model))
        self.optimizer, self.schedule, self.data, self.config = optimizer, schedule, data, config
        self.state = TrainState()
        self._ddp = wrap_ddp(model, self.ctx)
        self.model: nn.Module = torch.compile(self._ddp) if config.compile else self._ddp  # type: ignore[assignment]
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._resumed = False
        self._clock: tuple[float, float] = (time.monotonic(), 0.0)
        self._stop_requested = False
        self._micro_s: float | None = None  # seconds per micro-batch (budget runs)
        self._bar: Any = _NullBar()
        self._capped_at: int | None = None

    # ------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path | None:
        """``out_dir/checkpoints``, or None when the loop writes nothing."""
        out = self.config.out_dir
        return None if out is None else out / CHECKPOINT_DIR

    def restore(self) -> CheckpointInfo | None:
        """Continue from the latest checkpoint under ``out_dir``: model, optimizer, data
        position, RNG states and counters. Returns it, or None when there is none (the run
        then starts from step 0 and ``metrics.jsonl`` is cut back to nothing)."""
        self._resumed = True
        root = self.checkpoint_root
        if root is None:
            raise ConfigError("restore() needs LoopConfig.out_dir")
        if self.ctx.is_main:
            remove_orphans(root)
        self.ctx.barrier()
        info = latest_checkpoint(root)
        if info is None:
            log.warning("no checkpoint in %s: starting from step 0", root)
            return None
        info_json, trainer = load_checkpoint(info, self.module, self.ctx.device)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.data.load_state_dict(trainer["data"])
        _set_rng_state(trainer["rng"], self.ctx)
        self.state = TrainState(int(info_json["step"]), int(info_json["tokens"]),
                                float(info_json["elapsed_s"]))
        log.info("resumed from %s (step %d, %.0f s trained)", info.path, self.state.step,
                 self.state.elapsed_s)
        return info

    def save(self, final: bool = False) -> CheckpointInfo | None:
        """Write a checkpoint of the current state (rank 0; every rank must call this)."""
        rng = self.ctx.gather_objects(_rng_state())
        root = self.checkpoint_root
        if root is None or not self.ctx.is_main:
            return None
        trainer = {"optimizer": self.optimizer.state_dict(), "data": self.data.state_dict(),
                   "rng": rng}
        info = {**asdict(self.state), "world_size": self.ctx.world_size,
                "max_steps": self.config.max_steps, "budget_s": self.config.budget_s,
                "schedule": _describe(self.schedule)}
        with writing(root / step_dir_name(self.state.step), "the checkpoint",
                     note=_intact_note(root)):
            return save_checkpoint(root, self.state.step, model=self.module,
                                   trainer_state=trainer, info=info, final=final,
                                   keep=self.config.keep_checkpoints)

    # -------------------------------------------------------------------------------- run
    def fit(self) -> TrainResult:
        """Train until ``max_steps`` or the budget is reached; write the final checkpoint.

        Ctrl-C (SIGINT) stops at the next micro-batch: a step in progress is abandoned (its
        data and random state rewound, so resuming repeats it exactly), a checkpoint of the
        last complete step is written, and :class:`~ultrafastbert.errors.Interrupted` is
        raised, naming it. A second Ctrl-C quits at once without saving.
        """
        self.model.train()
        self._clock = (time.monotonic(), self.state.elapsed_s)
        start_tokens = self.state.tokens
        history: list[StepStats] = []
        with _stop_on_sigint(self):
            try:
                self._run_steps(history)
            except _StopRequested:
                self._interrupted()
            checkpoint = self.save(final=True)
        session_s = max(self.state.elapsed_s - self._clock[1], 1e-9)
        return TrainResult(self.state, (self.state.tokens - start_tokens) / session_s,
                           history[-1] if history else None, checkpoint, history)

    def _run_steps(self, history: list[StepStats]) -> None:
        last_save = self.state.elapsed_s
        with self._metrics_log() as metrics, _progress_bar(self) as bar:
            self._bar = bar
            try:
                # Decide on the recorded clock (broadcast from rank 0 at the end of each
                # step), so the run's reported time is never short of the budget it stopped at.
                while not self.config.done(self.state.step, self.state.elapsed_s):
                    stats = self.step()
                    history.append(stats)
                    metrics.write(stats.to_json())
                    bar.update(stats)
                    if self._periodic_save_due(last_save):
                        self.save()
                        last_save = self.state.elapsed_s
                    if self._stop_now():
                        raise _StopRequested
            finally:
                self._bar = _NullBar()

    def _stop_now(self) -> bool:
        """Whether Ctrl-C was pressed (on any rank: every rank must call this)."""
        flag = float(self._stop_requested)
        if self.ctx.enabled:
            (flag,) = self.ctx.all_reduce_sum([flag])
        return flag > 0

    def _interrupted(self) -> None:
        """Save the last complete step and raise :class:`Interrupted` naming the checkpoint."""
        done = f"step {self.state.step}" + (f" of {self.config.max_steps}"
                                            if self.config.max_steps else "")
        if self.checkpoint_root is None:
            raise Interrupted(f"interrupted at {done}; nothing saved (this loop writes no "
                              "checkpoints)")
        info = self.save()
        where = info.path if info is not None else self.checkpoint_root
        raise Interrupted(f"interrupted at {done}; saved the checkpoint {where}")

    def _elapsed(self) -> float:
        """Training seconds so far (rank 0's clock, so every rank decides alike)."""
        start, before = self._clock
        return self.ctx.broadcast_float(before + time.monotonic() - start)

    def _periodic_save_due(self, last_save_s: float) -> bool:
        cfg, state = self.config, self.state
        if cfg.out_dir is None or cfg.done(state.step, state.elapsed_s):
            return False  # the final save follows
        by_steps = cfg.save_every_steps is not None and state.step % cfg.save_every_steps == 0
        by_time = cfg.save_every_s is not None and state.elapsed_s - last_save_s >= cfg.save_every_s
        return by_steps or by_time

    def step(self) -> StepStats:
        """One optimizer step: fetch, forward/backward each micro-batch, clip, update.

        :meth:`fit` calls it until the run is over and writes metrics and checkpoints; call it
        directly to time steps (benchmarks). Every rank must call it.
        """
        started = time.monotonic()
        rewind = (copy.deepcopy(self.data.state_dict()), _rng_state())
        # The recorded clock (rank 0's, at the end of the last step), on which fit() decided to
        # run this step: progress stays below 1 even if time passed in between.
        progress = self.config.progress(self.state.step, self.state.elapsed_s)
        lr = self._set_lr(self.schedule.lr_factor(progress))
        n_micro = self._micro_batches(progress)
        batches = [self.data.next_batch(self.ctx.rank, self.ctx.world_size)
                   for _ in range(n_micro)]
        targets, tokens, rows = self.ctx.all_reduce_sum(
            [sum(b.n_targets for b in batches), sum(b.n_tokens for b in batches),
             sum(b.n_sequences for b in batches)])
        try:
            local_loss_sum = self._accumulate(batches, max(targets, 1.0))
        except _StopRequested:  # Ctrl-C mid-step: as if this step had not begun
            self.optimizer.zero_grad(set_to_none=True)
            self.data.load_state_dict(rewind[0])
            _restore_rng(rewind[1])
            raise
        grad_norm = self._optimizer_step()
        (loss_sum,) = self.ctx.all_reduce_sum([local_loss_sum])
        loss = loss_sum / max(targets, 1.0)
        self._check_finite(loss)
        self.state.step += 1
        self.state.tokens += int(tokens)
        self.state.elapsed_s = self._elapsed()
        seconds = max(time.monotonic() - started, 1e-9)
        self._observe_step_time(seconds, n_micro)
        return StepStats(self.state.step, loss, lr, self.state.tokens, self.state.elapsed_s,
                         progress, int(rows), n_micro, grad_norm, tokens / seconds)

    def _micro_batches(self, progress: float) -> int:
        """``schedule.accumulation(progress)``; with a budget, capped so that one step takes at
        most :data:`BUDGET_STEP_SHARE` of the budget (and no more than the time left), so the
        budget is kept to within a few percent and the schedule runs to its end."""
        wanted = self.schedule.accumulation(progress)
        if self.config.budget_s is None or self._micro_s is None:
            return wanted
        left = self.config.budget_s - self.state.elapsed_s
        fits = min(left, BUDGET_STEP_SHARE * self.config.budget_s) / self._micro_s
        n_micro = max(1, min(wanted, math.floor(fits)))
        if n_micro < wanted and self._capped_at is None:
            self._capped_at = n_micro
            log.warning("the budget is short for this batch ramp: one micro-batch takes %.2f s, "
                        "so steps are capped at %d micro-batches (%.1f s, %.0f%% of the "
                        "budget) instead of %d; the learning-rate schedule still runs to its "
                        "end", self._micro_s, n_micro, n_micro * self._micro_s,
                        100 * BUDGET_STEP_SHARE, wanted)
        return n_micro

    def _observe_step_time(self, seconds: float, n_micro: int) -> None:
        """Running estimate of seconds per micro-batch (rank 0's, so every rank caps alike)."""
        per_micro = self.ctx.broadcast_float(seconds / n_micro)
        previous = self._micro_s
        if previous is None and self.config.max_steps is not None:
            self._warn_if_long(per_micro)
        self._micro_s = per_micro if previous is None else max(per_micro,
                                                               0.5 * (previous + per_micro))

    def _warn_if_long(self, micro_s: float) -> None:
        """After the first step of a ``max_steps`` run: say so when the whole run, with the
        batch ramp, is expected to take more than :data:`LONG_RUN_S` on this device."""
        steps = self.config.max_steps or 0
        if steps > 100_000:
            return  # not worth summing the schedule for; such a run is long by design
        micro = sum(self.schedule.accumulation(s / steps) for s in range(self.state.step, steps))
        expected = micro * micro_s
        if expected > LONG_RUN_S:
            biggest = self.schedule.accumulation(1.0)
            log.warning("this run is expected to take about %s on %s: %d optimizer steps, up to "
                        "%d micro-batches each (%.1f s per step at the end of the batch ramp). "
                        "Lower --batch-size (or --max-steps) for a shorter run",
                        _format_seconds(expected), self.ctx.device, steps - self.state.step,
                        biggest, biggest * micro_s)

    def _set_lr(self, factor: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return float(self.optimizer.param_groups[0]["lr"])

    def _accumulate(self, batches: list[MicroBatch], total_targets: float) -> float:
        """Backward of every micro-batch, each weighted by its share of the step's targets.

        DDP averages gradients over ranks, hence the factor ``world_size``. Returns this
        rank's sum of per-target losses.
        """
        scale = self.ctx.world_size / total_targets
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for i, batch in enumerate(batches):
            if i and self._stop_now():
                raise _StopRequested
            sync = i == len(batches) - 1
            with self._no_sync(not sync):
                with self._autocast():
                    loss = self.model(**_to_device(batch.inputs, self.ctx.device)).loss
                (loss * (batch.n_targets * scale)).backward()
            loss_sum += loss.detach().double() * batch.n_targets
            self._bar.micro_batch_done(i + 1, len(batches))
        return float(loss_sum)

    def _optimizer_step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        no_sync = getattr(self._ddp, "no_sync", None)
        if skip_sync and no_sync is not None:
            return no_sync()
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise RunError(f"the loss is {loss} at step {self.state.step + 1}; lower the "
                           "learning rate (--lr) or use --precision fp32. The last "
                           "checkpoint is untouched; --resume restarts from it.")

    def _metrics_log(self) -> contextlib.AbstractContextManager:
        out = self.config.out_dir
        if out is None or not self.ctx.is_main:
            return _NullLog()
        keep = self.state.step if self._resumed else None
        return MetricsLog(out / METRICS_FILE, keep_until_step=keep)


# ------------------------------------------------------------------------------- helpers
def _intact_note(root: Path) -> str:
    """Which earlier checkpoint a failed save leaves untouched, and how to continue."""
    try:
        latest = latest_checkpoint(root)
    except (OSError, ValueError, RuntimeError):
        latest = None
    if latest is None:
        return "No checkpoint was written yet."
    return (f"The previous checkpoint {latest.path} (step {latest.step}) is intact: "
            "continue from it with the same command and --resume.")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}


def _describe(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else type(obj).__name__


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequested(Exception):
    """Raised inside the loop when Ctrl-C asked it to stop (never escapes :meth:`fit`)."""


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """While training: the first Ctrl-C asks ``trainer`` to stop and save, a second quits.

    Only in the main thread, and only when SIGINT has Python's default handler (a caller with
    its own handler keeps it).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer._stop_requested = True
        log.warning("Ctrl-C: stopping after this micro-batch and saving a checkpoint "
                    "(press Ctrl-C again to quit without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _set_rng_state(per_rank: list[dict[str, Any]], ctx: DistContext) -> None:
    """Restore this rank's RNG states (rank 0's when the world size changed)."""
    if len(per_rank) != ctx.world_size:
        log.warning("checkpoint was written by %d processes, now %d: every rank takes rank "
                    "0's RNG state", len(per_rank), ctx.world_size)
    state = per_rank[ctx.rank] if len(per_rank) == ctx.world_size else per_rank[0]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _NullLog:
    def __enter__(self) -> _NullLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------- progress bar
class _Bar:
    """tqdm bar over steps (``max_steps``) or seconds (budget) with loss, tokens/s, time left."""

    def __init__(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        cfg, state = trainer.config, trainer.state
        self.cfg = cfg
        by_steps = cfg.max_steps is not None
        total = cfg.max_steps if cfg.max_steps is not None else round(cfg.budget_s or 0.0)
        # One estimate of the time left (ours, "left=", which knows that steps grow with the
        # batch ramp), not also tqdm's rate-based one: the two disagreed.
        self.bar = tqdm(total=total, initial=state.step if by_steps else round(state.elapsed_s),
                        unit="step" if by_steps else "s", desc=cfg.description,
                        dynamic_ncols=True, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.5g}/{total_fmt} "
                                   "{unit} [{elapsed}{postfix}]")
        self.trainer = trainer
        self.start = (state.step, state.elapsed_s)
        # Micro-batches before each step: steps get longer as the batch ramps up.
        self.micro_before = list(itertools.accumulate(
            (trainer.schedule.accumulation(s / total) for s in range(total)),
            initial=0)) if by_steps else []

    def micro_batch_done(self, done: int, of: int) -> None:
        """Move within a step (a step at the end of the batch ramp can take minutes)."""
        if self.cfg.max_steps is not None:
            self.bar.n = self.trainer.state.step + done / of
        else:
            start, before = self.trainer._clock
            self.bar.n = round(before + time.monotonic() - start)
        self.bar.refresh()

    def update(self, stats: StepStats) -> None:
        if self.cfg.max_steps is not None:
            self.bar.n = stats.step
        else:
            self.bar.n = max(self.bar.n, round(stats.elapsed))
        self.bar.refresh()
        self.bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{stats.tokens_per_s:,.0f}",
                             left=_format_seconds(self._left(stats)), refresh=False)

    def _left(self, stats: StepStats) -> float:
        if self.cfg.budget_s is not None:
            return max(0.0, self.cfg.budget_s - stats.elapsed)
        done = self.micro_before[stats.step] - self.micro_before[self.start[0]]
        left = self.micro_before[-1] - self.micro_before[stats.step]
        return (stats.elapsed - self.start[1]) / max(done, 1) * left

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _progress_bar(trainer: Trainer):
    bar: Any = None
    if trainer.config.progress_bar and trainer.ctx.is_main:
        try:
            bar = _Bar(trainer)
        except ImportError:
            log.warning("tqdm is not installed: no progress bar (pip install tqdm)")
    try:
        yield bar if bar is not None else _NullBar()
    finally:
        if bar is not None:
            bar.close()


class _NullBar:
    def update(self, stats: StepStats) -> None:
        pass

    def micro_batch_done(self, done: int, of: int) -> None:
        pass


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
