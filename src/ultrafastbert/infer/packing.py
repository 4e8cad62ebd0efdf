"""Packed tokens: a batch of variable-length texts as one ``(T, d)`` matrix of real tokens.

The encoders' linears, LayerNorms and feed-forward blocks work per token, so they run on the
``T`` real tokens only (no padded rows). Attention is the one part that mixes tokens of a text:
:meth:`Packing.attention` pads ``q, k, v`` back to ``(N, H, S, hd)`` around one
``scaled_dot_product_attention`` call with a key mask and takes the real rows out again (no
work on padding outside that call; inside it, padded queries cost ``O(S)`` each, a small
share at sentence lengths).

Rows are in text order, each text's tokens in position order: text ``n`` holds rows
``starts[n] .. starts[n] + lengths[n]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import native_attention

#: Widest padded float32 batch (tokens) whose attention runs as explicit matmuls + softmax
#: rather than PyTorch's CPU flash kernel. Measured on AMD EPYC Zen 4, 2 threads, 32 texts of
#: 12 heads of 32 (docs/model.md): float32 math/flash 0.83/1.48 ms at width 16, 2.0/2.7 at 32,
#: 4.2/5.2 at 48, 7.2/6.9 at 64, 36/12 at 96. In bfloat16 the flash kernel wins from width 32,
#: so bfloat16 streams always take it.
MATH_ATTENTION_MAX_WIDTH = 48


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(hd) + bias) v``: each ``(N, H, S, hd)``, ``bias`` ``(N, 1, 1, S)``;
    computed in float32 whatever the stream dtype (as the flash kernel accumulates)."""
    dtype = v.dtype
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores.mul_(q.shape[-1] ** -0.5)
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(scores.softmax(-1), v.float()).to(dtype)


