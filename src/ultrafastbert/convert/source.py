"""The model being converted: a local Hugging Face BERT-family directory, and its FFF student.

Layouts taken: a plain ``transformers`` directory (``config.json`` + weights, ``tokenizer.json``)
of ``BertModel`` / ``BertForMaskedLM`` / ``*ForSequenceClassification`` (BERT, RoBERTa,
DistilBERT), and a sentence-transformers directory (``modules.json`` naming the Transformer
module's folder, ``1_Pooling/config.json``, an optional Normalize module).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..fff.tree import n_nodes
from ..model.layouts import read_json_object, sentence_transformers_layout

log = logging.getLogger(__name__)

#: A layer's FFF may hold at most this many parameters (w_in, w_out): beyond it, say so early.
MAX_FFF_PARAMS_PER_LAYER = 2 ** 28
_KXD = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:[bB]\s*(\d+))?\s*$")


@dataclass(frozen=True)
class SourceModel:
    """A loaded source model and what travels with it.

    Attributes:
        path: the directory holding the transformers model (``config.json``, weights).
        model: the dense ``transformers`` model, eval mode, float32.
        family: the :class:`~ultrafastbert.model.converted.Family` name (``bert``, ...).
        task: ``base``, ``masked-lm`` or ``sequence-classification``.
        tokenizer_dir: where the tokenizer files are.
        pooling: ``mean`` or ``first`` (sentence-transformers' Pooling; ``mean`` otherwise).
        normalize: whether the sentence embedding is L2-normalised.
        max_seq_len: the longest input the model takes as shipped.
    """

    path: Path
    model: Any
    family: str
    task: str
    tokenizer_dir: Path
    pooling: str
    normalize: bool
    max_seq_len: int

    @property
    def n_layers(self) -> int:
        """Transformer layers."""
        from ..model.converted import FAMILIES, base_model_of

        return len(FAMILIES[self.family].layers(base_model_of(self.model)))


def parse_fff(spec: str | Sequence[str], n_layers: int) -> list[list[int] | None]:
    """``"8x7"`` (every layer), ``"8x7,8x7,4x8,..."`` (one per layer) or ``"none"`` (the
    ablation: no feed-forward block) -> one ``[K, D]`` or ``None`` per layer (the trees of
    :func:`parse_structure`, whose extra parts this leaves out)."""
    return parse_structure(spec, n_layers)[0]


def parse_structure(spec: str | Sequence[str], n_layers: int
                    ) -> tuple[list[list[int] | None], list[dict[str, int] | None]]:
    """Like :func:`parse_fff`, each entry optionally with parts beside its trees
    (``8x7+s16``: 16 shared neurons, ``8x7+r16``: a rank-16 linear term; see
    :mod:`~ultrafastbert.model.ffn_structures`) -> the trees and the extras (``{"shared": s,
    "rank": r}`` or None) per layer."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(parts) == 1:
        parts = parts * n_layers
    if len(parts) != n_layers:
        raise InputError(f"--fff lists {len(parts)} configurations but the model has {n_layers} "
                         "layers: give one KxD for all layers or exactly one per layer")
    parsed = [_parse_one(p) for p in parts]
    return [t for t, _ in parsed], [e for _, e in parsed]


def _parse_one(part: str) -> tuple[list[int] | None, dict[str, int] | None]:
    from ..model.ffn_structures import parse_extras

    if part.lower() in ("none", "removed", "0"):
        return None, None
    trees, *rest = part.split("+")
    match = _KXD.match(trees)
    if match is None:
        raise InputError(f"--fff entry {part!r} is not KxD (e.g. 8x7: 8 trees of depth 7), "
                         "KxDbB (nodes that are blocks of B neurons, e.g. 4x7b2), "
                         "KxD+s<N> / KxD+r<N> (N shared neurons / a rank-N linear term beside "
                         "the trees) or 'none'")
    k, d = int(match.group(1)), int(match.group(2))
    block = int(match.group(3)) if match.group(3) is not None else 1
    if k < 1 or d < 0 or d > 20:
        raise InputError(f"--fff entry {part!r}: need K >= 1 trees and a depth 0 <= D <= 20")
    if block < 1:
        raise InputError(f"--fff entry {part!r}: a node holds B >= 1 neurons (b{block})")
    return [k, d], parse_extras(rest, part, block).to_json()


def check_fff_size(fff_layers: Sequence[Sequence[int] | None], d_model: int,
                   extras: Sequence[Any] | None = None) -> None:
    """Refuse a layout whose FFF weights would not fit in memory (names the layer and size;
    block nodes of B neurons count B times)."""
    from ..model.ffn_structures import Extras

    for i, spec in enumerate(fff_layers):
        if spec is None:
            continue
        block = Extras.from_json(extras[i] if extras else None).block
        params = 2 * spec[0] * n_nodes(spec[1]) * block * d_model
        if params > MAX_FFF_PARAMS_PER_LAYER:
            raise InputError(f"layer {i}: {spec[0]}x{spec[1]} at d={d_model} needs "
                             f"{params * 4 / 2**30:.1f} GiB of fp32 weights per layer (limit "
                             f"{MAX_FFF_PARAMS_PER_LAYER * 4 / 2**30:.0f} GiB); choose fewer "
                             "trees or a smaller depth")


def active_fraction(fff_layers: Sequence[Sequence[int] | None], ffn_width: int,
                    extras: Sequence[Any] | None = None) -> float:
    """Multiply-adds per token over the dense FFN's, averaged over layers (removed: 0): for
    plain trees the neurons a token uses over the dense width; shared neurons and low-rank
    terms count as many neurons as their size (see
    :func:`~ultrafastbert.model.ffn_structures.block_cost`)."""
    from ..model.ffn_structures import block_cost

    used = [block_cost(s, e) for s, e in zip(fff_layers, extras or [None] * len(fff_layers),
                                              strict=True)]
    return sum(used) / (len(used) * ffn_width)


# ------------------------------------------------------------------------------ loading
def load_source(directory: str | os.PathLike) -> SourceModel:
    """Load a local BERT-family model directory (no network); see the module docstring."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InputError(f"source {str(root)!r} is not a directory; pass a local Hugging Face "
                         "model directory (config.json + weights + tokenizer.json)")
    model_dir, pooling, normalize, st_max_len = sentence_transformers_layout(root)
    config = read_json_object(model_dir / "config.json", "the source's config")
    from ..model.converted import FAMILIES, check_activation, family_of

    family = family_of(str(config.get("model_type", "")))
    if str(config.get("model_type")).startswith("ultrafastbert-"):
        raise InputError(f"{model_dir} is already a converted model (model_type "
                         f"{config['model_type']}); convert its dense source instead")
    task = _task_of(config)
    cls = FAMILIES[family.name].classes[task]
    hf_config = family.config_class.from_pretrained(model_dir, local_files_only=True)
    check_activation(family, hf_config)
    model = _load_weights(cls, model_dir)
    tokenizer_dir = model_dir if (model_dir / "tokenizer.json").is_file() else root
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise InputError(f"{root} has no tokenizer.json: the converted model needs the source's "
                         "fast tokenizer (save it with tokenizer.save_pretrained)")
    max_len = st_max_len or int(getattr(hf_config, "max_position_embeddings", 512))
    if family.name == "roberta":  # positions start after the padding index
        max_len = min(max_len, int(hf_config.max_position_embeddings) - 2)
    log.info("source %s: %s %s, %d layers, pooling %s", root, family.name, task,
             len(family.layers(model.base_model)), pooling)
    return SourceModel(model_dir, model.eval(), family.name, task, tokenizer_dir, pooling,
                       normalize, max_len)


def _task_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "base"


def _load_weights(cls: Any, model_dir: Path) -> Any:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    if not any((model_dir / n).is_file() for n in names):
        raise InputError(f"{model_dir} holds no weights ({', '.join(names)})")
    try:
        return cls.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"could not load the source weights from {model_dir}: {err}") from err


# ------------------------------------------------------------------------------ the student
def make_student(source: SourceModel, fff_layers: Sequence[Sequence[int] | None],
                 extras: Sequence[Any] | None = None) -> nn.Module:
    """The converted model: the source's class with FFF blocks (with ``extras``, one
    ``{"shared": s, "rank": r}`` or None per layer, beside the trees), every other tensor
    copied.

    The FFF blocks are randomly initialised here (see :mod:`.init` for the real start); each
    block's output bias is the dense block's.
    """
    from ..model.converted import (
        CONFIG_CLASSES,
        FAMILIES,
        converted_class,
        dense_ffns,
        fff_blocks,
    )

    family = FAMILIES[source.family]
    config = source.model.config
    d_model = int(getattr(config, "hidden_size", None) or config.dim)
    check_fff_size(fff_layers, d_model, extras)
    dense = dense_ffns(source.model, family)
    fields = {**config.to_dict(), "model_type": family.model_type,
              "fff_layers": [None if s is None else list(s) for s in fff_layers],
              "ffn_width": int(dense[0].w1.shape[0]), "pooling": source.pooling,
              "normalize_embeddings": source.normalize, "max_seq_len": source.max_seq_len,
              "ffn_extras": list(extras) if extras and any(extras) else None}
    student_config = CONFIG_CLASSES[family.name](**{k: v for k, v in fields.items()
                                                    if k not in ("transformers_version",)})
    cls = converted_class(family, source.task)
    student_config.architectures = [cls.__name__]
    student: Any = cls(student_config)
    _copy_dense_weights(source.model, student)
    for block, ffn in zip(fff_blocks(student), dense, strict=True):
        if hasattr(block, "bias"):
            with torch.no_grad():
                block.bias.copy_(ffn.b2)
    return student.eval()


def _copy_dense_weights(source: nn.Module, student: Any) -> None:
    """Load every source tensor the student has; the only keys allowed to differ are the
    feed-forward blocks' (checked, so a layout mismatch cannot pass silently)."""
    result = student.load_state_dict(source.state_dict(), strict=False)
    ffn_key = re.compile(r"(intermediate\.|output\.dense\.|\.ffn\.)")
    bad_missing = [k for k in result.missing_keys if not ffn_key.search(k)]
    bad_unexpected = [k for k in result.unexpected_keys if not ffn_key.search(k)]
    if bad_missing or bad_unexpected:
        raise ConfigError(f"source and converted model differ outside the feed-forward blocks "
                          f"(missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}): "
                          "unsupported layout")
