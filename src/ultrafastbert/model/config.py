"""What the model computes: a frozen, validated ``ModelConfig`` and the named presets.

Runtime choices (FFF kernel, dtype, threads) are not here; see ``FFFRuntime`` and ``infer``.
The feed-forward block is either ``DenseFF(width)`` (GELU, ``d -> width -> d``, no biases) or
``FFFSpec(n_trees, depth)`` (fast feedforward, docs/design.md §1.1); no field's meaning depends on another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..fff.tree import MAX_DEPTH, n_nodes
from ..utils.jsonfile import unknown_keys_message

#: Pooling for the classification head: ``first`` token (GLUE) or ``mean`` over non-pad tokens.
POOLERS = ("first", "mean")
#: Bumped when the JSON layout of ``ModelConfig`` changes incompatibly.
CONFIG_FORMAT_VERSION = 1


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low
    if bad or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an int {allowed}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}), got {value!r}")


@dataclass(frozen=True)
class DenseFF:
    """Plain feed-forward block: ``Linear(d, width) -> GELU -> Linear(width, d)``, no biases."""

    width: int

    def __post_init__(self) -> None:
        _check_int("ff.width", self.width, 1)

    @property
    def neurons(self) -> int:
        """Neurons in the block."""
        return self.width

    @property
    def active_neurons(self) -> int:
        """Neurons one token evaluates (all of them)."""
        return self.width

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"kind": "dense", "width": W}``."""
        return {"kind": "dense", "width": self.width}


@dataclass(frozen=True)
class FFFSpec:
    """Fast feedforward block: ``n_trees`` binary trees of ``depth`` decisions."""

    n_trees: int
    depth: int

    def __post_init__(self) -> None:
        _check_int("ff.n_trees", self.n_trees, 1)
        _check_int("ff.depth", self.depth, 0, MAX_DEPTH)

    @property
    def neurons(self) -> int:
        """Neurons in the block: ``K * (2**(D+1) - 1)``."""
        return self.n_trees * n_nodes(self.depth)

    @property
    def active_neurons(self) -> int:
        """Neurons one token evaluates: ``K * (D+1)``."""
        return self.n_trees * (self.depth + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"kind": "fff", "n_trees": K, "depth": D}``."""
        return {"kind": "fff", "n_trees": self.n_trees, "depth": self.depth}


FFKind = DenseFF | FFFSpec
_FF_KEYS = {"dense": ("width",), "fff": ("n_trees", "depth")}


def ff_from_dict(data: Any) -> FFKind:
    """Parse ``{"kind": "dense", "width": W}`` or ``{"kind": "fff", "n_trees": K, "depth": D}``."""
    if isinstance(data, (DenseFF, FFFSpec)):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"ff must be a dict with a 'kind' of {sorted(_FF_KEYS)}, got {data!r}")
    kind = data.get("kind")
    if kind not in _FF_KEYS:
        raise ConfigError(f"ff.kind must be one of {sorted(_FF_KEYS)}, got {kind!r}")
    extra = set(data) - {"kind", *_FF_KEYS[kind]}
    missing = set(_FF_KEYS[kind]) - set(data)
    if extra or missing:
        raise ConfigError(f"ff of kind {kind!r} takes exactly the keys {list(_FF_KEYS[kind])}; "
                          f"unexpected {sorted(extra)}, missing {sorted(missing)}")
    args = {k: data[k] for k in _FF_KEYS[kind]}
    return DenseFF(**args) if kind == "dense" else FFFSpec(**args)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of an UltraFastBERT / crammedBERT encoder and its heads.

    Defaults are UltraFastBERT-1x11 (docs/design.md §1.2). ``num_labels``, ``label_names``, ``pooler``,
    ``classifier_width`` and ``classifier_dropout`` are read by the classification head only.
    """

    vocab_size: int = 32768
    d_model: int = 768
    n_layers: int = 16
    n_heads: int = 12
    max_seq_len: int = 128
    ff: FFKind = field(default_factory=lambda: FFFSpec(1, 11))
    pad_token_id: int = 0
    norm_eps: float = 1e-12
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_std: float = 0.02
    pooler: str = "mean"
    classifier_width: int = 1024
    classifier_dropout: float = 0.1
    num_labels: int = 2
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ff", ff_from_dict(self.ff))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(self.label_names))
        self._validate_sizes()
        self._validate_rates()
        self._validate_head()

    def _validate_sizes(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads="
                              f"{self.n_heads}; choose n_heads among the divisors of d_model")
        _check_int("pad_token_id", self.pad_token_id, 0, self.vocab_size - 1)

    def _validate_rates(self) -> None:
        for name in ("embedding_dropout", "attention_dropout", "hidden_dropout",
                     "classifier_dropout"):
            _check_float(name, getattr(self, name), 0.0, 1.0, low_open=False)
        _check_float("norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        _check_float("init_std", self.init_std, 0.0, 10.0, low_open=True)

    def _validate_head(self) -> None:
        if self.pooler not in POOLERS:
            raise ConfigError(f"pooler must be one of {POOLERS}, got {self.pooler!r}")
        _check_int("classifier_width", self.classifier_width, 1)
        _check_int("num_labels", self.num_labels, 1)
        names = self.label_names
        if names is not None and (len(names) != self.num_labels
                                  or not all(isinstance(n, str) for n in names)):
            raise ConfigError(f"label_names must be {self.num_labels} strings (num_labels), "
                              f"got {names!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``ff`` as a tagged dict, tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["ff"] = self.ff.to_dict()
        out["label_names"] = list(self.label_names) if self.label_names is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown_keys_message(unknown, known)}"
                              f"; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> ModelConfig:
        """A named preset (see :data:`PRESETS`), optionally with ``changes`` applied."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
        return PRESETS[name].replace(**changes) if changes else PRESETS[name]


#: The paper's FFF configurations, ``(K, D)`` with ``K * (2**(D+1) - 1)`` close to 4095.
PAPER_FFF_SHAPES = ((3072, 0), (1536, 1), (512, 2), (256, 3), (128, 4), (64, 5), (32, 6),
                    (16, 7), (8, 8), (4, 9), (2, 10), (1, 11))


def _build_presets() -> dict[str, ModelConfig]:
    base = ModelConfig()
    presets = {
        "crammedbert-3072": base.replace(ff=DenseFF(3072)),
        "crammedbert-4095": base.replace(ff=DenseFF(4095)),
    }
    for k, d in PAPER_FFF_SHAPES:
        presets[f"ultrafastbert-{k}x{d}"] = base.replace(ff=FFFSpec(k, d))
    presets["ultrafastbert-1x11-long"] = presets["ultrafastbert-1x11"]
    tiny = base.replace(n_layers=4, d_model=256, n_heads=4, vocab_size=8192, max_seq_len=128,
                        ff=DenseFF(1023))
    presets["tiny-dense"] = tiny
    presets["tiny-fff"] = tiny.replace(ff=FFFSpec(1, 9))
    return presets


#: Named configurations. ``ultrafastbert-1x11-long`` is the architecture of the released
#: checkpoint (same network as 1x11, trained longer).
PRESETS: dict[str, ModelConfig] = _build_presets()


def preset_names() -> list[str]:
    """All preset names, in definition order."""
    return list(PRESETS)
