"""The inference path for embeddings and classification: packed tokens, precision per part.

A :class:`FastEncoder` runs a model's own modules (its embeddings, norms, FFF or dense
feed-forward blocks, pooler and head) on packed tokens (:mod:`.packing`: no padded rows through
the linears, norms and feed-forward blocks), with its dense linears built for a precision
(:mod:`.precision`: Q/K/V fused into one GEMM). Two kinds exist:

- :class:`PackedBert`: ``transformers`` BERT and RoBERTa models, converted to FFF or dense
  (post-LN layers: ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``);
- :class:`PackedNative`: the project's crammedBERT / UltraFastBERT encoder (pre-LN).

They compute what the model's own forward computes on the real tokens (tested against it, on
padded batches, at float32: routes, values and pooled embeddings). The model is not changed:
float32 shares its parameters; the other precisions keep converted copies of the linears and
norms. Models of other layouts (DistilBERT) have no fast encoder: :func:`fast_encoder` returns
None and the Predictor runs the padded path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..fff import FFF
from .packing import Packing
from .precision import STREAM_DTYPES, fff_at, fused, make_linear, norm_for

logger = logging.getLogger(__name__)


class FastEncoder(nn.Module):
    """Packed inference over a model: ``hidden(ids (T,), packing) -> (T, d)`` final states."""

    precision: str
    dtype: torch.dtype

    def hidden(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Final hidden states ``(T, d)`` of the packed token ids ``ids`` ``(T,)``."""
        raise NotImplementedError

    def class_logits(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Classifier logits ``(N, num_labels)`` (models with a sequence-classification head)."""
        raise NotImplementedError


# ---------------------------------------------------------------------- transformers BERT
class PackedBertLayer(nn.Module):
    """One post-LN BERT layer on packed rows ``(T, d)`` -> ``(T, d)``."""

    def __init__(self, layer: Any, precision: str):
        super().__init__()
        dtype = STREAM_DTYPES[precision]
        attn = layer.attention
        self.n_heads = int(attn.self.num_attention_heads)
        self.qkv = make_linear(fused([attn.self.query, attn.self.key, attn.self.value]),
                               precision)
        self.out = make_linear(attn.output.dense, precision)
        self.norm1 = norm_for(attn.output.LayerNorm, dtype)
        self.ffn = _feed_forward(layer, precision)
        self.norm2 = norm_for(layer.output.LayerNorm, dtype)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``x`` ``(T, d)`` -> ``(T, d)``."""
        x = self.norm1(self.out(packing.attention(self.qkv(x), self.n_heads)) + x)
        return self.norm2(self.ffn(x) + x)


class DenseBlock(nn.Module):
    """A dense feed-forward block ``out(act(in(x)))`` at a precision, ``(T, d)`` -> ``(T, d)``."""

    def __init__(self, linear_in: nn.Linear, act: Any, linear_out: nn.Linear, precision: str):
        super().__init__()
        self.linear_in = make_linear(linear_in, precision)
        self.act = act
        self.linear_out = make_linear(linear_out, precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear_out(self.act(self.linear_in(x)))


class InDtype(nn.Module):
    """A block kept in its own dtype (an FFF in float32 in a bfloat16 stream): cast in and out."""

    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.block, self.dtype = block, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dtype == self.dtype:
            return self.block(x)
        return self.block(x.to(self.dtype)).to(x.dtype)


def _block_dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def _feed_forward(layer: Any, precision: str) -> nn.Module:
    """The layer's feed-forward block: its FFF block as is (in its own dtype), or its dense
    block with the linears at ``precision``; ``(T, d)`` -> ``(T, d)`` without the residual."""
    inter, out = layer.intermediate, layer.output
    if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(
            getattr(out, "dense", None), nn.Linear):
        return DenseBlock(inter.dense, inter.intermediate_act_fn, out.dense, precision)
    if not any(True for _ in inter.parameters()):
        return inter  # a removed block (zeros)
    block = fff_at(inter, precision)
    return InDtype(block, _block_dtype(block))


def packed_token_types(ids: torch.Tensor, packing: Packing, sep_id: int) -> torch.Tensor:
    """BERT's token types ``(T,)`` of packed ``ids``: 1 after each text's first separator."""
    sep = (ids == sep_id).long()
    before = sep.cumsum(0) - sep  # separators strictly before each row, over all texts
    at_start = before[packing.starts.clamp(max=max(ids.numel() - 1, 0))]
    return ((before - at_start[packing.text]) > 0).long()


class PackedBert(FastEncoder):
    """A ``transformers`` BERT / RoBERTa model (converted or dense) on packed tokens."""

    def __init__(self, model: Any, precision: str, sep_id: int | None):
        super().__init__()
        from ..model.converted import base_model_of

        self.precision, self.dtype = precision, STREAM_DTYPES[precision]
        base: Any = base_model_of(model)
        emb = base.embeddings
        self.word, self.position = emb.word_embeddings, emb.position_embeddings
        self.types = getattr(emb, "token_type_embeddings", None)
        self.emb_norm = emb.LayerNorm
        # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
        self.position_offset = (int(emb.padding_idx) + 1 if "roberta" in model.config.model_type
                                else 0)
        self.sep_id = sep_id if self.types is not None and self.types.num_embeddings > 1 else None
        self.layers = nn.ModuleList(PackedBertLayer(layer, precision)
                                    for layer in base.encoder.layer)
        self.pooler = None if getattr(base, "pooler", None) is None else \
            make_linear(base.pooler.dense, precision)
        self.classifier = getattr(model, "classifier", None)
        self.config = model.config

    def hidden(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:  # noqa: D102
        x = self.word(ids) + self.position(packing.position + self.position_offset)
        if self.types is not None:
            if self.sep_id is None:
                x = x + self.types.weight[0]
            else:
                x = x + self.types(packed_token_types(ids, packing, self.sep_id))
        x = self.emb_norm(x).to(self.dtype)
        for layer in self.layers:
            x = layer(x, packing)
        return x

    def class_logits(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:  # noqa: D102
        if self.classifier is None:
            raise TypeError("this model has no sequence-classification head")
        first = packing.first(self.hidden(ids, packing))
        if "roberta" in self.config.model_type:  # its head pools <s> itself
            return self.classifier(first[:, None, :].to(_block_dtype(self.classifier)))
        assert self.pooler is not None
        pooled = torch.tanh(self.pooler(first))
        return self.classifier(pooled.to(_block_dtype(self.classifier)))


# --------------------------------------------------------------------- the project's encoder
class PackedNativeLayer(nn.Module):
    """One pre-LN layer of :class:`~ultrafastbert.model.encoder.UltraFastBertModel`."""

    def __init__(self, layer: Any, precision: str):
        super().__init__()
        dtype = STREAM_DTYPES[precision]
        attn = layer.attn
        self.n_heads = int(attn.self_attention.n_heads)
        self.qkv = make_linear(attn.self_attention.query_key_value, precision)
        self.out = make_linear(attn.dense, precision)
        self.norm1, self.norm2 = norm_for(layer.norm1, dtype), norm_for(layer.norm2, dtype)
        ffn = fff_at(layer.ffn, precision) if isinstance(layer.ffn, FFF) else layer.ffn
        self.ffn: nn.Module = (InDtype(ffn, _block_dtype(ffn)) if isinstance(ffn, FFF) else
                               DenseBlock(ffn.linear_in, nn.functional.gelu, ffn.linear_out,
                                          precision))

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """``x`` ``(T, d)`` -> ``(T, d)``."""
        x = x + self.out(packing.attention(self.qkv(self.norm1(x)), self.n_heads, "heads"))
        return x + self.ffn(self.norm2(x))


class PackedNative(FastEncoder):
    """The project's encoder (with or without a head) on packed tokens."""

    def __init__(self, model: Any, precision: str):
        super().__init__()
        from ..model.heads import UltraFastBertForSequenceClassification

        self.precision, self.dtype = precision, STREAM_DTYPES[precision]
        encoder = getattr(model, "encoder", model)
        self.embedding = encoder.embedding
        self.layers = nn.ModuleList(PackedNativeLayer(layer, precision)
                                    for layer in encoder.layers)
        self.final_norm = norm_for(encoder.final_norm, self.dtype)
        self.head = model if isinstance(model, UltraFastBertForSequenceClassification) else None

    def hidden(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:  # noqa: D102
        emb: Any = self.embedding
        x = emb.word_embedding(ids) + emb.pos_embedding.scale_factor * \
            emb.pos_embedding.table[packing.position]
        x = emb.norm(x).to(self.dtype)
        for layer in self.layers:
            x = layer(x, packing)
        return self.final_norm(x)

    def class_logits(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:  # noqa: D102
        if self.head is None:
            raise TypeError("this model has no sequence-classification head")
        pooler = self.head.pooler
        pooled = packing.pooled(self.hidden(ids, packing), pooler.scheme)
        pooled = pooled.to(_block_dtype(pooler.dense))
        return self.head.head(pooler.activation(pooler.dense(pooled)))


def fast_encoder(model: nn.Module, precision: str, sep_id: int | None = None
                 ) -> FastEncoder | None:
    """The packed encoder of ``model`` at ``precision``, or None for a layout without one."""
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: packed caches version them
        return _build(model, precision, sep_id)


def _build(model: nn.Module, precision: str, sep_id: int | None) -> FastEncoder | None:
    from ..model.pretrained import PretrainedMixin

    if isinstance(model, PretrainedMixin):
        return PackedNative(model, precision).eval()
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type.removeprefix("ultrafastbert-") in ("bert", "roberta"):
        return PackedBert(model, precision, sep_id).eval()
    logger.info("no packed encoder for model_type %r: the padded path runs", model_type)
    return None
