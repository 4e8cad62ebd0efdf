"""Checkpoint directories: ours and the released crammedBERT/UltraFastBERT format.

Ours: ``config.json`` (``model_type: "ultrafastbert"``, the ``ModelConfig`` fields, the class in
``architectures``), ``model.safetensors`` with ``encoder.*`` and head tensors (the tied decoder is
not stored twice), and ``tokenizer.json`` + ``tokenizer_config.json`` when a tokenizer is known.
The same ``config.json`` is a valid Hugging Face config (see ``hf.py``).

Released (``pbelcak/UltraFastBERT-1x11-long``, docs/design.md §1.4): ``config.json`` holds the crammed
``arch`` dict (``model_config.json`` the same dict with ``vocab_size`` null); ``model.safetensors``
uses the original names, which are ours, plus an attention ``norm_factor`` buffer and the tied
decoder stored a second time. Any K x D, dense GELU FF, and size the ``arch`` describes loads;
options the encoder does not implement are refused by name.

Weights are read with safetensors, or ``torch.load(weights_only=True)``: never arbitrary pickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, InputError, NotFoundError, OutputExistsError
from ..utils.io import atomic_directory
from ..utils.jsonfile import read_json_object, unknown_keys_message
from ..utils.oserrors import as_os_error
from .config import CONFIG_FORMAT_VERSION, DenseFF, FFFSpec, ModelConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAMES = ("model.pt", "pytorch_model.bin")
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
#: A pretraining run's record (``OUT/run.json``) and a training checkpoint's state file
#: (``OUT/checkpoints/step-N/state.json``): intermediate checkpoints load with them.
RUN_RECORD_NAME = "run.json"
TRAINING_STATE_NAME = "state.json"
MODEL_TYPE = "ultrafastbert"
#: Files a checkpoint directory may hold; saving over a directory with anything else is refused.
OWNED_FILES = {CONFIG_NAME, SAFETENSORS_NAME, *TORCH_NAMES, TOKENIZER_NAME,
               TOKENIZER_CONFIG_NAME, "special_tokens_map.json", "model_config.json"}
#: Tensors of the heads a checkpoint may carry; absent ones are initialised, others ignored.
HEAD_KEYS = {"decoder.weight", "pooler.dense.weight", "pooler.dense.bias", "head.weight",
             "head.bias"}
#: Special tokens written to ``tokenizer_config.json`` (Hugging Face role -> token).
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "cls_token": "<cls>", "sep_token": "<sep>",
                  "mask_token": "<mask>"}
#: Class name (as written in ``config.json`` ``architectures``) -> model class. The classes add
#: themselves (``PretrainedMixin.__init_subclass__`` calls :func:`register_model_class`), so this
#: module needs no import of the classes it loads.
MODEL_CLASSES: dict[str, type] = {}
#: Keys of ``config.json`` besides the ``ModelConfig`` fields: ours (``save_pretrained``) and
#: those a Hugging Face ``save_pretrained`` of the same model adds.
METADATA_KEYS = frozenset({"model_type", "architectures", "format_version", "torch_dtype",
                           "dtype", "transformers_version", "tie_word_embeddings", "id2label",
                           "label2id"})
_CRAMMED_CLASSES = {"ScriptableLMForPreTraining": "UltraFastBertForMaskedLM",
                    "ScriptableLMForSequenceClassification":
                        "UltraFastBertForSequenceClassification"}


def register_model_class(cls: type) -> type:
    """Make ``cls`` loadable by its name from ``config.json`` (``architectures``)."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


