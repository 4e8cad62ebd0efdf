"""Hugging Face BERT-family models whose feed-forward blocks are FFF trees (needs ``transformers``).

A converted model is the source's own ``transformers`` class (``BertModel``,
``BertForMaskedLM``, ``DistilBertModel``, ``RobertaForSequenceClassification``, ...) with every
feed-forward block (intermediate linear, GELU, output linear) swapped for an :class:`FFFBlock`.
Attention, norms, embeddings, poolers and heads stay the ``transformers`` modules, unchanged; no
modelling code is copied. The swap happens in ``__init__``, so ``from_pretrained`` /
``save_pretrained`` / ``Auto*`` classes work as for any ``transformers`` model once
:func:`register_with_transformers` ran (``import ultrafastbert`` arranges that lazily).

``config.json`` carries the source's config plus ``fff_layers``: one ``[n_trees, depth]`` per
layer (``null`` for a layer whose feed-forward block is removed: the ablation), ``ffn_width``
(the dense block's width, for the active fraction), ``ffn_extras`` (parts beside the trees,
see :mod:`.ffn_structures`; null for plain trees) and the sentence-embedding settings
``pooling`` / ``normalize_embeddings`` / ``max_seq_len``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    PretrainedConfig,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from ..errors import ConfigError
from ..fff import FFF
from .ffn_structures import make_extras, make_node_neurons
from .pretrained import set_fff_runtime, set_precision
from .soft_routing import soft_block_forward

logger = logging.getLogger(__name__)

#: Activations an FFF reproduces exactly (the FFF uses the exact erf GELU).
SUPPORTED_ACTIVATIONS = ("gelu",)
#: The three heads a converted model can have, by task name.
TASKS = ("base", "masked-lm", "sequence-classification")


# ------------------------------------------------------------------------------ the blocks
class FFFBlock(nn.Module):
    """A converted feed-forward block: ``FFF(x) + bias``, ``(..., d)`` -> ``(..., d)``.

    ``bias`` is the dense block's output bias (FFF nodes have none). Inputs in another dtype
    than the FFF (a bfloat16 model keeping its FFF blocks in float32) are cast on the way.
    ``extras`` (``{"shared": s, "rank": r, "block": B}``) adds always-on parts beside the trees
    (:class:`~.ffn_structures.ExtraParts`, ``self.extras``) and makes every tree node a block
    of ``B`` neurons (:class:`~.ffn_structures.NodeNeurons`, ``self.node_neurons``, run in
    torch on the routes the trees' kernel returns); None: the plain block.

    ``soft_routing`` (not saved; None: off) is the temperature of the soft routing used while
    distilling (:mod:`.soft_routing`); converted models always run hard-routed.
    """

    def __init__(self, d_model: int, n_trees: int, depth: int, extras: Any = None):
        super().__init__()
        self.fff = FFF(d_model, n_trees=n_trees, depth=depth)
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.extras = make_extras(d_model, extras)  # beside the trees (ffn_structures) or None
        self.node_neurons = make_node_neurons(d_model, n_trees, depth, extras)
        self.soft_routing: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` -> ``(..., d)``."""
        dtype = self.fff.linear_in.weight.dtype
        xf = x if x.dtype == dtype else x.to(dtype)
        if self.soft_routing is not None:
            y = soft_block_forward(self, xf, self.soft_routing)
        elif self.node_neurons is None:
            y = self.fff(xf)
        else:
            y, nodes = self.fff.forward_with_nodes(xf)
            assert nodes is not None
            flat = xf.reshape(-1, xf.shape[-1])
            y = y + self.node_neurons(flat, nodes.reshape(flat.shape[0], -1)).reshape(y.shape)
        y = (y + self.bias.to(dtype)).to(x.dtype)
        return y if self.extras is None else y + self.extras(x)


class RemovedFFN(nn.Module):
    """The ablation: a feed-forward block whose output is zero, ``(..., d)`` -> ``(..., d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like ``x``."""
        return torch.zeros_like(x)


@dataclass(frozen=True)
class DenseFFN:
    """The dense block of one layer: ``w2 @ act(w1 @ x + b1) + b2``.

    Shapes: ``w1`` ``(W, d)``, ``b1`` ``(W,)``, ``w2`` ``(d, W)``, ``b2`` ``(d,)``.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` -> ``(..., d)`` (exact GELU)."""
        return nn.functional.linear(nn.functional.gelu(nn.functional.linear(x, self.w1, self.b1)),
                                    self.w2, self.b2)


# ------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    """Where a ``transformers`` family keeps its feed-forward blocks, and its classes.

    ``layers(base_model)`` lists the transformer layers; ``read_ffn(layer)`` returns the dense
    block (or raises for an unsupported layout); ``install(layer, block)`` swaps a block in;
    ``ffn_input(layer)`` is the module whose forward input is the block's input (for hooks).
    """

    name: str
    config_class: type[PretrainedConfig]
    classes: dict[str, type[nn.Module]]
    activation_key: str
    layers: Callable[[Any], Sequence[Any]]
    read_ffn: Callable[[Any], DenseFFN]
    install: Callable[[Any, Any], None]
    ffn_module: Callable[[Any], Any]
    norm_module: Callable[[Any], nn.LayerNorm]

    @property
    def model_type(self) -> str:
        """The converted models' ``model_type`` (``ultrafastbert-bert``, ...)."""
        return f"ultrafastbert-{self.name}"


def _bert_layers(model: Any) -> Sequence[nn.Module]:
    return list(model.encoder.layer)


def _bert_read(layer: Any) -> DenseFFN:
    inter, out = layer.intermediate, layer.output
    if not isinstance(getattr(inter, "dense", None), nn.Linear) or not isinstance(
            getattr(out, "dense", None), nn.Linear):
        raise ConfigError(f"layer {type(layer).__name__} has no dense feed-forward block "
                          "(intermediate.dense / output.dense): it is already converted or of "
                          "an unsupported layout")
    return DenseFFN(inter.dense.weight, _bias(inter.dense), out.dense.weight, _bias(out.dense))


def _bert_install(layer: Any, block: Any) -> None:
    layer.intermediate = block
    layer.output.dense = nn.Identity()  # BertOutput keeps its dropout, residual and LayerNorm


def _distil_layers(model: Any) -> Sequence[nn.Module]:
    return list(model.transformer.layer)


def _distil_read(layer: Any) -> DenseFFN:
    ffn = layer.ffn
    if not isinstance(getattr(ffn, "lin1", None), nn.Linear):
        raise ConfigError("DistilBERT layer has no dense feed-forward block (ffn.lin1/lin2)")
    return DenseFFN(ffn.lin1.weight, _bias(ffn.lin1), ffn.lin2.weight, _bias(ffn.lin2))


def _distil_install(layer: Any, block: Any) -> None:
    layer.ffn = block


def _bias(linear: Any) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


def _families() -> dict[str, Family]:
    bert_like: dict[str, Any] = dict(activation_key="hidden_act", layers=_bert_layers,
                                     read_ffn=_bert_read, install=_bert_install,
                                     ffn_module=lambda layer: layer.intermediate,
                                     norm_module=lambda layer: layer.output.LayerNorm)
    return {
        "bert": Family("bert", BertConfig, {"base": BertModel, "masked-lm": BertForMaskedLM,
                                             "sequence-classification":
                                                 BertForSequenceClassification}, **bert_like),
        "roberta": Family("roberta", RobertaConfig,
                          {"base": RobertaModel, "masked-lm": RobertaForMaskedLM,
                           "sequence-classification": RobertaForSequenceClassification},
                          **bert_like),
        "distilbert": Family("distilbert", DistilBertConfig,
                             {"base": DistilBertModel, "masked-lm": DistilBertForMaskedLM,
                              "sequence-classification": DistilBertForSequenceClassification},
                             activation_key="activation", layers=_distil_layers,
                             read_ffn=_distil_read, install=_distil_install,
                             ffn_module=lambda layer: layer.ffn,
                             norm_module=lambda layer: layer.output_layer_norm),
    }


FAMILIES = _families()


def family_of(model_type: str) -> Family:
    """The family of a source ``model_type`` (``bert``) or a converted one (``ultrafastbert-bert``)."""
    name = model_type.removeprefix("ultrafastbert-")
    if name not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not of the BERT family this converter "
                          f"takes; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def check_activation(family: Family, config: PretrainedConfig) -> None:
    """Refuse a source whose feed-forward activation an FFF cannot reproduce."""
    act = getattr(config, family.activation_key, None)
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"the source's feed-forward activation {family.activation_key}="
                          f"{act!r} is not supported: FFF nodes use the exact GELU, so only "
                          f"{SUPPORTED_ACTIVATIONS} can be converted")


