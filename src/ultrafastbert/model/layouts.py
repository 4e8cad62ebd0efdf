"""Reading Hugging Face model folders without ``transformers``: which kind a folder is, and the
sentence-transformers settings (pooling, normalisation, length) that sit beside its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ConfigError, InputError

#: ``model_type`` of the transformers families the project loads (dense sources).
TRANSFORMERS_FAMILIES = ("bert", "roberta", "distilbert")
#: Pooling modes of sentence-transformers' Pooling module that the project reproduces.
POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first"}


class SentenceLayout(NamedTuple):
    """Where the transformers model is and how its sentence embedding is made."""

    model_dir: Path
    pooling: str
    normalize: bool
    max_seq_len: int | None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or an error naming the file and ``what`` it should hold."""
    if not path.is_file():
        raise InputError(f"{path} does not exist: {what} is missing. Is {path.parent} a "
                         "Hugging Face model directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); {what} cannot be read") from err
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def transformers_model_type(folder: Path) -> str | None:
    """``bert`` / ``roberta`` / ``distilbert``, or a converted ``ultrafastbert-<family>``, of the
    model in ``folder`` (a sentence-transformers folder's Transformer module included); None for
    anything else, ours among them."""
    try:
        config_dir = sentence_transformers_layout(folder).model_dir
        data = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, InputError, ConfigError):
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        return None
    if kind in TRANSFORMERS_FAMILIES or kind.removeprefix("ultrafastbert-") in \
            TRANSFORMERS_FAMILIES and kind.startswith("ultrafastbert-"):
        return kind
    return None


def sentence_transformers_layout(root: Path) -> SentenceLayout:
    """The layout of a sentence-transformers folder (``modules.json``), or of a plain one (the
    model at the root, mean pooling, not normalised)."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return SentenceLayout(root, "mean", False, None)
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    by_type = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    if "Transformer" not in by_type:
        raise InputError(f"{modules_file} names no Transformer module; cannot find the model")
    model_dir = root / by_type["Transformer"].get("path", "")
    pooling = "mean"
    if "Pooling" in by_type:
        pooling = _pooling_mode(root / by_type["Pooling"]["path"] / "config.json")
    st_config = root / "sentence_bert_config.json"
    max_len = None
    if st_config.is_file():
        max_len = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
    return SentenceLayout(model_dir, pooling, "Normalize" in by_type, max_len)


def _pooling_mode(path: Path) -> str:
    config = read_json_object(path, "the sentence-transformers Pooling config")
    chosen = [mode for key, mode in POOLINGS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v
              and k not in POOLINGS]
    if others or len(chosen) != 1:
        raise ConfigError(f"{path}: pooling {others or chosen} is not supported; the project "
                          "reproduces mean or first-token ([CLS]) pooling")
    return chosen[0]
