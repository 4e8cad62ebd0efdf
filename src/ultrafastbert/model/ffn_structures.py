"""Feed-forward structures beside the FFF trees: always-on (shared) neurons and a low-rank term.

A converted block is ``FFF(x) + bias``: every token uses ``K (D + 1)`` neurons picked by its
route. A structured block adds parts every token uses, each a small dense map beside the trees:

- ``s`` **shared neurons**: ``W_so GELU(W_si x + b_si)``, ``W_si`` ``(s, d)``, ``W_so``
  ``(d, s)``: what every token needs (in all-MiniLM-L6-v2 the [CLS]/outlier directions carry
  73-99% of the FFN output's energy in layers 0-3);
- a **rank-r linear term**: ``U V x``, ``V`` ``(r, d)``, ``U`` ``(d, r)``.

The cost unit is the multiply-add per token: a tree node, a shared neuron and one rank of the
linear term each cost ``2 d`` (an input dot product and an output row), as a dense neuron does,
so ``8x7+s16`` costs ``8 * 8 + 16 = 80`` neuron-equivalents against the dense FFN's width.

Specs: ``KxD`` alone is a plain FFF block (its route semantics unchanged); ``KxD+s16``,
``KxD+r16``, ``KxD+s16+r8`` add the parts. The trees' routes never depend on the extra parts,
which run in plain torch beside whatever kernel the FFF uses (:class:`ExtraParts`, a
converted block's ``extras``; None for plain trees).
The saved config carries them per layer as ``ffn_extras`` (``{"shared": s, "rank": r}`` or
null), next to ``fff_layers``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError

_PART = re.compile(r"^\s*([sr])\s*(\d+)\s*$")
_NAMES = {"s": "shared", "r": "rank"}


@dataclass(frozen=True)
class Extras:
    """The parts beside a layer's trees: ``shared`` always-on neurons, a ``rank``-r linear
    term (0: none)."""

    shared: int = 0
    rank: int = 0

    def __post_init__(self) -> None:
        if self.shared < 0 or self.rank < 0:
            raise InputError(f"shared neurons and rank must be >= 0, got {self}")

    @property
    def cost(self) -> int:
        """Neuron-equivalents per token (multiply-adds / ``2 d``)."""
        return self.shared + self.rank

    def __bool__(self) -> bool:
        return self.cost > 0

    def to_json(self) -> dict[str, int] | None:
        """``{"shared": s, "rank": r}``, or None when there is nothing beside the trees."""
        return {"shared": self.shared, "rank": self.rank} if self else None

    @classmethod
    def from_json(cls, data: Any) -> Extras:
        """The inverse of :meth:`to_json` (None: no extras)."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - {"shared", "rank"}:
            raise InputError(f"ffn_extras entry {data!r} is not {{'shared': s, 'rank': r}}")
        return cls(int(data.get("shared", 0)), int(data.get("rank", 0)))

    @property
    def label(self) -> str:
        """The spec suffix, ``+s16+r8`` (empty for none)."""
        return (f"+s{self.shared}" if self.shared else "") + (f"+r{self.rank}" if self.rank
                                                              else "")


def parse_extras(parts: Sequence[str], entry: str) -> Extras:
    """``["s16", "r8"]`` (the ``+``-separated parts after ``KxD`` of ``entry``) -> Extras."""
    values = {"shared": 0, "rank": 0}
    for part in parts:
        match = _PART.match(part)
        if match is None:
            raise InputError(f"--fff entry {entry!r}: {part!r} is not s<N> (N shared neurons) "
                             "or r<N> (a rank-N linear term), e.g. 8x7+s16 or 8x7+r16")
        name = _NAMES[match.group(1)]
        if values[name]:
            raise InputError(f"--fff entry {entry!r} gives {name} twice")
        values[name] = int(match.group(2))
    if not values["shared"] and not values["rank"]:
        raise InputError(f"--fff entry {entry!r}: s0 / r0 add nothing; leave the part out")
    return Extras(**values)