def _slots_of(index: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The packed row ``(N * S,)`` each padded slot takes in :meth:`Packing.attention`: its own
    token's; a padding slot its text's first row (row 0 for an empty text)."""
    n_tokens, n_slots = int(index.numel()), int(lengths.numel()) * width
    if n_tokens == n_slots:
        return torch.arange(n_slots, device=index.device)
    starts = (lengths.cumsum(0) - lengths).clamp(max=max(n_tokens - 1, 0))
    slots = starts[:, None].expand(-1, width).reshape(-1).clone()
    slots[index] = torch.arange(n_tokens, device=index.device)
    return slots


@dataclass(frozen=True)
class Packing:
    """Where the ``T`` real tokens of ``N`` texts sit in a padded ``(N, S)`` batch.

    ``index`` ``(T,)``: flat ``n * S + s`` of each token; ``text`` ``(T,)``: its text ``n``;
    ``position`` ``(T,)``: its position ``s``; ``lengths`` ``(N,)``; ``keep`` ``(N, S)`` bool
    (None when no text is shorter than ``S``: then attention needs no mask); ``slots``
    ``(N * S,)``: the packed row each padded slot takes in attention (built when None).
    """

    index: torch.Tensor
    text: torch.Tensor
    position: torch.Tensor
    lengths: torch.Tensor
    keep: torch.Tensor | None
    n_texts: int
    width: int
    slots: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Packing:
        """From an attention mask ``(N, S)`` (1 = token, 0 = padding; tokens left-aligned)."""
        if mask.dim() != 2:
            raise InputError(f"attention_mask must be (batch, seq), got {tuple(mask.shape)}")
        keep = mask.bool()
        lengths = keep.sum(1)
        n_texts, width = keep.shape
        if width > 1 and bool((keep[:, 1:] > keep[:, :-1]).any()):
            raise InputError("the packed path needs right-padded rows (every text's tokens "
                             "first, then padding); left padding is not supported here")
        index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(index, index // max(width, 1), index % max(width, 1), lengths,
                   None if bool(keep.all()) else keep, n_texts, width,
                   _slots_of(index, lengths, width))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str = "cpu"
                     ) -> Packing:
        """From the token count of each text (their ids concatenated in text order)."""
        counts = torch.as_tensor(list(lengths), dtype=torch.long)
        width = int(counts.max()) if len(counts) else 0
        keep = torch.arange(width)[None, :] < counts[:, None]
        packing = cls.from_mask(keep)
        return packing if str(device) == "cpu" else packing.to(device)

    def to(self, device: torch.device | str) -> Packing:
        """The same packing with its tensors on ``device``."""
        move = {k: getattr(self, k).to(device) for k in ("index", "text", "position", "lengths")}
        keep = None if self.keep is None else self.keep.to(device)
        slots = None if self.slots is None else self.slots.to(device)
        return Packing(**move, keep=keep, n_texts=self.n_texts, width=self.width, slots=slots)

    @property
    def n_tokens(self) -> int:
        """``T``, the real tokens."""
        return int(self.index.numel())

    @property
    def starts(self) -> torch.Tensor:
        """Row of each text's first token ``(N,)`` (its length is 0 where a text is empty)."""
        return self.lengths.cumsum(0) - self.lengths

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``(N, S, ...)`` -> ``(T, ...)``: the real positions' rows."""
        return padded.reshape(self.n_texts * self.width, *padded.shape[2:])[self.index]

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """``(T, ...)`` -> ``(N, S, ...)`` with zeros at padded positions."""
        if self.keep is None:
            return rows.reshape(self.n_texts, self.width, *rows.shape[1:])
        out = rows.new_zeros(self.n_texts * self.width, *rows.shape[1:])
        out[self.index] = rows
        return out.view(self.n_texts, self.width, *rows.shape[1:])

    def attention(self, qkv: torch.Tensor, n_heads: int, layout: str = "blocks"
                  ) -> torch.Tensor:
        """Self-attention of each text over its own tokens: ``qkv`` ``(T, 3d)`` -> ``(T, d)``.

        ``layout`` ``"blocks"``: ``[q | k | v]`` (Hugging Face BERT); ``"heads"``:
        ``[head][q, k, v][head_dim]`` (the project's encoder). Where the native op is available
        (:mod:`~ultrafastbert.infer.native_attention`) and the batch is no wider than
        :data:`~ultrafastbert.infer.native_attention.MAX_WIDTH`, it runs there on the packed rows (no padding).
        Otherwise padded slots are filled by a gather from real rows (masked as keys, their
        queries dropped), not zeroed; float32 batches no wider than
        :data:`MATH_ATTENTION_MAX_WIDTH` run as two batched matmuls and a softmax (faster than
        PyTorch's CPU flash kernel at sentence widths), the others as one
        ``scaled_dot_product_attention``.
        """
        if self.width <= native_attention.MAX_WIDTH and native_attention.usable(qkv):
            return native_attention.packed_attention(qkv, self.starts, self.lengths, n_heads,
                                                     layout)
        d = qkv.shape[1] // 3
        padded = qkv.index_select(0, self._slots)  # (N * S, 3d): every slot a real row
        if layout == "blocks":
            parts = padded.view(self.n_texts, self.width, 3, n_heads, d // n_heads)
            q, k, v = parts.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            parts = padded.view(self.n_texts, self.width, n_heads, 3, d // n_heads)
            q, k, v = parts.permute(3, 0, 2, 1, 4).unbind(0)  # each (N, H, S, hd)
        if self.width <= MATH_ATTENTION_MAX_WIDTH and qkv.dtype == torch.float32:
            context = _math_attention(q, k, v, self._key_bias())
        else:
            mask = None if self.keep is None else self.keep[:, None, None, :]
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # (N, H, S, hd) -> the real tokens' rows (T, H, hd) in one gather -> (T, d)
        return context.transpose(1, 2)[self.text, self.position].reshape(-1, d)

    @property
    def _slots(self) -> torch.Tensor:
        """For each padded slot ``n * S + s`` ``(N * S,)``, the packed row it takes: its own
        token's, or (padding) the text's first row, or row 0 for an empty text (built with the
        packing: :func:`_slots_of`)."""
        return _slots_of(self.index, self.lengths, self.width) if self.slots is None \
            else self.slots

    def _key_bias(self) -> torch.Tensor | None:
        """Additive float32 key mask ``(N, 1, 1, S)``: 0 at tokens, -inf at padding (None: no
        padding)."""
        if self.keep is None:
            return None
        bias = torch.zeros(self.keep.shape, dtype=torch.float32, device=self.keep.device)
        return bias.masked_fill_(~self.keep, float("-inf"))[:, None, None, :]

    def mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean of each text's rows: ``(T, d)`` -> ``(N, d)`` (zeros for an empty text)."""
        total = rows.new_zeros(self.n_texts, rows.shape[1]).index_add_(0, self.text, rows)
        return total / self.lengths.clamp(min=1).to(rows.dtype)[:, None]

    def first(self, rows: torch.Tensor) -> torch.Tensor:
        """Each text's first row: ``(T, d)`` -> ``(N, d)`` (zeros for an empty text)."""
        if bool((self.lengths > 0).all()):
            return rows[self.starts]
        out = rows.new_zeros(self.n_texts, rows.shape[1])
        has = self.lengths > 0
        out[has] = rows[self.starts[has]]
        return out

    def pooled(self, rows: torch.Tensor, pooling: str) -> torch.Tensor:
        """``mean`` or ``first`` pooling of ``rows`` ``(T, d)`` -> ``(N, d)``."""
        if pooling == "first":
            return self.first(rows)
        return self.mean(rows)
