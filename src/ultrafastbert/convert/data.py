"""Unlabeled text for distillation, tokenized with the source's tokenizer, and teacher targets.

Every document of the corpus (the pretraining readers: demo, text, JSONL, Parquet, HF datasets)
becomes one input as the source model sees it in use: ``[CLS] text [SEP]`` truncated to
``max_len``. Segments are stored as padded rows, so the project's resumable
:class:`~ultrafastbert.data.packing.SequenceStream` serves them in a seeded order; batches are
cut to their longest row.

:class:`TeacherBatches` is the training loop's ``BatchSource``: it runs the frozen dense model on
each batch and hands the student both the text and what the teacher made of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.corpus import open_corpus
from ..data.packing import SequenceStream
from ..errors import DataError, InputError
from ..model.converted import DenseFFN, base_model_of, family_of
from ..train.loop import MicroBatch

log = logging.getLogger(__name__)

MODES = ("layerwise", "end-to-end")


def load_segments(corpus: str | None, tokenizer_dir: Path, *, max_len: int = 128,
                  max_documents: int | None = None, pad_id: int = 0) -> np.ndarray:
    """Token rows ``(N, max_len)`` int32 (padded with ``pad_id``), one per non-empty document."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_len)
    tokenizer.no_padding()
    rows: list[list[int]] = []
    for batch in open_corpus(corpus).batches(1024):
        batch = [t for t in batch if t.strip()]
        rows.extend(e.ids for e in tokenizer.encode_batch(batch) if len(e.ids) > 2)
        if max_documents is not None and len(rows) >= max_documents:
            rows = rows[:max_documents]
            break
    if not rows:
        raise DataError(f"the corpus {corpus or 'demo'!r} holds no text the tokenizer turns into "
                        "tokens; give a corpus with text in it")
    out = np.full((len(rows), max_len), pad_id, dtype=np.int32)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = ids
    log.info("distillation corpus: %d segments, %d tokens", len(rows),
             int((out != pad_id).sum()))
    return out


