"""The UltraFastBERT encoder: crammedBERT with a dense or fast feedforward block, top to bottom.

    embedding   token embedding + learnable scalar * sinusoid table -> LayerNorm -> dropout
    n_layers x  x = x + dropout(attn(norm1(x)));  x = x + dropout(ffn(norm2(x)))   (pre-LN)
    final_norm  LayerNorm

Module names match the released checkpoint ``pbelcak/UltraFastBERT-1x11-long`` (docs/design.md §1.4),
so its state dict loads by name (``checkpoint.py`` handles the few format differences).

Padding: keys whose attention mask is 0 get -10000 added to their scores, as in the original.
Padded positions never influence real ones, so the feed-forward block runs only on the real
tokens' rows; hidden states at padded positions are not meaningful.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, InputTypeError
from ..fff import FFF
from .config import DenseFF, ModelConfig
from .linear import InferenceLinear
from .pretrained import PretrainedMixin

logger = logging.getLogger(__name__)

#: Added to the attention scores of masked keys (the original's value, not -inf).
MASK_VALUE = -10000.0


# ----------------------------------------------------------------------------------- embedding
def sinusoid_table(n_positions: int, dim: int, device: torch.device | str | None = None
                   ) -> torch.Tensor:
    """The standard sinusoid table ``(n_positions, dim)``: sin on even channels, cos on odd."""
    position = torch.arange(n_positions, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class ScaledSinusoid(nn.Module):
    """Fixed sinusoid table times a learnable scalar ``scale_factor`` (init ``1/sqrt(dim)``)."""

    table: torch.Tensor  # (max_positions, dim), a non-persistent buffer

    def __init__(self, dim: int, max_positions: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.tensor([dim**-0.5]))
        self.register_buffer("table", sinusoid_table(max_positions, dim), persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        """Position embeddings ``(seq_len, dim)``."""
        return self.scale_factor * self.table[:seq_len]


class Embedding(nn.Module):
    """Token embedding (padding row zero at init) plus scaled sinusoid, then LayerNorm, dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model,
                                           padding_idx=config.pad_token_id)
        self.pos_embedding = ScaledSinusoid(config.d_model, config.max_seq_len)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` ``(B, S)`` int64 -> ``(B, S, d)``."""
        embeds = self.word_embedding(input_ids) + self.pos_embedding(input_ids.shape[1])
        return self.dropout(self.norm(embeds))


# ----------------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused, bias-free QKV projection.

    The projection's ``3*d`` outputs are laid out Megatron/NeoX style, grouped per head as
    ``[head][q, k, v][head_dim]``, not as ``[q | k | v]`` blocks (Hugging Face BERT).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.query_key_value = InferenceLinear(config.d_model, 3 * config.d_model, bias=False)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B, S, d)``, additive ``bias`` ``(B, 1, 1, S)`` or None -> ``(B, S, d)``."""
        batch, seq, d_model = x.shape
        qkv = self.query_key_value(x).view(batch, seq, self.n_heads, 3, self.head_dim)
        query, key, value = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, H, S, head_dim)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0)
        return context.transpose(1, 2).reshape(batch, seq, d_model)


class Attention(nn.Module):
    """Self-attention followed by the bias-free output projection ``dense``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attention = SelfAttention(config)
        self.dense = InferenceLinear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``(B, S, d)`` -> ``(B, S, d)``."""
        return self.dense(self.self_attention(x, bias))


# -------------------------------------------------------------------------------- feed-forward
class DenseFeedForward(nn.Module):
    """``linear_in`` ``(width, d)`` -> exact GELU -> ``linear_out`` ``(d, width)``, no biases."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.linear_in = InferenceLinear(d_model, width, bias=False)
        self.linear_out = InferenceLinear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., d)``."""
        return self.linear_out(F.gelu(self.linear_in(x)))


def feed_forward(config: ModelConfig) -> DenseFeedForward | FFF:
    """The block ``config.ff`` describes: a dense GELU MLP or an FFF (input bias, no output bias)."""
    if isinstance(config.ff, DenseFF):
        return DenseFeedForward(config.d_model, config.ff.width)
    return FFF(config.d_model, n_trees=config.ff.n_trees, depth=config.ff.depth, bias=True)


# ------------------------------------------------------------------------------------- layers
class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: attention then feed-forward, each with a residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ffn = feed_forward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                rows: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B, S, d)``; ``rows``: flat indices of real tokens, or None for all."""
        x = x + self.dropout(self.attn(self.norm1(x), bias))
        if rows is None:
            return x + self.dropout(self._feed_forward(self.norm2(x)))
        flat = x.reshape(-1, x.shape[-1])
        update = self.dropout(self._feed_forward(self.norm2(flat.index_select(0, rows))))
        return flat.index_add(0, rows, update).view_as(x)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The block in its own precision (an FFF may be kept in fp32 in a bf16 model)."""
        dtype = self.ffn.linear_in.weight.dtype
        return self.ffn(h.to(dtype)).to(h.dtype)


# ------------------------------------------------------------------------------------ encoder
@dataclass
class EncoderOutput:
    """``last_hidden_state`` ``(B, S, d)`` after the final LayerNorm."""

    last_hidden_state: torch.Tensor


def _check_inputs(config: ModelConfig, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> None:
    """Raise a clear error for inputs the encoder cannot take."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise InputError(f"input_ids must be a (batch, seq) tensor, got {shape!r}; "
                         "add a batch dimension with input_ids.unsqueeze(0)")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputTypeError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
    if input_ids.shape[1] > config.max_seq_len:
        raise InputError(f"sequence length {input_ids.shape[1]} exceeds the position table "
                         f"(max_seq_len={config.max_seq_len}); truncate the input")
    # Reading a value is a graph break under torch.compile; there the embedding's own bounds
    # check (compiled code checks indirect indexing) reports a bad id instead.
    if (not torch.compiler.is_compiling() and input_ids.numel()
            and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size)):
        bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)][0].item()
        raise InputError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size}); "
                         "was the text tokenised with this model's tokenizer?")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)} (1 = token, 0 = padding)")


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``attention_mask`` as bool ``(B, S)`` (True = token), or None when nothing is padding."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    return None if bool(keep.all()) else keep


def attention_bias(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key bias ``(B, 1, 1, S)`` from ``keep`` ``(B, S)``: 0 for tokens, -10000 else."""
    if keep is None:
        return None
    keep = keep[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, MASK_VALUE)


def token_rows(keep: torch.Tensor | None) -> torch.Tensor | None:
    """Flat ``(B*S)`` indices ``(T,)`` of the real tokens in ``keep`` ``(B, S)``, or None."""
    return None if keep is None else keep.reshape(-1).nonzero().squeeze(1)


class UltraFastBertModel(PretrainedMixin, nn.Module):
    """The encoder: embedding, ``n_layers`` pre-LN layers, final LayerNorm.

    ``forward(input_ids (B, S), attention_mask (B, S) or None) -> EncoderOutput``. In eval mode
    without gradients every FFF uses the fastest kernel the dispatcher allows
    (:meth:`set_fff_runtime` chooses one explicitly).
    """

    checkpoint_prefix = "encoder."  # its tensors are stored as in the models with heads

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self._hinted = False  # logged once: eval mode with autograd on is not the fast path
        init_weights(self, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                first_row: bool = False) -> EncoderOutput:
        """``input_ids`` ``(B, S)`` int64, ``attention_mask`` ``(B, S)`` 1/0 -> ``(B, S, d)``.

        The feed-forward blocks skip padded positions; ``first_row`` computes position 0 of
        every row even where it is padding (left padding), as the original model does: first-
        token pooling reads it.
        """
        _check_inputs(self.config, input_ids, attention_mask)
        if (not self.training and torch.is_grad_enabled() and not self._hinted
                and not torch.compiler.is_compiling()):
            self._hinted = True
            logger.info("eval mode with autograd on: the FFF blocks and linear layers take "
                        "their differentiable paths; run inference under torch.inference_mode() "
                        "(or no_grad) for the fast kernels")
        x = self.embedding(input_ids)
        keep = padding_mask(attention_mask)
        computed = keep
        if first_row and keep is not None and not bool(keep[:, 0].all()):
            computed = keep.clone()
            computed[:, 0] = True
        bias, rows = attention_bias(keep, x.dtype), token_rows(computed)
        for layer in self.layers:
            x = layer(x, bias, rows)
        return EncoderOutput(self.final_norm(x))


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """The released recipe's init: Linear/Embedding ~ N(0, std), biases 0, padding row 0,
    LayerNorm (1, 0), position scale ``1/sqrt(d)``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ScaledSinusoid):
            m.scale_factor.fill_(m.table.shape[1] ** -0.5)
