"""Hugging Face ``transformers`` interop (needs the ``hf`` extra).

``register_with_transformers()`` makes ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM``
/ ``AutoModelForSequenceClassification`` load our checkpoint directories (``model_type:
"ultrafastbert"``). The wrappers hold the very modules of our models (``encoder``, ``decoder``,
``pooler``, ``head``), so state-dict names, outputs and the FFF fast path are the same; only the
config object and the output classes are Hugging Face's. ``load_tokenizer(dir)`` gives a
``PreTrainedTokenizerFast`` from ``tokenizer.json``.

Importing this module imports ``transformers`` (seconds); ``ultrafastbert.model.hf_hook`` defers
it until ``transformers`` is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers import initialization as hf_init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from ..errors import NotFoundError
from .checkpoint import SPECIAL_TOKENS, TOKENIZER_NAME
from .config import ModelConfig, ff_from_dict
from .encoder import ScaledSinusoid, UltraFastBertModel, sinusoid_table
from .heads import UltraFastBertForMaskedLM, UltraFastBertForSequenceClassification

MODEL_TYPE = "ultrafastbert"


class UltraFastBertConfig(PretrainedConfig):
    """A Hugging Face config carrying the :class:`ModelConfig` fields as attributes.

    ``num_labels`` / ``id2label`` are Hugging Face's own; ``label_names`` fills ``id2label``.
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}

    def __init__(self, vocab_size: int = 32768, d_model: int = 768, n_layers: int = 16,
                 n_heads: int = 12, max_seq_len: int = 128, ff: dict | None = None,
                 pad_token_id: int = 0, norm_eps: float = 1e-12, embedding_dropout: float = 0.1,
                 attention_dropout: float = 0.1, hidden_dropout: float = 0.1,
                 init_std: float = 0.02, pooler: str = "mean", classifier_width: int = 1024,
                 classifier_dropout: float = 0.1, label_names: list[str] | None = None,
                 **kwargs: Any):
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.max_seq_len = n_heads, max_seq_len
        self.ff = dict(ff) if ff is not None else {"kind": "fff", "n_trees": 1, "depth": 11}
        self.norm_eps, self.init_std = norm_eps, init_std
        self.embedding_dropout, self.attention_dropout = embedding_dropout, attention_dropout
        self.hidden_dropout, self.classifier_dropout = hidden_dropout, classifier_dropout
        self.pooler, self.classifier_width = pooler, classifier_width
        self.label_names = list(label_names) if label_names is not None else None
        if label_names is not None and "id2label" not in kwargs:
            kwargs["id2label"] = dict(enumerate(label_names))
        for key in ("format_version", "torch_dtype"):  # ours, recorded by save_pretrained
            kwargs.pop(key, None)
        kwargs["tie_word_embeddings"] = True  # the MLM decoder is the token embedding, always
        super().__init__(pad_token_id=pad_token_id, **kwargs)  # type: ignore[call-arg]

    def to_model_config(self) -> ModelConfig:
        """The validated :class:`ModelConfig` this config describes."""
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            n_heads=self.n_heads, max_seq_len=self.max_seq_len, ff=ff_from_dict(self.ff),
            pad_token_id=self.pad_token_id, norm_eps=self.norm_eps,
            embedding_dropout=self.embedding_dropout, attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout, init_std=self.init_std, pooler=self.pooler,
            classifier_width=self.classifier_width, classifier_dropout=self.classifier_dropout,
            num_labels=cast(int, self.num_labels),
            label_names=tuple(self.label_names) if self.label_names is not None else None)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> UltraFastBertConfig:
        """The Hugging Face form of ``config``."""
        fields = config.to_dict()
        return cls(**{k: v for k, v in fields.items() if k != "num_labels"},
                   num_labels=config.num_labels, **kwargs)