def token_types(ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """BERT's token types ``(B, S)`` for ``ids`` ``(B, S)``: 1 after the first separator (the
    second text of a pair and its separator), 0 before and at it."""
    sep = (ids == sep_id).long()
    return ((sep.cumsum(1) - sep) > 0).long()


# ------------------------------------------------------------------------------ swapping
def base_model_of(model: Any) -> nn.Module:
    """The encoder of a ``transformers`` model with or without a head."""
    return getattr(model, "base_model", model)


def dense_ffns(model: Any, family: Family) -> list[DenseFFN]:
    """The dense feed-forward block of every layer of ``model`` (views of its weights)."""
    return [family.read_ffn(layer) for layer in family.layers(base_model_of(model))]


def build_blocks(model: Any, family: Family, fff_layers: Sequence[Sequence[int] | None],
                 extras: Sequence[Any] | None = None) -> list[Any]:
    """Swap each layer's feed-forward block for an :class:`FFFBlock` (``[K, D]``, with the
    layer's ``extras`` beside its trees: :mod:`.ffn_structures`) or a :class:`RemovedFFN`
    (``None``); returns the new blocks (randomly initialised)."""
    layers = family.layers(base_model_of(model))
    if len(fff_layers) != len(layers):
        raise ConfigError(f"fff_layers has {len(fff_layers)} entries but the model has "
                          f"{len(layers)} layers; give one KxD or one per layer")
    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else \
        model.config.dim
    extras = list(extras or [None] * len(layers))
    if len(extras) != len(layers):
        raise ConfigError(f"ffn_extras has {len(extras)} entries for {len(layers)} layers")
    blocks: list[Any] = []
    for layer, spec, extra in zip(layers, fff_layers, extras, strict=True):
        block: nn.Module = RemovedFFN() if spec is None else FFFBlock(d_model, int(spec[0]), int(spec[1]), extra)
        ref = next(layer.parameters())
        block.to(device=ref.device, dtype=ref.dtype)
        family.install(layer, block)
        blocks.append(block)
    return blocks


def fff_blocks(model: Any) -> list[Any]:
    """The converted blocks of ``model`` in layer order (FFF or removed)."""
    family = family_of(model.config.model_type)
    return [family.ffn_module(layer) for layer in family.layers(base_model_of(model))]


def post_norms(model: Any) -> list[nn.LayerNorm]:
    """The LayerNorm after each feed-forward block's residual sum, in layer order."""
    family = family_of(model.config.model_type)
    return [family.norm_module(layer) for layer in family.layers(base_model_of(model))]


# ------------------------------------------------------------------------------ classes
class ConvertedMixin:
    """What every converted class adds to its ``transformers`` base: the FFF swap and the
    project's runtime controls (kernel choice, precision)."""

    def _swap_ffns(self) -> None:
        config = self.config  # type: ignore[attr-defined]
        build_blocks(self, family_of(config.model_type), config.fff_layers,  # type: ignore[arg-type]
                     getattr(config, "ffn_extras", None))

    def set_fff_runtime(self, implementation: str = "auto", weight_format: str = "fp32",
                        training: str = "auto") -> None:
        """Choose the inference and training kernels of every FFF block (``FFFRuntime``)."""
        set_fff_runtime(self, implementation, weight_format, training)  # type: ignore[arg-type]

    def set_precision(self, dtype: torch.dtype, fff_dtype: torch.dtype | None = None
                      ) -> ConvertedMixin:
        """Cast to ``dtype``, the FFF blocks to ``fff_dtype`` (see ``PretrainedMixin``)."""
        set_precision(self, dtype, fff_dtype)  # type: ignore[arg-type]
        return self


def _config_class(family: Family) -> type[PretrainedConfig]:
    base = family.config_class

    def __init__(self: Any, fff_layers: list | None = None, ffn_width: int | None = None,
                 pooling: str = "mean", normalize_embeddings: bool = False,
                 max_seq_len: int | None = None, ffn_extras: list | None = None,
                 **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        self.ffn_extras = ffn_extras  # per layer {"shared": s, "rank": r} or None (ffn_structures)
        self.fff_layers = [None if s is None else [int(s[0]), int(s[1])]
                           for s in (fff_layers or [])]
        self.ffn_width, self.pooling = ffn_width, pooling
        self.normalize_embeddings = normalize_embeddings
        self.max_seq_len = max_seq_len or getattr(self, "max_position_embeddings", 512)

    doc = (f"``{base.__name__}`` plus the FFF layout (``fff_layers``) and sentence-embedding "
           "settings of a converted model.")
    return type(f"FFF{base.__name__}", (base,), {"model_type": family.model_type,
                                                 "__init__": __init__, "__doc__": doc,
                                                 "__module__": __name__})


def _model_class(base: type[nn.Module], config_class: type[PretrainedConfig]) -> type[nn.Module]:
    def __init__(self: Any, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        self._swap_ffns()

    doc = f"``{base.__name__}`` whose feed-forward blocks are FFF trees."
    return type(f"FFF{base.__name__}", (ConvertedMixin, base),
                {"config_class": config_class, "__init__": __init__, "__doc__": doc,
                 "__module__": __name__})


def _build_classes() -> tuple[dict[str, type], dict[tuple[str, str], type]]:
    configs, models = {}, {}
    for name, family in FAMILIES.items():
        configs[name] = _config_class(family)
        globals()[configs[name].__name__] = configs[name]  # picklable by qualified name
        for task, base in family.classes.items():
            cls = _model_class(base, configs[name])
            globals()[cls.__name__] = cls
            models[(name, task)] = cls
    return configs, models


CONFIG_CLASSES, MODEL_CLASSES = _build_classes()


def converted_class(family: Family, task: str) -> type[nn.Module]:
    """The converted class of ``family`` for ``task`` (one of :data:`TASKS`)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {TASKS}")
    return MODEL_CLASSES[(family.name, task)]


def task_of(model: Any) -> str:
    """``base``, ``masked-lm`` or ``sequence-classification`` for a (converted or source) model."""
    family = family_of(model.config.model_type)
    for task, base in family.classes.items():
        if isinstance(model, base):
            return task
    raise ConfigError(f"{type(model).__name__} is not one of {family.name}'s supported classes")


def register_with_transformers() -> None:
    """Register every converted config and class with the ``Auto*`` factories (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    autos = {"base": AutoModel, "masked-lm": AutoModelForMaskedLM,
             "sequence-classification": AutoModelForSequenceClassification}
    for name, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(FAMILIES[name].model_type, config_class, exist_ok=True)
        for task, auto in autos.items():
            auto.register(config_class, MODEL_CLASSES[(name, task)], exist_ok=True)


def load_converted(directory: str | os.PathLike, task: str | None = None, **kwargs: Any
                   ) -> Any:
    """Load a converted model directory (no network); ``task`` defaults to the saved class."""
    register_with_transformers()
    config_class: Any = CONFIG_CLASSES[family_of(_read_model_type(directory)).name]
    config = config_class.from_pretrained(
        directory, local_files_only=True)
    family = family_of(config.model_type)
    if task is None:
        task = _saved_task(family, config)
    cls: Any = converted_class(family, task)
    return cls.from_pretrained(directory, local_files_only=True, **kwargs)


def load_transformers(directory: str | os.PathLike, **kwargs: Any) -> Any:
    """A converted model (:func:`load_converted`) or a dense BERT-family one, as its saved class;
    a sentence-transformers folder's pooling, normalisation and length go into its config (as
    a converted model carries them), so inference embeds as the source defines."""
    from .layouts import sentence_transformers_layout

    layout = sentence_transformers_layout(Path(directory))
    model_type = _read_model_type(layout.model_dir)
    if model_type.startswith("ultrafastbert-"):
        return load_converted(layout.model_dir, **kwargs)
    family = family_of(model_type)
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    if not any((layout.model_dir / name).is_file() for name in weights):
        raise ConfigError(f"{layout.model_dir} is a transformers model (model_type "
                          f"{model_type!r}) without weights: it needs one of {weights}")
    config = family.config_class.from_pretrained(layout.model_dir, local_files_only=True)
    cls: Any = family.classes[_saved_task(family, config, prefix="")]
    model = cls.from_pretrained(layout.model_dir, local_files_only=True, **kwargs)
    model.config.pooling, model.config.normalize_embeddings = layout.pooling, layout.normalize
    model.config.max_seq_len = layout.max_seq_len or model.config.max_position_embeddings
    return model


def _read_model_type(directory: str | os.PathLike) -> str:
    import json

    return str(json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
               .get("model_type", ""))


def _saved_task(family: Family, config: PretrainedConfig, prefix: str = "FFF") -> str:
    names = {f"{prefix}{cls.__name__}": task for task, cls in family.classes.items()}
    for arch in getattr(config, "architectures", None) or []:
        if arch in names:
            return names[arch]
    return "base"


# Importing this module imported transformers, which may have fired ultrafastbert's registration
# hook while this module was incomplete (see model.hf.register_with_transformers): register now.
register_with_transformers()
