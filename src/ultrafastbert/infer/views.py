"""One model interface for inference, over the project's two kinds of saved model.

:class:`~ultrafastbert.infer.Predictor` talks to a :class:`ModelView`: the hidden states of a
padded batch, the logits of its masked positions or of its classifier, and the few facts it
needs (longest input, pad and mask tokens, labels, default pooling). Two views exist:

- :class:`NativeView`: the crammedBERT / UltraFastBERT models (``UltraFastBertModel``,
  ``...ForMaskedLM``, ``...ForSequenceClassification``), our tokenizer's ``<pad>``/``<mask>``;
- :class:`TransformersView`: a ``transformers`` BERT-family model, converted to FFF or not
  (``model.converted``), with the source's own special tokens and token types.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..model.heads import pool

TASKS = ("embed", "classify", "fill-mask")


class ModelView:
    """What inference needs of a model; see the module docstring."""

    model: nn.Module
    #: ``"base"``, ``"masked-lm"`` or ``"sequence-classification"``.
    kind: str
    pad_token: str
    mask_token: str
    default_pooling: str = "mean"
    normalize: bool = False

    @property
    def max_length(self) -> int:
        """The longest input (tokens) the model takes."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Hidden size ``d`` of the embeddings."""
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        """The config's padding id (when the tokenizer has no pad token)."""
        return int(getattr(self.model.config, "pad_token_id", 0) or 0)

    def label_names(self) -> tuple[str, ...]:
        """Class names of a classifier, ``LABEL_i`` where the config names none."""
        raise NotImplementedError

    def num_labels(self) -> int:
        """Outputs of the classifier (1: a regressor)."""
        return int(self.model.config.num_labels)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states ``(N, S, d)`` of the padded batch ``ids``/``mask`` ``(N, S)``."""
        raise NotImplementedError

    def masked_logits(self, ids: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor
                      ) -> torch.Tensor:
        """Vocabulary logits ``(M, V)`` at the ``M`` positions where ``masked`` ``(N, S)``."""
        raise NotImplementedError

    def class_logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Classifier logits ``(N, num_labels)``."""
        raise NotImplementedError

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
        """Sentence embeddings ``(N, d)`` (``mean`` over real tokens or ``first``)."""
        return pool(self.hidden(ids, mask), mask, pooling)

    def head_class(self, task: str) -> str:
        """The class a model needs for ``task`` (for error messages)."""
        raise NotImplementedError

    @property
    def tasks(self) -> tuple[str, ...]:
        """``embed`` always; ``classify`` / ``fill-mask`` where the model has that head."""
        extra = {"sequence-classification": ("classify",), "masked-lm": ("fill-mask",)}
        return ("embed", *extra.get(self.kind, ()))


class NativeView(ModelView):
    """The project's own model classes."""

    pad_token, mask_token = "<pad>", "<mask>"

    def __init__(self, model: nn.Module) -> None:
        from ..model.encoder import UltraFastBertModel
        from ..model.heads import (
            UltraFastBertForMaskedLM,
            UltraFastBertForSequenceClassification,
        )

        self.model = model
        self.kind = ("masked-lm" if isinstance(model, UltraFastBertForMaskedLM) else
                     "sequence-classification" if isinstance(
                         model, UltraFastBertForSequenceClassification) else "base")
        self.encoder = model if isinstance(model, UltraFastBertModel) else model.encoder

    @property
    def max_length(self) -> int:  # noqa: D102
        return int(self.model.config.max_seq_len)

    @property
    def width(self) -> int:  # noqa: D102
        return int(self.model.config.d_model)

    def head_class(self, task: str) -> str:  # noqa: D102
        return {"classify": "UltraFastBertForSequenceClassification",
                "fill-mask": "UltraFastBertForMaskedLM"}.get(task, "UltraFastBertModel")

    def label_names(self) -> tuple[str, ...]:  # noqa: D102
        config = self.model.config
        return tuple(config.label_names or (f"LABEL_{i}" for i in range(config.num_labels)))

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return self.encoder(ids, mask).last_hidden_state

    def masked_logits(self, ids: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor
                      ) -> torch.Tensor:  # noqa: D102
        return self.model.decoder(self.hidden(ids, mask)[masked])  # decode the masks only

    def class_logits(self, ids: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor:  # noqa: D102
        return self.model(ids, mask).logits


class TransformersView(ModelView):
    """A ``transformers`` BERT-family model (converted or dense).

    Token types are derived from the ids (1 after the first separator), as BERT's tokenizer
    makes them for pairs, and passed only to models that have token types.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        from ..model.converted import base_model_of, task_of

        self.model, self.kind = model, task_of(model)
        self.base = base_model_of(model)
        config = model.config
        self.default_pooling = str(getattr(config, "pooling", "mean"))
        self.normalize = bool(getattr(config, "normalize_embeddings", False))
        specials = _special_tokens(tokenizer)
        self.pad_token, self.mask_token, sep = specials
        self.sep_id = tokenizer.token_to_id(sep) if sep else None
        self.with_types = int(getattr(config, "type_vocab_size", 0) or 0) > 1

    @property
    def max_length(self) -> int:  # noqa: D102
        config = self.model.config
        return int(getattr(config, "max_seq_len", None) or config.max_position_embeddings)

    @property
    def width(self) -> int:  # noqa: D102
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.dim)

    def head_class(self, task: str) -> str:  # noqa: D102
        from ..model.converted import converted_class, family_of

        kind = {"classify": "sequence-classification", "fill-mask": "masked-lm"}.get(task, "base")
        return converted_class(family_of(self.model.config.model_type), kind).__name__

    def label_names(self) -> tuple[str, ...]:  # noqa: D102
        id2label = self.model.config.id2label
        return tuple(str(id2label[i]) for i in range(self.num_labels()))

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": ids}
        if mask is not None:
            inputs["attention_mask"] = mask
        if self.with_types and self.sep_id is not None:
            from ..model.converted import token_types

            inputs["token_type_ids"] = token_types(ids, self.sep_id)
        return inputs

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return self.base(**self._inputs(ids, mask)).last_hidden_state

    def masked_logits(self, ids: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor
                      ) -> torch.Tensor:  # noqa: D102
        return self.model(**self._inputs(ids, mask)).logits[masked]

    def class_logits(self, ids: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor:  # noqa: D102
        return self.model(**self._inputs(ids, mask)).logits


def _special_tokens(tokenizer: Any) -> tuple[str, str, str | None]:
    """``(pad, mask, sep)`` spellings of a BERT-family ``tokenizers.Tokenizer``."""
    vocab = tokenizer.get_vocab()

    def pick(*names: str) -> str | None:
        return next((n for n in names if n in vocab), None)

    pad, mask = pick("[PAD]", "<pad>"), pick("[MASK]", "<mask>")
    if pad is None:
        raise InputError("the tokenizer has neither [PAD] nor <pad>: not a BERT-family tokenizer")
    return pad, mask or "[MASK]", pick("[SEP]", "</s>")


def view_of(model: nn.Module, tokenizer: Any) -> ModelView:
    """The view for ``model``: ours, or a ``transformers`` BERT-family model."""
    from ..model.pretrained import PretrainedMixin

    if isinstance(model, PretrainedMixin):
        return NativeView(model)
    return TransformersView(model, tokenizer)
