"""GLUE with ``transformers`` BERT-family models: converted ones and their dense sources.

``ultrafastbert glue --model DIR`` takes, besides our checkpoints, a converted model directory
(``ultrafastbert convert``) or a plain BERT-family one (the dense source, for the comparison
run through the same protocol). The model is the family's ``...ForSequenceClassification``
(converted or not) with a new head drawn from the seed; its own pooler ([CLS]) is used, so the
protocol's pooler must be ``first``. :class:`GlueClassifier` adapts it to the training loop
(``model(input_ids, attention_mask, labels)`` -> ``.loss`` / ``.logits``) and derives BERT's
token types for pairs (1 after the first separator).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..model.ffn_structures import Extras, block_cost
from ..model.layouts import transformers_model_type
from .finetune import GlueProtocol
from .tasks import GlueTask

#: Files of a Hugging Face tokenizer that travel with a fine-tuned model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


def model_type_of(model_dir: Path) -> str | None:
    """The ``model_type`` of a transformers BERT-family (or converted) directory, else None."""
    return transformers_model_type(model_dir)


def describe(model_dir: Path, name: str) -> dict[str, Any]:
    """Name, folder, class and feed-forward layout of a transformers model directory.

    For a converted model, ``neurons`` (stored) and ``active_neurons`` (used per token) are
    neuron-equivalents per layer, averaged over the layers, counting what ``ffn_extras`` adds
    (shared neurons, a low-rank term, block nodes; see
    :func:`~ultrafastbert.model.ffn_structures.block_cost`); ``ffn_cost`` is the share of the
    dense FFN's multiply-adds a token costs (as ``conversion.json``'s ``active_fraction``).
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    layers = config.get("fff_layers")
    extras = config.get("ffn_extras")
    width = config.get("ffn_width") or config.get("intermediate_size") or config.get("hidden_dim")
    n_layers = int(config.get("num_hidden_layers") or config.get("n_layers") or 0)
    stored, used = converted_neurons(layers, extras) if layers else (width, width)
    neurons, active = (round(stored), round(used)) if layers else (width, width)
    cost = used / width if width else None
    return {"name": name, "dir": str(model_dir), "class": (config.get("architectures") or ["?"])[0],
            "model_type": config.get("model_type"), "fff_layers": layers, "ffn_extras": extras,
            "ff": {"kind": "fff-converted" if layers else "dense", "width": width},
            "neurons": neurons, "active_neurons": active, "ffn_cost": cost,
            "n_layers": n_layers,
            "max_seq_len": int(config.get("max_seq_len") or
                               config.get("max_position_embeddings") or 512),
            "d_model": config.get("hidden_size") or config.get("dim"),
            "vocab_size": config.get("vocab_size")}


def converted_neurons(layers: list, extras: list | None) -> tuple[float, float]:
    """Stored and per-token neuron-equivalents of a converted model's FFN, averaged over its
    layers (``fff_layers`` ``[K, D]`` or None per layer, ``ffn_extras`` per layer or None):
    stored ``K (2^(D+1) - 1) B + s + r``, used ``K (D + 1) B + s + r`` (0 for a removed
    layer)."""
    if extras is not None and len(extras) != len(layers):
        raise ConfigError(f"config.json has {len(extras)} ffn_extras entries for "
                          f"{len(layers)} fff_layers: re-save the converted model")
    parts = [Extras.from_json(e) for e in (extras or [None] * len(layers))]
    stored = [0 if s is None else s[0] * (2 ** (s[1] + 1) - 1) * p.block + p.cost
              for s, p in zip(layers, parts, strict=True)]
    used = [block_cost(s, p) for s, p in zip(layers, parts, strict=True)]
    return sum(stored) / len(layers), sum(used) / len(layers)


def load_tokenizer(model_dir: Path) -> Any:
    """The model's own fast tokenizer (``tokenizer.json``), padding and truncation off."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no tokenizer.json: save the model's fast tokenizer "
                         "beside it (tokenizer.save_pretrained)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class GlueClassifier(nn.Module):
    """A transformers sequence classifier as the GLUE pipeline calls it.

    ``forward(input_ids, attention_mask=None, labels=None)`` with ``(B, S)`` inputs returns the
    model's output (``.logits`` ``(B, num_labels)``, ``.loss`` with labels).
    """

    def __init__(self, model: Any, sep_id: int | None) -> None:
        super().__init__()
        self.model, self.sep_id = model, sep_id
        self.with_types = int(getattr(model.config, "type_vocab_size", 0) or 0) > 1

    @property
    def config(self) -> Any:
        """The transformers config (``num_labels``, ``pad_token_id``, ...)."""
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        """Logits (and the loss with ``labels``) of the padded batch."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_types and self.sep_id is not None:
            from ..model.converted import token_types

            inputs["token_type_ids"] = token_types(input_ids, self.sep_id)
        if labels is not None:
            inputs["labels"] = labels
        return self.model(**inputs)

    def save_pretrained(self, directory: str | os.PathLike,
                        tokenizer_file: str | os.PathLike | None = None) -> None:
        """The model (safetensors) and its tokenizer files, loadable by ``from_pretrained``."""
        target = Path(directory)
        self.model.save_pretrained(target)
        if tokenizer_file is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_file).parent / name
                if source.is_file():
                    shutil.copyfile(source, target / name)


def load_classifier(model_dir: Path, task: GlueTask, protocol: GlueProtocol, seed: int,
                    device: str = "cpu") -> GlueClassifier:
    """The family's sequence classifier on ``model_dir``'s encoder, a new head from ``seed``."""
    import transformers

    from ..model.converted import FAMILIES, converted_class, family_of

    if protocol.pooler != "first":
        raise ConfigError(f"a transformers model classifies from its own [CLS] pooler; the "
                          f"protocol's pooler {protocol.pooler!r} cannot apply: use --pooler first")
    kind = model_type_of(model_dir) or ""
    family = family_of(kind)
    cls: Any = (converted_class(family, "sequence-classification") if kind.startswith(
        "ultrafastbert-") else FAMILIES[family.name].classes["sequence-classification"])
    labels: dict[str, Any] = {"num_labels": task.num_labels}
    if task.labels:
        labels["id2label"] = dict(enumerate(task.labels))
        labels["label2id"] = {n: i for i, n in enumerate(task.labels)}
    dropout = ({"dropout": protocol.dropout, "attention_dropout": protocol.dropout,
                "seq_classif_dropout": protocol.dropout} if family.name == "distilbert" else
               {"hidden_dropout_prob": protocol.dropout,
                "attention_probs_dropout_prob": protocol.dropout})
    torch.manual_seed(seed)  # the new head's init
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized head" is the point here
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, **labels, **dropout)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = load_tokenizer(model_dir)
    sep = next((t for t in ("[SEP]", "</s>") if tokenizer.token_to_id(t) is not None), None)
    return GlueClassifier(model, tokenizer.token_to_id(sep) if sep else None).to(device)