# ------------------------------------------------------------------------------------ saving
def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (a temporary folder renamed into place).

    Returns the directory. Refuses to replace a directory holding files it did not write.
    """
    target = Path(directory)
    tokenizer = Path(tokenizer_file) if tokenizer_file else getattr(model, "tokenizer_file", None)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise NotFoundError(f"tokenizer file {tokenizer} does not exist")
    with _atomic_directory(target) as tmp:
        _write_weights(tmp, checkpoint_tensors(model))
        _write_json(tmp / CONFIG_NAME, config_json(model))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
            _write_json(tmp / TOKENIZER_CONFIG_NAME,
                        tokenizer_config(tmp / TOKENIZER_NAME, model_config(model).max_seq_len))
    logger.info("saved %s to %s", type(model).__name__, target)
    return target


def model_config(model: nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` of one of the library's models."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise InputError(f"{type(model).__name__} has no ModelConfig in .config; only "
                         "ultrafastbert's model classes can be saved this way")
    return config


def config_json(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` of ``model``: format tags plus the ``ModelConfig`` fields."""
    dtype = next(model.parameters()).dtype
    return {"model_type": MODEL_TYPE, "architectures": [type(model).__name__],
            "format_version": CONFIG_FORMAT_VERSION,
            "torch_dtype": str(dtype).replace("torch.", ""), **model_config(model).to_dict()}


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name -> CPU copy: ``encoder.*`` and head tensors, the tied decoder left out."""
    return {k: v.detach().contiguous().cpu() for k, v in checkpoint_tensors_of(model).items()}


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        logger.warning("safetensors is not installed; writing %s with torch.save instead "
                       "(pip install safetensors for the portable format)", TORCH_NAMES[0])
        torch.save(tensors, folder / TORCH_NAMES[0])
        return
    try:
        save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    except Exception as err:  # safetensors reports a full disk with its own error type
        cause = as_os_error(err, folder / SAFETENSORS_NAME)
        if cause is err:
            raise
        raise cause from err


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``
    (files fsynced, usual permissions; see :func:`~ultrafastbert.utils.io.atomic_directory`)."""
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"{target} exists and is not a directory")
        foreign = sorted(p.name for p in target.iterdir() if p.name not in OWNED_FILES)
        if foreign:
            raise OutputExistsError(f"{target} holds files a checkpoint does not ({foreign[:5]}); "
                                    "save into a new or empty directory")
    with atomic_directory(target, replace=True) as tmp:
        yield tmp


def tokenizer_config(tokenizer_json: Path, max_length: int) -> dict[str, Any]:
    """A ``tokenizer_config.json`` so ``AutoTokenizer`` gives a ``PreTrainedTokenizerFast``."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    present = {t.get("content") for t in data.get("added_tokens", [])}
    present |= set((data.get("model") or {}).get("vocab") or {})
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "model_max_length": max_length}
    config.update({role: tok for role, tok in SPECIAL_TOKENS.items() if tok in present})
    return config


# ----------------------------------------------------------------------------------- loading
def from_pretrained(directory: str | os.PathLike, model_class: type | None = None, *,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    **changes: Any) -> nn.Module:
    """Load a checkpoint directory (ours or the released format) into ``model_class``.

    ``model_class`` None takes the class recorded in ``config.json``. ``changes`` edit the
    config (``num_labels=3``...). Every encoder tensor must be present with the right shape; a
    head is loaded when the checkpoint has it, initialised when it has none of its tensors.
    """
    folder = Path(directory)
    read_config(folder)  # fail on a bad config before reading a large weights file
    tensors = load_tensors(folder)
    config, class_name, released = read_config(folder, tensors)
    if released:
        tensors = convert_released(tensors, config)
    if training_run_dir(folder) is not None:
        tensors = _untie_training_tensors(tensors)
    config = config.replace(**changes) if changes else config
    cls = model_class or MODEL_CLASSES[class_name]
    model = cls(config)
    load_checkpoint_tensors(model, tensors)
    model.tokenizer_file = tokenizer_file(folder)
    model.to(device=device, dtype=dtype)
    return model.eval()


def read_config(folder: Path, tensors: dict[str, torch.Tensor] | None = None
                ) -> tuple[ModelConfig, str, bool]:
    """``(config, class name, is_released_format)`` from ``folder/config.json``.

    ``tensors`` (the loaded weights) supply the vocabulary size when a released config has none.
    """
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise NotFoundError(f"checkpoint directory {folder} does not exist")
    run = training_run_dir(folder)
    if run is not None:
        return _training_config(run), "UltraFastBertForMaskedLM", False
    if not path.is_file():
        raise NotFoundError(f"{folder} has no {CONFIG_NAME}: pass a model directory (one that "
                            "holds config.json and model.safetensors, e.g. a pretraining "
                            "--out, or OUT/checkpoints/step-N of a pretraining run)")
    data = read_json_object(path, "model config")
    if "arch" in data or data.get("model_type") == "crammedBERT":
        arch = data.get("arch") or _read_model_config_json(folder)
        vocab = _arch_get(arch, "embedding.vocab_size") or _vocab_from_weights(folder, tensors)
        class_name = _CRAMMED_CLASSES.get((data.get("architectures") or [""])[0],
                                          "UltraFastBertForMaskedLM")
        return config_from_crammed_arch(arch, vocab_size=vocab), class_name, True
    if data.get("model_type") != MODEL_TYPE:
        raise DataError(f"{path}: model_type {data.get('model_type')!r} is neither "
                        f"{MODEL_TYPE!r} nor the released 'crammedBERT' format")
    class_name = (data.get("architectures") or ["UltraFastBertForMaskedLM"])[0]
    class_name = class_name[2:] if class_name.startswith("HF") else class_name
    if class_name not in MODEL_CLASSES:
        raise DataError(f"{path}: unknown architecture {class_name!r}; known: "
                        f"{sorted(MODEL_CLASSES)}")
    return config_from_json(data, path), class_name, False


def training_run_dir(folder: Path) -> Path | None:
    """The pretraining ``OUT`` of a training checkpoint folder ``OUT/checkpoints/step-N``
    (weights and ``state.json``, the architecture in ``OUT/run.json``), else None."""
    if (folder / CONFIG_NAME).is_file() or not (folder / TRAINING_STATE_NAME).is_file():
        return None
    run = folder.parent.parent
    return run if (run / RUN_RECORD_NAME).is_file() else None


def tokenizer_file(folder: Path) -> Path | None:
    """``folder/tokenizer.json``, or its run's for a training checkpoint; None when absent."""
    run = training_run_dir(folder)
    for path in (folder / TOKENIZER_NAME, *(() if run is None else (run / TOKENIZER_NAME,))):
        if path.is_file():
            return path
    return None