class _Wrapper(PreTrainedModel):
    """Adopts the child modules of one of our models; ``forward`` delegates to it."""

    config_class = UltraFastBertConfig
    base_model_prefix = "ultrafastbert"  # no checkpoint key starts with it: names stay as saved
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    core_class: type[nn.Module] = UltraFastBertForMaskedLM
    #: The adopted model (one of our three model classes), kept outside the module tree.
    core: Any

    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self._adopt(config.to_model_config())
        self.post_init()

    def _adopt(self, model_config: ModelConfig) -> None:
        core = self.core_class(model_config)
        for name, child in core.named_children():
            self.add_module(name, child)
        self.__dict__["core"] = core  # not a submodule: its children are ours already

    def train(self, mode: bool = True) -> _Wrapper:
        """Switch mode here and on the adopted model."""
        self.core.train(mode)
        return super().train(mode)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, std=std)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, std=std)
            if module.padding_idx is not None and not getattr(module.weight,
                                                              "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)
        elif isinstance(module, ScaledSinusoid):  # the table is a non-persistent buffer
            table = module.table
            hf_init.copy_(table, sinusoid_table(*table.shape).to(table.device, table.dtype))
            hf_init.constant_(module.scale_factor, table.shape[1] ** -0.5)

    def set_fff_runtime(self, implementation: str = "auto", weight_format: str = "fp32",
                        training: str = "auto") -> None:
        """Choose the FFF kernels (see ``FFFRuntime``)."""
        self.core.set_fff_runtime(implementation, weight_format, training)


class HFUltraFastBertModel(_Wrapper):
    """``AutoModel``: the encoder (as ``encoder.*``); returns ``BaseModelOutput``."""

    def _adopt(self, model_config: ModelConfig) -> None:
        self.encoder = UltraFastBertModel(model_config)
        self.__dict__["core"] = self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> BaseModelOutput:
        """``input_ids``/``attention_mask`` ``(B, S)`` -> ``last_hidden_state`` ``(B, S, d)``."""
        hidden = self.core(input_ids, attention_mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden)


class HFUltraFastBertForMaskedLM(_Wrapper):
    """``AutoModelForMaskedLM``: see :class:`UltraFastBertForMaskedLM` (sparse logits with labels)."""

    core_class = UltraFastBertForMaskedLM
    _tied_weights_keys = {"decoder.weight": "encoder.embedding.word_embedding.weight"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> MaskedLMOutput:
        """``(B, S)`` inputs -> logits ``(B, S, V)`` (or ``(M, V)`` at labelled positions)."""
        out = self.core(input_ids, attention_mask, labels)
        return MaskedLMOutput(loss=out.loss, logits=out.logits)

    def get_input_embeddings(self) -> nn.Module:  # noqa: D102
        return self.core.encoder.embedding.word_embedding

    def get_output_embeddings(self) -> nn.Module:  # noqa: D102
        return self.core.decoder


class HFUltraFastBertForSequenceClassification(_Wrapper):
    """``AutoModelForSequenceClassification``: see :class:`UltraFastBertForSequenceClassification`."""

    core_class = UltraFastBertForSequenceClassification

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        """``(B, S)`` inputs -> logits ``(B, num_labels)``."""
        out = self.core(input_ids, attention_mask, labels)
        return SequenceClassifierOutput(loss=out.loss, logits=out.logits)


def register_with_transformers() -> None:
    """Register the config and the three model classes with the ``Auto*`` factories (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register(MODEL_TYPE, UltraFastBertConfig, exist_ok=True)
    AutoModel.register(UltraFastBertConfig, HFUltraFastBertModel, exist_ok=True)
    AutoModelForMaskedLM.register(UltraFastBertConfig, HFUltraFastBertForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(
        UltraFastBertConfig, HFUltraFastBertForSequenceClassification, exist_ok=True)
    converted = sys.modules.get(f"{__package__}.converted")
    if converted is None or hasattr(converted, "register_with_transformers"):
        from .converted import register_with_transformers as register_converted

        register_converted()
    # else model.converted is being imported right now (its transformers import fired the
    # hook); it registers itself when its import completes.


def load_tokenizer(directory: str | os.PathLike, model_max_length: int = 128
                   ) -> PreTrainedTokenizerFast:
    """``PreTrainedTokenizerFast`` from ``directory/tokenizer.json`` (or that file itself) with
    our special tokens."""
    path = Path(directory)
    path = path / TOKENIZER_NAME if path.is_dir() else path
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist; a model directory holds its tokenizer as "
                            f"{TOKENIZER_NAME}")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=model_max_length,
                                   **SPECIAL_TOKENS)