@dataclass(frozen=True)
class TextBatch:
    """``input_ids`` and ``attention_mask`` ``(B, S)``, ``S`` the longest row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device) -> TextBatch:
        """The same batch on ``device``."""
        if self.input_ids.device == device:
            return self
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device))


def cut_batch(rows: torch.Tensor, pad_id: int) -> TextBatch:
    """Mask the padding of ``rows`` ``(B, L)`` and drop the columns no row uses."""
    mask = (rows != pad_id).long()
    length = int(mask.sum(1).max())
    return TextBatch(rows[:, :length].long(), mask[:, :length])


class TeacherBatches:
    """Batches of text with the dense teacher's targets (a ``BatchSource``).

    ``mode="layerwise"``: ``inputs = {"x": (L, T, d), "y": (L, T, d)}``, each layer's
    feed-forward input and dense output on the ``T`` real tokens of the batch.
    ``mode="end-to-end"``: ``inputs = {"input_ids", "attention_mask", "teacher_hidden":
    (L', B, S, d), "teacher_pooled": (B, d)}``: every layer's output (``layers="all"``,
    ``L' = L``) or the last layer's (``layers="last"``, ``L' = 1``).

    End to end, the teacher's last hidden states and pooled embedding of each row are kept
    (``cache_bytes`` at most; ``layers="last"`` only), so later epochs skip the teacher's
    forward pass: 40% of a MiniLM 8x7 step. A cached row can differ from a fresh forward pass in
    the last bits (the batch it was computed in had another shape).
    """

    def __init__(self, teacher: Any, stream: SequenceStream, *, batch_size: int,
                 mode: str, pad_id: int, pooling: str = "mean", layers: str = "all",
                 cache_bytes: int = 0) -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        if layers not in ("last", "all"):
            raise InputError(f"layers must be 'last' or 'all', got {layers!r}")
        self.teacher, self.stream, self.batch_size = teacher.eval(), stream, batch_size
        self.device = next(teacher.parameters()).device
        self.mode, self.pad_id, self.pooling, self.layers = mode, pad_id, pooling, layers
        self.cache_bytes = cache_bytes if mode == "end-to-end" and layers == "last" else 0
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cached_bytes = 0

    def next_batch(self, rank: int, world_size: int) -> MicroBatch:
        """The next batch with the teacher's targets (one process: ``rank`` 0)."""
        share = self.batch_size // max(world_size, 1)
        picked = self.stream.rows_at(self.stream.position + rank * share, share)
        text = cut_batch(self.stream.next_batch(self.batch_size, rank=rank,
                                                world_size=world_size), self.pad_id)
        text = text.to(self.device)  # the batch and the teacher's targets on its device
        if self.mode == "layerwise":
            x, y = ffn_io(self.teacher, text)
            return MicroBatch({"x": x, "y": y}, n_targets=x.shape[1], n_tokens=x.shape[1])
        hidden, pooled = self.targets(picked, text)
        inputs = {"input_ids": text.input_ids, "attention_mask": text.attention_mask,
                  "teacher_hidden": hidden, "teacher_pooled": pooled}
        return MicroBatch(inputs, n_targets=text.input_ids.shape[0],
                          n_tokens=int(text.attention_mask.sum()))

    def targets(self, picked: np.ndarray, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's hidden states ``(L', B, S, d)`` and pooled ``(B, d)`` for rows
        ``picked`` ``(B,)`` (from the cache where every row is in it)."""
        if self.cache_bytes and all(int(i) in self.cache for i in picked):
            return self.from_cache(picked, text)
        if self.layers == "last":  # the last layer's output alone: no stack of every layer's
            last, pooled = teacher_outputs(self.teacher, text, self.pooling)
            hidden = last[None]
        else:
            hidden, pooled = teacher_layers(self.teacher, text, self.pooling)
        if self.cache_bytes:
            self.remember(picked, text, hidden[0], pooled)
        return hidden, pooled

    def remember(self, picked: np.ndarray, text: TextBatch, last: torch.Tensor,
                 pooled: torch.Tensor) -> None:
        """Keep rows ``picked``' last hidden states (their real tokens) and pooled embeddings
        while the cache has room."""
        lengths = text.attention_mask.sum(1).tolist()
        for i, (row, n) in enumerate(zip(picked.tolist(), lengths, strict=True)):
            size = (n + 1) * last.shape[-1] * last.element_size()
            if row in self.cache or self.cached_bytes + size > self.cache_bytes:
                continue
            self.cache[row] = (last[i, :n].clone(), pooled[i].clone())
            self.cached_bytes += size

    def from_cache(self, picked: np.ndarray, text: TextBatch
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, B, S, d)`` (zeros at padding) and ``(B, d)`` from the cache."""
        entries = [self.cache[int(i)] for i in picked]
        batch, length = text.input_ids.shape
        hidden = entries[0][0].new_zeros(1, batch, length, entries[0][0].shape[-1])
        for i, (last, _) in enumerate(entries):
            hidden[0, i, :len(last)] = last
        return hidden, torch.stack([p for _, p in entries])

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (the teacher is deterministic)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.stream.load_state_dict(state)


@torch.no_grad()
def ffn_io(teacher: Any, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's feed-forward input and dense output on the real tokens: ``(L, T, d)`` each."""
    family = family_of(teacher.config.model_type)
    dense = [family.read_ffn(layer) for layer in family.layers(base_model_of(teacher))]
    xs = block_inputs(teacher, text)
    return xs, dense_outputs(dense, xs)


@torch.no_grad()
def block_inputs(model: Any, text: TextBatch) -> torch.Tensor:
    """Each layer's feed-forward input on the real tokens ``(L, T, d)``, for a source or a
    converted model (the input of whatever block the layer holds)."""
    family = family_of(model.config.model_type)
    layers = family.layers(base_model_of(model))
    captured: list[torch.Tensor] = []
    hooks = [family.ffn_module(layer).register_forward_hook(
        lambda _m, args, _out: captured.append(args[0])) for layer in layers]
    try:
        base_model_of(model)(input_ids=text.input_ids, attention_mask=text.attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    real = text.attention_mask.bool()
    return torch.stack([c[real] for c in captured])


def dense_outputs(dense: list[DenseFFN], xs: torch.Tensor) -> torch.Tensor:
    """``(L, T, d)`` dense outputs for ``(L, T, d)`` inputs."""
    return torch.stack([ffn(x) for ffn, x in zip(dense, xs, strict=True)])


@torch.no_grad()
def teacher_outputs(teacher: Any, text: TextBatch, pooling: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states ``(B, S, d)`` and pooled embeddings ``(B, d)`` of the teacher."""
    hidden = base_model_of(teacher)(input_ids=text.input_ids,
                                    attention_mask=text.attention_mask).last_hidden_state
    return hidden, pool_hidden(hidden, text.attention_mask, pooling)


@torch.no_grad()
def teacher_layers(teacher: Any, text: TextBatch, pooling: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's output ``(L, B, S, d)`` and the pooled embeddings ``(B, d)``."""
    out = base_model_of(teacher)(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                 output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[1:])
    return hidden, pool_hidden(hidden[-1], text.attention_mask, pooling)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence embedding ``(B, d)`` from ``hidden`` ``(B, S, d)``: masked mean or first token."""
    from ..model.heads import pool

    return pool(hidden, mask, pooling)