class SharedNeurons(nn.Module):
    """``s`` always-on neurons, ``(..., d)`` -> ``(..., d)``: ``linear_out(GELU(linear_in(x)))``
    (exact GELU; no output bias: the block's bias covers it)."""

    def __init__(self, d_model: int, n_neurons: int):
        super().__init__()
        self.linear_in = nn.Linear(d_model, n_neurons)
        self.linear_out = nn.Linear(n_neurons, d_model, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' activations ``(..., s)``."""
        return nn.functional.gelu(self.linear_in(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` -> ``(..., d)``."""
        return self.linear_out(self.features(x))


class LowRank(nn.Module):
    """A rank-``r`` linear map, ``(..., d)`` -> ``(..., d)``: ``up(down(x))``, no biases."""

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``r`` coordinates ``(..., r)``."""
        return self.down(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` -> ``(..., d)``."""
        return self.up(self.down(x))


class ExtraParts(nn.Module):
    """The parts of :class:`Extras` beside a block's trees, ``(..., d)`` -> ``(..., d)``:
    ``shared(x) + lowrank(x)``, in their own dtype (a model cast with ``set_precision`` casts
    them with the rest of the model; inputs in another dtype are cast on the way)."""

    def __init__(self, d_model: int, extras: Extras):
        super().__init__()
        if not extras:
            raise InputError("extra parts need shared neurons or a rank > 0")
        self.spec = extras
        self.shared = SharedNeurons(d_model, extras.shared) if extras.shared else None
        self.lowrank = LowRank(d_model, extras.rank) if extras.rank else None

    def parts(self) -> list[SharedNeurons | LowRank]:
        """The parts in a fixed order (shared, then low rank)."""
        return [p for p in (self.shared, self.lowrank) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` -> ``(..., d)`` in ``x``'s dtype."""
        dtype = next(self.parameters()).dtype
        xe = x if x.dtype == dtype else x.to(dtype)
        out = sum(p(xe) for p in self.parts())
        assert isinstance(out, torch.Tensor)
        return out.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, s + r)``: the shared neurons' activations, then the low-rank coordinates (the
        columns the output refit of :mod:`~ultrafastbert.convert.init` solves for)."""
        return torch.cat([p.features(x) for p in self.parts()], -1)

    def output_columns(self) -> list[torch.Tensor]:
        """The output weights ``(d, s)``, ``(d, r)`` matching :meth:`features`."""
        return [p.linear_out.weight if isinstance(p, SharedNeurons) else p.up.weight
                for p in self.parts()]


def make_extras(d_model: int, extras: Any) -> ExtraParts | None:
    """:class:`ExtraParts` for ``extras`` (an :class:`Extras` or its JSON), None for none."""
    parts = extras if isinstance(extras, Extras) else Extras.from_json(extras)
    return ExtraParts(d_model, parts) if parts else None


def block_cost(spec: Sequence[int] | None, extras: Any = None) -> int:
    """Neuron-equivalents a token costs in a layer: ``K (D + 1) + s + r`` (0: removed)."""
    if spec is None:
        return 0
    parts = extras if isinstance(extras, Extras) else Extras.from_json(extras)
    return int(spec[0]) * (int(spec[1]) + 1) + parts.cost


@torch.no_grad()
def structured_reference(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A converted block's semantics in float64 (``block.fff``, ``block.bias``,
    ``block.extras``): its trees' nodes ``(T, K, D + 1)`` (the FFF reference's routes) and
    ``y`` ``(T, d)`` float64 = FFF + bias + shared + low rank."""
    from ..fff import fff_reference

    fff = block.fff
    xd = x.double()
    trace = fff_reference(xd, fff.linear_in.weight, fff.linear_in.bias, fff.linear_out.weight,
                          fff.n_trees, fff.depth)
    y = trace.y.double() + block.bias.double()
    extras = getattr(block, "extras", None)
    if extras is not None:
        if extras.shared is not None:
            s = extras.shared
            act = nn.functional.gelu(xd @ s.linear_in.weight.double().T
                                     + s.linear_in.bias.double())
            y = y + act @ s.linear_out.weight.double().T
        if extras.lowrank is not None:
            lr = extras.lowrank
            y = y + (xd @ lr.down.weight.double().T) @ lr.up.weight.double().T
    return trace.nodes, y