def _training_config(run: Path) -> ModelConfig:
    path = run / RUN_RECORD_NAME
    model = read_json_object(path, "run record").get("settings", {}).get("model")
    if not isinstance(model, dict):
        raise DataError(f"{path} has no settings.model: not a pretraining run record")
    return config_from_json(model, f"{path} (settings.model)")


def _untie_training_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint stores the tied decoder / token embedding once, under either name."""
    embedding, decoder = "encoder.embedding.word_embedding.weight", "decoder.weight"
    out = dict(tensors)
    if decoder in out and embedding not in out:
        out[embedding] = out[decoder]
    return out


def config_from_json(data: dict[str, Any], source: str | os.PathLike = "config.json"
                     ) -> ModelConfig:
    """``ModelConfig`` from our ``config.json`` (or one Hugging Face re-saved; ``id2label``
    gives the labels when present). The same rule for ``from_pretrained`` and ``pretrain
    --config``: the ``ModelConfig`` fields and the format tags (:data:`METADATA_KEYS`) are
    known; any other key is an error naming it, with the closest known key as a suggestion.
    """
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(data) - fields - METADATA_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown_keys_message(unknown, fields)}; "
                          f"a model config holds {sorted(fields)} (and the format tags "
                          f"{sorted(METADATA_KEYS)})")
    if "model_type" in data and data["model_type"] != MODEL_TYPE:
        raise ConfigError(f"{source}: model_type {data['model_type']!r} is not {MODEL_TYPE!r}")
    values = {k: v for k, v in data.items() if k in fields}
    id2label = data.get("id2label")
    if id2label and "num_labels" not in values:
        values["num_labels"] = len(id2label)
    try:
        return ModelConfig.from_dict(values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {err}") from err


def _read_model_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "model_config.json"
    if not path.is_file():
        raise DataError(f"{folder}/{CONFIG_NAME} has no 'arch' and there is no "
                        "model_config.json: not a released crammedBERT checkpoint")
    return read_json_object(path, "released model config")


def _vocab_from_weights(folder: Path, tensors: dict[str, torch.Tensor] | None) -> int:
    """The vocabulary size from the token embedding's shape (released ``model_config.json``)."""
    key = "encoder.embedding.word_embedding.weight"
    tensors = load_tensors(folder) if tensors is None else tensors
    if key not in tensors:
        raise DataError(f"{folder}: vocab_size is null and the weights have no {key}")
    return int(tensors[key].shape[0])


# --------------------------------------------------------------------- released ``arch`` dict
#: Released ``arch`` options the encoder implements only with this value (absent = default).
_CRAMMED_FIXED = {
    "norm": "LayerNorm", "norm_scheme": "pre", "tie_weights": True, "decoder_bias": False,
    "skip_head_transform": True, "use_bias": False, "final_norm": True,
    "ffn_layer_frequency": 1, "embedding.pos_embedding": "scaled-sinusoidal",
    "embedding.normalization": True, "attention.type": "self-attention",
    "attention.causal_attention": False, "attention.skip_output_projection": False,
    "attention.qkv_bias": False, "attention.rotary_embedding": False,
    "attention.sequence_op": "torch-softmax", "init.type": "normal",
    "classification_head.include_ff_layer": True, "classification_head.nonlin": "Tanh",
}
_CRAMMED_POOLERS = {"zero_index": "first", "avg": "mean"}


