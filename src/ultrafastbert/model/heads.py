"""Task heads on the encoder: masked language modelling and sequence classification/regression.

State-dict names follow the original code: ``encoder.*`` for the encoder, ``decoder.weight`` for
the MLM decoder (tied to the token embedding), ``pooler.dense.*`` and ``head.*`` for
classification, so checkpoints of either code base load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, InputTypeError
from .config import ModelConfig
from .encoder import UltraFastBertModel, init_weights
from .pretrained import PretrainedMixin

#: Label value that marks a position without an MLM target.
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------ outputs
@dataclass
class MaskedLMOutput:
    """``logits``: ``(B, S, V)`` without labels; with labels only the labelled positions,
    ``(M, V)`` in row-major order of ``labels != -100``. ``loss``: mean cross-entropy or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class SequenceClassifierOutput:
    """``logits`` ``(B, num_labels)``; ``loss`` (cross-entropy, or MSE when num_labels == 1)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------- MLM
class UltraFastBertForMaskedLM(PretrainedMixin, nn.Module):
    """Encoder + decoder tied to the token embedding (no transform, no bias).

    With ``labels`` (``-100`` at positions without a target) only labelled positions go through
    the decoder ("sparse prediction"), so the vocabulary projection costs ``M`` rows, not ``B*S``.
    """

    tied_keys = ("decoder.weight",)  # the token embedding; stored once

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = UltraFastBertModel(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.decoder.weight = self.encoder.embedding.word_embedding.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MaskedLMOutput:
        """``input_ids``/``attention_mask``/``labels`` ``(B, S)``; see :class:`MaskedLMOutput`."""
        hidden = self.encoder(input_ids, attention_mask).last_hidden_state
        if labels is None:
            return MaskedLMOutput(self.decoder(hidden))
        self._check_labels(labels, input_ids)
        flat = labels.reshape(-1)
        picked = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.decoder(hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked))
        if picked.numel() == 0:  # nothing to predict: a zero loss that still backpropagates
            return MaskedLMOutput(logits, logits.sum() * 0.0)
        return MaskedLMOutput(logits, F.cross_entropy(logits.float(), flat[picked]))

    def _check_labels(self, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
        if labels.shape != input_ids.shape:
            raise InputError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if torch.compiler.is_compiling():  # reading a value is a graph break; cross_entropy
            return                          # checks the targets itself
        valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < self.config.vocab_size))
        if not bool(valid.all()):
            raise InputError(f"MLM labels must be token ids in [0, {self.config.vocab_size}) or "
                             f"{IGNORE_INDEX}, got {labels[~valid][0].item()}")


# ------------------------------------------------------------------------------ classification
class Pooler(nn.Module):
    """Pool ``(B, S, d)`` to ``(B, d)`` (first token or mean over real tokens), then
    ``Linear(d, width)`` with bias -> Tanh -> dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.scheme = config.pooler
        self.dense = nn.Linear(config.d_model, config.classifier_width)
        self.activation = nn.Tanh()
        self.dropout = nn.Dropout(config.classifier_dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` ``(B, S, d)``, ``attention_mask`` ``(B, S)`` or None -> ``(B, width)``."""
        pooled = pool(hidden, attention_mask, self.scheme)
        return self.dropout(self.activation(self.dense(pooled)))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, scheme: str) -> torch.Tensor:
    """``(B, S, d)`` -> ``(B, d)``: ``first`` token, or ``mean`` over positions with mask 1.

    (The original averaged padding too, so a sentence's result depended on its batch; we don't.)
    """
    if scheme == "first":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class UltraFastBertForSequenceClassification(PretrainedMixin, nn.Module):
    """Encoder + pooler + ``head`` ``Linear(width, num_labels)`` with bias.

    ``num_labels == 1`` is regression (MSE on float labels); otherwise single-label
    classification (cross-entropy on int64 labels).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = UltraFastBertModel(config)
        self.pooler = Pooler(config)
        self.head = nn.Linear(config.classifier_width, config.num_labels)
        init_weights(self.pooler, config.init_std)
        init_weights(self.head, config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """``input_ids``/``attention_mask`` ``(B, S)``, ``labels`` ``(B,)`` -> logits ``(B, L)``."""
        first = self.config.pooler == "first"  # a left-padded row 0 must be computed
        hidden = self.encoder(input_ids, attention_mask, first_row=first).last_hidden_state
        logits = self.head(self.pooler(hidden, attention_mask))
        loss = None if labels is None else self.loss(logits, labels)
        return SequenceClassifierOutput(logits, loss)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE for regression (``num_labels == 1``), else cross-entropy; ``labels`` ``(B,)``."""
        if labels.shape != logits.shape[:1]:
            raise InputError(f"labels must have shape ({logits.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if self.config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if labels.is_floating_point():
            raise InputTypeError(f"classification with {self.config.num_labels} labels needs int64 "
                                 "class labels; multi-label (float) targets are not supported")
        return F.cross_entropy(logits.float(), labels.long())
