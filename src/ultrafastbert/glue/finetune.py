"""Fine-tuning with the "GLUE-sane" protocol (crammedBERT; docs/design.md §1.3), on the shared loop.

One setting for every task: 5 epochs, learning rate 4e-5, batch 16, AdamW (0.9, 0.98, eps 1e-6,
no weight decay), cosine schedule with 10% linear warm-up, no gradient clipping, inputs
truncated to 128 tokens, first-token pooling, dropout 0.1, median over 5 seeds. Every field of
:class:`GlueProtocol` can be overridden.

The classifier starts from the *encoder* of a model directory (pretrained MLM, released
checkpoint, or an earlier fine-tuned classifier); its pooler and head are always new,
initialised from the seed, so every task and seed starts alike. The seed also fixes the order of
training examples and the dropout masks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..model import ModelConfig, UltraFastBertForSequenceClassification, UltraFastBertModel
from ..model.encoder import init_weights
from ..train.loop import LoopConfig, Trainer, TrainResult
from ..train.recipe import WarmupCosineSchedule, parameter_groups
from ..utils.options import option, positive_float, positive_int
from .data import ClassificationBatches, EncodedSplit, eval_batches
from .metrics import SplitMetrics, compute_metrics
from .tasks import GlueTask

log = logging.getLogger(__name__)

POOLERS = ("first", "mean")


def seed_range(text: str) -> tuple[int, ...]:
    """``N`` -> seeds ``(0, ..., N-1)``."""
    return tuple(range(positive_int(text)))


@dataclass(frozen=True)
class GlueProtocol:
    """What a fine-tuning run computes (the GLUE-sane defaults).

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate.
        batch_size: examples per optimizer step.
        betas, eps, weight_decay: AdamW (decay, if any, on weight matrices only).
        warmup: share of the steps with a linear warm-up; cosine decay to 0 after it.
        grad_clip: maximum gradient norm, or None (the protocol does not clip).
        max_length: tokens per example after truncation (special tokens included).
        pooler: ``first`` token (GLUE-sane) or ``mean`` over real tokens.
        dropout: every dropout rate of the encoder and the classification head.
        seeds: one fine-tuning run per seed; tables report the median.
        max_train_examples, max_eval_examples: random subsets (None: all), drawn with
            ``subset_seed`` so every model and seed sees the same examples.
        subset_seed: seed of those subsets.
    """

    epochs: int = option(5, parse=positive_int, help="epochs")
    lr: float = option(4e-5, parse=positive_float, help="peak learning rate")
    batch_size: int = option(16, parse=positive_int, help="batch size")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup: float = option(0.1, help="warm-up share of steps")
    grad_clip: float | None = None
    max_length: int = option(128, parse=positive_int,
                             help="tokens per example after truncation")
    pooler: str = "first"
    dropout: float = option(0.1, help="dropout rates")
    seeds: tuple[int, ...] = option((0, 1, 2, 3, 4), metavar="N", parse=seed_range,
                                    show=lambda seeds: str(len(seeds)),
                                    help="runs per task, seeds 0..N-1; tables show the median")
    max_train_examples: int | None = option(
        None, parse=positive_int, metavar="N",
        help="fine-tune on a random subset of N training examples (default: all)")
    max_eval_examples: int | None = option(
        None, parse=positive_int, metavar="N",
        help="evaluate on a random subset of N dev examples (default: all)")
    subset_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        for name in ("epochs", "batch_size", "max_length"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        self._check_rates()
        if self.pooler not in POOLERS:
            raise ConfigError(f"pooler must be one of {POOLERS}, got {self.pooler!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and at least one, got {self.seeds!r}")

    def _check_rates(self) -> None:
        checks = {"lr": self.lr > 0, "eps": self.eps > 0, "warmup": 0 <= self.warmup < 1,
                  "weight_decay": 0 <= self.weight_decay < 1, "dropout": 0 <= self.dropout < 1,
                  "grad_clip": self.grad_clip is None or self.grad_clip > 0,
                  "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ConfigError(f"{name} = {getattr(self, name)!r} is out of range (lr, eps > 0; "
                              "warmup, weight_decay, dropout, betas in [0, 1); grad_clip > 0 "
                              "or None)")

    def replace(self, **changes: Any) -> GlueProtocol:
        """A copy with ``changes`` (validated); None values are ignored (CLI defaults)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def steps(self, n_train: int) -> int:
        """Optimizer steps of one run: ``epochs * ceil(n_train / batch_size)``."""
        return self.epochs * math.ceil(n_train / self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out.update(betas=list(self.betas), seeds=list(self.seeds))
        return out


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class FinetuneRuntime:
    """How fast, not what: device, autocast precision, eval batch size, progress bar."""

    device: str = option("cpu", help="cpu or cuda")
    precision: str = option("fp32", choices=("fp32", "bf16"),
                            help="autocast dtype while training")
    eval_batch_size: int = 128
    progress_bar: bool = option(True, flags="--no-progress", help="no progress bars")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned model and how its training went (``train_loss``: mean of the last epoch;
    ``losses`` and ``lrs``: per optimizer step)."""

    model: UltraFastBertForSequenceClassification
    steps: int
    train_loss: float
    train_seconds: float
    losses: tuple[float, ...] = ()
    lrs: tuple[float, ...] = ()


# ---------------------------------------------------------------------------- the model
def classifier_config(encoder: ModelConfig, task: GlueTask, protocol: GlueProtocol
                      ) -> ModelConfig:
    """The encoder's config with the task's head and the protocol's pooling and dropout."""
    return encoder.replace(num_labels=task.num_labels, label_names=task.labels or None,
                           pooler=protocol.pooler, embedding_dropout=protocol.dropout,
                           attention_dropout=protocol.dropout, hidden_dropout=protocol.dropout,
                           classifier_dropout=protocol.dropout)


def load_classifier(model_dir: str | os.PathLike, task: GlueTask, protocol: GlueProtocol,
                    seed: int, device: str = "cpu") -> UltraFastBertForSequenceClassification:
    """The encoder of ``model_dir`` under a new pooler and head initialised from ``seed``."""
    encoder = UltraFastBertModel.from_pretrained(model_dir)
    config = classifier_config(encoder.config, task, protocol)
    if protocol.max_length > config.max_seq_len:
        raise ConfigError(f"max_length {protocol.max_length} exceeds the model's max_seq_len "
                          f"{config.max_seq_len}; pass --max-length {config.max_seq_len}")
    model = UltraFastBertForSequenceClassification(config)
    model.encoder.load_state_dict(encoder.state_dict())
    torch.manual_seed(seed)
    init_weights(model.pooler, config.init_std)
    init_weights(model.head, config.init_std)
    return model.to(device)


def build_optimizer(model: torch.nn.Module, protocol: GlueProtocol) -> torch.optim.AdamW:
    """AdamW with the protocol's settings (weight decay, if any, on matrices only)."""
    return torch.optim.AdamW(parameter_groups(model, protocol.weight_decay), lr=protocol.lr,
                             betas=protocol.betas, eps=protocol.eps)


# ------------------------------------------------------------------------------ training
def finetune(model: UltraFastBertForSequenceClassification, train: EncodedSplit,
             protocol: GlueProtocol, seed: int, runtime: FinetuneRuntime | None = None,
             description: str = "finetune") -> FinetuneResult:
    """Train ``model`` in place on ``train`` for ``protocol.epochs`` with the shared loop."""
    runtime = runtime or FinetuneRuntime()
    pad_id = model.config.pad_token_id
    batches = ClassificationBatches(train, protocol.batch_size, seed, pad_id)
    steps = protocol.steps(len(train))
    loop = LoopConfig(max_steps=steps, grad_clip=protocol.grad_clip,
                      precision=runtime.precision, progress_bar=runtime.progress_bar,
                      out_dir=None, description=description)
    torch.manual_seed(seed)  # dropout masks
    trainer = Trainer(model, build_optimizer(model, protocol),
                      WarmupCosineSchedule(warmup=protocol.warmup), batches, loop)
    result = trainer.fit()
    model.eval()
    return FinetuneResult(model, result.state.step,
                          last_epoch_loss(result, batches.steps_per_epoch),
                          result.state.elapsed_s, tuple(s.loss for s in result.history),
                          tuple(s.lr for s in result.history))


def last_epoch_loss(result: TrainResult, steps_per_epoch: int) -> float:
    """Mean training loss over the last epoch's steps."""
    losses = [s.loss for s in result.history[-steps_per_epoch:]]
    return float(np.mean(losses)) if losses else float("nan")


# ---------------------------------------------------------------------------- evaluation
def predict(model: UltraFastBertForSequenceClassification, encoded: EncodedSplit,
            batch_size: int = 128) -> np.ndarray:
    """``(N,)`` predictions in input order: class indices, or real values for regression."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(encoded), dtype=np.float64)
    with torch.inference_mode():
        for index, ids, mask in eval_batches(encoded, batch_size, model.config.pad_token_id):
            logits = model(ids.to(device), mask.to(device)).logits.float().cpu()
            values = logits[:, 0] if model.config.num_labels == 1 else logits.argmax(-1)
            out[index.numpy()] = values.double().numpy()
    return out if model.config.num_labels == 1 else out.astype(np.int64)


def evaluate(model: UltraFastBertForSequenceClassification, task: GlueTask,
             evals: dict[str, EncodedSplit], batch_size: int = 128) -> SplitMetrics:
    """Every metric of ``task`` on every eval split."""
    return {name: compute_metrics(task, predict(model, enc, batch_size), enc.labels.numpy())
            for name, enc in evals.items()}


def save_finetuned(model: UltraFastBertForSequenceClassification, directory: Path,
                   tokenizer_file: Path) -> Path:
    """Write the classifier (with its tokenizer) so ``from_pretrained`` and
    ``ultrafastbert predict classify`` load it."""
    start = time.monotonic()
    model.save_pretrained(directory, tokenizer_file=tokenizer_file)
    log.info("saved %s in %.1f s", directory, time.monotonic() - start)
    return directory