def _arch_get(arch: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = arch
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _arch_required(arch: dict[str, Any], dotted: str) -> Any:
    value = _arch_get(arch, dotted)
    if value is None:
        raise DataError(f"released config: arch.{dotted} is missing")
    return value


def _check_crammed_options(arch: dict[str, Any]) -> None:
    for key, expected in _CRAMMED_FIXED.items():
        value = _arch_get(arch, key, expected)
        if value != expected:
            raise DataError(f"released config: arch.{key} = {value!r} is not supported "
                            f"(this encoder implements only {expected!r})")
    embedding_dim = _arch_get(arch, "embedding.embedding_dim", arch.get("hidden_size"))
    if embedding_dim != arch.get("hidden_size"):
        raise DataError(f"released config: arch.embedding.embedding_dim = {embedding_dim!r} "
                        f"must equal arch.hidden_size = {arch.get('hidden_size')!r}")


def _crammed_ff(arch: dict[str, Any]) -> DenseFF | FFFSpec:
    kind = arch.get("intermed_type", "ff")
    nonlin = arch.get("nonlin", "GELU")
    if nonlin != "GELU":
        raise DataError(f"released config: arch.nonlin = {nonlin!r} is not supported (only "
                        "'GELU'; the GeGLU crammedBERT 'GELUglu' is a different network)")
    if kind == "fff":
        return FFFSpec(_arch_required(arch, "intermed_size"),
                       _arch_required(arch, "intermed_depth"))
    if kind == "ff":
        return DenseFF(_arch_required(arch, "intermed_size"))
    raise DataError(f"released config: arch.intermed_type = {kind!r}; allowed: ['ff', 'fff']")


def config_from_crammed_arch(arch: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """Translate the released crammed ``arch`` dict to a ``ModelConfig`` (refusing by name any
    option the encoder does not implement)."""
    _check_crammed_options(arch)
    pooler = _arch_get(arch, "classification_head.pooler", "zero_index")
    if pooler not in _CRAMMED_POOLERS:
        raise DataError(f"released config: arch.classification_head.pooler = {pooler!r}; "
                        f"supported: {sorted(_CRAMMED_POOLERS)}")
    return ModelConfig(
        vocab_size=vocab_size or _arch_required(arch, "embedding.vocab_size"),
        d_model=_arch_required(arch, "hidden_size"),
        n_layers=_arch_required(arch, "num_transformer_layers"),
        n_heads=_arch_required(arch, "attention.num_attention_heads"),
        max_seq_len=_arch_required(arch, "embedding.max_seq_length"),
        ff=_crammed_ff(arch),
        pad_token_id=_arch_get(arch, "embedding.pad_token_id", 0),
        norm_eps=float(_arch_get(arch, "norm_eps", 1e-12)),
        embedding_dropout=_arch_get(arch, "embedding.dropout_prob", 0.1),
        attention_dropout=_arch_get(arch, "attention.dropout_prob", 0.1),
        hidden_dropout=_arch_get(arch, "hidden_dropout_prob", 0.1),
        init_std=_arch_get(arch, "init.std", 0.02),
        pooler=_CRAMMED_POOLERS[pooler],
        classifier_width=_arch_get(arch, "classification_head.head_dim", 1024),
        classifier_dropout=_arch_get(arch, "classification_head.classifier_dropout", 0.1),
        num_labels=arch.get("num_labels") or 2,
    )


def convert_released(tensors: dict[str, torch.Tensor], config: ModelConfig
                     ) -> dict[str, torch.Tensor]:
    """Released names -> ours: drop (after checking) the ``norm_factor`` buffers, rename the
    dense FF's ``dense_in``/``dense_out``. The tied decoder copy is checked on loading."""
    out = {}
    expected_norm = 1.0 / math.sqrt(config.head_dim)
    for key, tensor in tensors.items():
        if key.endswith(".attn.self_attention.norm_factor"):
            if not math.isclose(float(tensor), expected_norm, rel_tol=1e-5):
                raise DataError(f"{key} = {float(tensor)} but this encoder scales scores by "
                                f"1/sqrt(head_dim) = {expected_norm}")
            continue
        key = key.replace(".ffn.dense_in.", ".ffn.linear_in.")
        out[key.replace(".ffn.dense_out.", ".ffn.linear_out.")] = tensor
    return out


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``folder``'s weights file (safetensors, else a ``weights_only`` torch file).

    Raises:
        DataError: the file is truncated or corrupt, or a tensor holds NaN or infinity (the
            message names the file and the tensor).
    """
    path = folder / SAFETENSORS_NAME
    if path.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"{path} needs the safetensors package: pip install safetensors"
                              ) from err
        tensors = _read_weights(path, lambda: load_file(str(path)))
        return check_finite(tensors, path)
    for name in TORCH_NAMES:
        if (folder / name).is_file():
            tensors = _read_weights(folder / name, lambda n=name: torch.load(
                folder / n, map_location="cpu", weights_only=True))
            return check_finite(tensors, folder / name)
    raise NotFoundError(f"{folder} has no weights file ({SAFETENSORS_NAME} or "
                        f"{' / '.join(TORCH_NAMES)})")


def _read_weights(path: Path, read: Any) -> dict[str, torch.Tensor]:
    """``read()``, with a truncated or corrupt file reported as a :class:`DataError`."""
    try:
        tensors = read()
    except (OSError, MemoryError):
        raise
    except Exception as err:  # SafetensorError, UnpicklingError, RuntimeError, EOFError...
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); "
                        "copy or download it again, or save the model again") from err
    if not isinstance(tensors, dict):
        raise DataError(f"{path} holds a {type(tensors).__name__}, not a dict of tensors; "
                        "save the weights with save_pretrained")
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike
                 ) -> dict[str, torch.Tensor]:
    """Return ``tensors`` after checking that no floating-point tensor holds NaN or infinity.

    Raises:
        DataError: naming ``path``, the first bad tensor and how many bad values it has.
    """
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(
        torch.isfinite(t).all())]
    if bad:
        count = int((~torch.isfinite(tensors[bad[0]])).sum())
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise DataError(f"{path}: tensor {bad[0]} holds {count} non-finite values (NaN or "
                        f"infinity){more}; the file is corrupt or the model diverged. Copy it "
                        "again, or use an earlier checkpoint")
    return tensors


# ----------------------------------------------------------------------------- strict loading
def load_checkpoint_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (checkpoint names) into ``model``, strictly.

    Encoder tensors: every one must be present, none unexpected, shapes equal. Head tensors: the
    model's head loads when the checkpoint has it, is kept as initialised when the checkpoint has
    none of it; tensors of other heads are ignored. Errors name the key and both shapes.
    """
    targets = checkpoint_tensors_of(model)
    _check_tied_decoder(tensors)
    _check_names(targets, tensors)
    for key, target in targets.items():
        if key in tensors:
            _check_shape(key, tensors[key], target)
    with torch.no_grad():
        for key, target in targets.items():
            if key in tensors:
                target.copy_(tensors[key])


def checkpoint_tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the model's own tensor (for in-place loading), tied decoder left out."""
    prefix = getattr(type(model), "checkpoint_prefix", "")  # "encoder." for the bare encoder
    state = model.state_dict(keep_vars=True)
    for key in getattr(type(model), "tied_keys", ()):  # the same tensor as another one
        state.pop(key)
    return {prefix + k: v for k, v in state.items()}


def _check_tied_decoder(tensors: dict[str, torch.Tensor]) -> None:
    embedding = tensors.get("encoder.embedding.word_embedding.weight")
    decoder = tensors.get("decoder.weight")
    if decoder is None or embedding is None:
        return
    if decoder.shape != embedding.shape or not torch.equal(decoder, embedding):
        raise DataError("checkpoint decoder.weight differs from "
                        "encoder.embedding.word_embedding.weight, but this model ties them "
                        f"(shapes {tuple(decoder.shape)} and {tuple(embedding.shape)})")


def _check_names(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    model_heads = {k for k in targets if not k.startswith("encoder.")}
    missing = sorted(k for k in targets if k not in tensors and k not in model_heads)
    unexpected = sorted(k for k in tensors if k not in targets and k not in HEAD_KEYS)
    if missing or unexpected:
        detail = [f"missing {k} {tuple(targets[k].shape)}" for k in missing[:5]]
        detail += [f"unexpected {k} {tuple(tensors[k].shape)}" for k in unexpected[:5]]
        raise DataError(f"checkpoint does not match the model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected): {'; '.join(detail)}; check that "
                        "config.json describes these weights")
    present = {k for k in model_heads if k in tensors}
    if present and present != model_heads:
        absent = sorted(model_heads - present)
        raise DataError(f"checkpoint has part of the head: missing {absent}")
    if model_heads and not present:
        logger.info("checkpoint has no %s; initialised a new head", sorted(model_heads))
    ignored = sorted(k for k in tensors if k in HEAD_KEYS and k not in targets)
    if ignored:
        logger.info("ignoring tensors of another head: %s", ignored)


def _check_shape(key: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise DataError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)} but the model "
                        f"expects {tuple(target.shape)}; check that config.json matches the "
                        "weights (or pass the matching num_labels)")

