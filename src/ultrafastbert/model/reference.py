"""A plain float64 re-statement of the encoder, to check the fast path against.

Explicit attention arithmetic (no SDPA), the FFF by ``fff_reference`` (one tree and level at a
time), every feed-forward row computed (padding included), all in float64 from the module's
weights. :func:`compare_layerwise` feeds each layer the fast path's own input ("teacher
forcing"), so one route flip does not cascade, and leaves out the rows whose FFF path passes a
logit within ``margin`` of 0 (where a rounding difference legitimately changes the route).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..fff import FFF, fff_reference
from .encoder import (
    MASK_VALUE,
    DenseFeedForward,
    EncoderLayer,
    UltraFastBertModel,
    attention_bias,
    padding_mask,
    token_rows,
)

INF = float("inf")


def encoder_layers(model: UltraFastBertModel) -> list[EncoderLayer]:
    """The model's layers, typed (an ``nn.ModuleList`` yields plain modules)."""
    return [cast(EncoderLayer, layer) for layer in model.layers]


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(),
                        norm.eps)


def reference_embedding(model: UltraFastBertModel, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` ids -> ``(B, S, d)`` float64: token + scale * sinusoid, LayerNorm."""
    emb = model.embedding
    table = emb.pos_embedding.table[: input_ids.shape[1]].double()
    scale = emb.pos_embedding.scale_factor.double()
    x = emb.word_embedding.weight.double()[input_ids] + scale * table
    return _ln(x, emb.norm)


def reference_attention(layer: EncoderLayer, h: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Self-attention + output projection on normalised ``h`` ``(B, S, d)`` float64."""
    attn = layer.attn.self_attention
    batch, seq, d_model = h.shape
    qkv = (h @ attn.query_key_value.weight.double().T).view(batch, seq, attn.n_heads, 3, -1)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, hd), [q, k, v]
    scores = q @ k.transpose(-1, -2) / attn.head_dim**0.5
    if attention_mask is not None:
        scores = scores + (1.0 - attention_mask.double())[:, None, None, :] * MASK_VALUE
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, d_model)
    return context @ layer.attn.dense.weight.double().T


def reference_feed_forward(ffn: DenseFeedForward | FFF, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed-forward of ``h`` ``(B, S, d)`` float64 -> ``(out, margin)``; ``margin`` ``(B, S)`` is
    the smallest ``|logit|`` on each row's FFF paths (inf for a dense block)."""
    flat = h.reshape(-1, h.shape[-1])
    if isinstance(ffn, FFF):
        trace = fff_reference(flat, ffn.linear_in.weight, ffn.linear_in.bias,
                              ffn.linear_out.weight, ffn.n_trees, ffn.depth)
        margin = trace.logits.abs().flatten(1).amin(dim=1)
        return trace.y.double().view_as(h), margin.view(h.shape[:-1])
    hidden = F.gelu(flat @ ffn.linear_in.weight.double().T)
    out = hidden @ ffn.linear_out.weight.double().T
    return out.view_as(h), torch.full(h.shape[:-1], INF, dtype=torch.float64, device=h.device)


def reference_layer(layer: EncoderLayer, x: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-LN layer (dropout off) -> ``(output (B, S, d) float64, margin (B, S))``."""
    x = x.double() + reference_attention(layer, _ln(x.double(), layer.norm1), attention_mask)
    ff, margin = reference_feed_forward(layer.ffn, _ln(x, layer.norm2))
    return x + ff, margin


def reference_forward(model: UltraFastBertModel, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole encoder in float64 -> ``(hidden (B, S, d), margin (B, S))``, ``margin`` the
    smallest path ``|logit|`` of each token over all layers."""
    with torch.no_grad():
        x = reference_embedding(model, input_ids)
        margin = torch.full(input_ids.shape, INF, dtype=torch.float64, device=x.device)
        for layer in encoder_layers(model):
            x, layer_margin = reference_layer(layer, x, attention_mask)
            margin = torch.minimum(margin, layer_margin)
        return _ln(x, model.final_norm), margin


@dataclass(frozen=True)
class LayerwiseReport:
    """Largest ``|fast - reference|`` over the compared rows (absolute, and relative to the
    reference's RMS), and how many (row, step) pairs were compared or left out (a path logit
    within the margin of 0 at that layer)."""

    max_abs_error: float
    max_rel_error: float
    rows_compared: int
    rows_excluded: int

    def ok(self, tolerance: float) -> bool:
        """Whether the relative error is within ``tolerance`` and some rows were compared."""
        return self.rows_compared > 0 and self.max_rel_error <= tolerance


def compare_layerwise(model: UltraFastBertModel, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, margin: float = 1e-4
                      ) -> LayerwiseReport:
    """Run the model's fast path (as configured: its mode, dtype and kernels) step by step and
    compare every step (embedding, each layer, final norm) with the float64 reference fed the
    same input. Padding rows are left out, and so are a layer's rows whose FFF path passes a
    logit within ``margin`` of 0 (a rounding difference may legitimately flip that route).
    """
    keep = padding_mask(attention_mask)
    real = (torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None else attention_mask.bool())
    with torch.no_grad():
        x = model.embedding(input_ids)
        bias, rows = attention_bias(keep, x.dtype), token_rows(keep)
        steps = [(x, reference_embedding(model, input_ids), real)]
        for layer in encoder_layers(model):
            ref, layer_margin = reference_layer(layer, x, attention_mask)
            x = layer(x, bias, rows)
            steps.append((x, ref, real & (layer_margin >= margin)))
        steps.append((model.final_norm(x), _ln(x.double(), model.final_norm), real))
    return _report(steps, int(real.sum()))


def _report(steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_real: int
            ) -> LayerwiseReport:
    abs_err, rel_err, compared = 0.0, 0.0, 0
    for fast, ref, rows in steps:
        if not bool(rows.any()):
            continue
        err = float((fast.double() - ref)[rows].abs().max())
        scale = float(ref[rows].pow(2).mean().sqrt())
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / max(scale, 1e-12))
        compared += int(rows.sum())
    return LayerwiseReport(abs_err, rel_err, compared, n_real * len(steps) - compared)
