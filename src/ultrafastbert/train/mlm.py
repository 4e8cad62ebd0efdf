"""Masked-language-model pieces of pretraining: the batch source, held-out evaluation, and the
unigram baseline it is compared with.

Every rank reads and masks the whole global micro-batch and keeps its own rows. The masks
are then exactly those of a single-process run with the same global batch, and the
masking generator's state is the same on every rank (so rank 0's checkpoint resumes them
all). Reading and masking ``micro_batch x seq_len`` ids costs little next to the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, MlmMasker, SequenceStream
from ..errors import InputError
from .loop import MicroBatch

#: Seed of the masks used for held-out evaluation (fixed, so evaluations compare).
EVAL_MASK_SEED = 20231120


class MlmBatches:
    """Masked micro-batches of ``micro_batch`` packed rows (global, all ranks together).

    Args:
        stream: the training rows in a resumable order.
        masker: 25% masking, 80/10/10 (the crammed recipe).
        generator: the masking randomness; its state is part of :meth:`state_dict`.
        micro_batch: rows per global micro-batch (a multiple of the world size).
    """

    def __init__(self, stream: SequenceStream, masker: MlmMasker, generator: torch.Generator,
                 micro_batch: int) -> None:
        self.stream, self.masker, self.generator = stream, masker, generator
        self.micro_batch = micro_batch

    def next_batch(self, rank: int = 0, world_size: int = 1) -> MicroBatch:
        """``rank``'s rows of the next micro-batch: ``input_ids`` and ``labels`` of shape
        ``(micro_batch / world_size, seq_len)``, labels ``-100`` where nothing is predicted."""
        if self.micro_batch % world_size:
            raise InputError(f"the micro-batch ({self.micro_batch}) must be a multiple of the "
                             f"number of processes ({world_size}); change --micro-batch")
        ids = self.stream.next_batch(self.micro_batch)
        masked, labels = self.masker(ids, self.generator)
        share = self.micro_batch // world_size
        rows = slice(rank * share, (rank + 1) * share)
        labels = labels[rows]
        return MicroBatch({"input_ids": masked[rows], "labels": labels},
                          n_targets=int((labels != IGNORE_INDEX).sum()), n_tokens=labels.numel())

    def state_dict(self) -> dict[str, Any]:
        """Data position and masking generator state."""
        return {"stream": self.stream.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same corpus and seed)."""
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class MlmEvaluation:
    """Mean cross-entropy (nats) and top-1 accuracy over the masked positions."""

    loss: float
    accuracy: float
    n_targets: int
    n_sequences: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)``."""
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with perplexity)."""
        return {**asdict(self), "perplexity": self.perplexity}


def eval_batches(rows: np.ndarray, masker: MlmMasker, batch_size: int = 64,
                 seed: int = EVAL_MASK_SEED):
    """Yield ``(masked_ids, labels)`` ``(b, S)`` over ``rows`` ``(N, S)`` with fixed masks."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        ids = torch.from_numpy(np.asarray(rows[start:start + batch_size], dtype=np.int64))
        yield masker(ids, generator)


@torch.inference_mode()
def evaluate_mlm(model: nn.Module, rows: np.ndarray, masker: MlmMasker, *,
                 batch_size: int = 64, device: torch.device | str = "cpu") -> MlmEvaluation:
    """Held-out MLM loss and accuracy of ``model`` on ``rows`` ``(N, S)``.

    The model runs in eval mode (every FFF takes its inference kernel: same hard routes).
    Works with sparse-prediction logits ``(M, V)`` and full logits ``(b, S, V)``.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for masked, labels in eval_batches(rows, masker, batch_size):
        logits = model(masked.to(device), labels=labels.to(device)).logits.float()
        targets = labels[labels != IGNORE_INDEX].to(logits.device)
        if logits.dim() == 3:
            logits = logits[labels.to(logits.device) != IGNORE_INDEX]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    model.train(was_training)
    return MlmEvaluation(loss_sum / max(count, 1), correct / max(count, 1), count, len(rows))


def unigram_log_probs(rows: np.ndarray, vocab_size: int, special_ids: tuple[int, ...],
                      max_rows: int = 200_000) -> np.ndarray:
    """Log-probabilities ``(vocab_size,)`` of token frequencies in ``rows`` ``(N, S)``.

    Add-one smoothing over the non-special tokens; special tokens (never MLM targets) get
    probability 0. At most ``max_rows`` rows, evenly spaced, are counted.
    """
    stride = max(1, math.ceil(len(rows) / max_rows))
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(rows), 4096 * stride):
        block = np.asarray(rows[start:start + 4096 * stride:stride]).ravel()
        counts += np.bincount(block, minlength=vocab_size)[:vocab_size]
    counts += 1.0
    counts[list(special_ids)] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def evaluate_unigram(log_probs: np.ndarray, rows: np.ndarray, masker: MlmMasker,
                     batch_size: int = 64) -> MlmEvaluation:
    """The unigram baseline on the same held-out targets as :func:`evaluate_mlm`: predict
    every masked token from the corpus frequencies alone, ignoring the context."""
    table = torch.from_numpy(log_probs)
    best = int(torch.argmax(table))
    loss_sum, correct, count = 0.0, 0, 0
    for _, labels in eval_batches(rows, masker, batch_size):
        targets = labels[labels != IGNORE_INDEX]
        loss_sum -= float(table[targets].sum())
        correct += int((targets == best).sum())
        count += targets.numel()
    return MlmEvaluation(loss_sum / max(count, 1), correct / max(count, 1), count, len(rows))
