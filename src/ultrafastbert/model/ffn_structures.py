"""Feed-forward structures beyond plain FFF trees: shared neurons, a low-rank term, block nodes.

A converted block is ``FFF(x) + bias``: every token uses ``K (D + 1)`` neurons picked by its
route. A structured block adds parts every token uses, each a small dense map beside the trees:

- ``s`` **shared neurons**: ``W_so GELU(W_si x + b_si)``, ``W_si`` ``(s, d)``, ``W_so``
  ``(d, s)``: what every token needs (in all-MiniLM-L6-v2 the [CLS]/outlier directions carry
  73-99% of the FFN output's energy in layers 0-3);
- a **rank-r linear term**: ``U V x``, ``V`` ``(r, d)``, ``U`` ``(d, r)``;

or makes every tree node a **block of B neurons** (``KxDbB``): node ``n``'s first neuron is the
plain FFF node (its logit routes, exactly as in a plain tree, and it contributes
``GELU(logit) w_out[n]``), and its ``B - 1`` further neurons (:class:`NodeNeurons`, rows
``n (B - 1) + j``) are computed for every token whose path visits ``n``:
``y = FFF(x) + sum over visited n, j < B - 1 of GELU(x . v_in[n, j] + c[n, j]) v_out[n, j]``.

The cost unit is the multiply-add per token: a tree node, a shared neuron and one rank of the
linear term each cost ``2 d`` (an input dot product and an output row), as a dense neuron does,
so ``8x7+s16`` costs ``8 * 8 + 16 = 80`` neuron-equivalents against the dense FFN's width and
``4x7b2`` ``4 * 8 * 2 = 64``.

Specs: ``KxD`` alone is a plain FFF block (its route semantics unchanged); ``KxD+s16``,
``KxD+r16``, ``KxD+s16+r8`` add the parts, ``KxDbB`` makes the nodes blocks (``4x7b2+s8``
combines them). The trees' routes never depend on the extra parts or on a node's further
neurons: the trees run on whatever kernel the FFF picks (which also returns the visited nodes),
the parts beside them in plain torch (:class:`ExtraParts`, a converted block's ``extras``;
None for plain trees) and the block nodes' further neurons in torch, on the kernel's routes
(:class:`NodeNeurons`, a converted block's ``node_neurons``; None for ``B = 1``).
The saved config carries them per layer as ``ffn_extras`` (``{"shared": s, "rank": r}``, with
``"block": B`` when ``B > 1``, or null), next to ``fff_layers``.
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
    """What a layer adds to plain trees: ``shared`` always-on neurons and a ``rank``-r linear
    term beside them (0: none), and ``block`` neurons per tree node (1: plain nodes)."""

    shared: int = 0
    rank: int = 0
    block: int = 1

    def __post_init__(self) -> None:
        if self.shared < 0 or self.rank < 0:
            raise InputError(f"shared neurons and rank must be >= 0, got {self}")
        if self.block < 1:
            raise InputError(f"a tree node holds at least one neuron (block >= 1), got {self}")

    @property
    def cost(self) -> int:
        """Neuron-equivalents per token beside the trees (multiply-adds / ``2 d``)."""
        return self.shared + self.rank

    @property
    def beside(self) -> bool:
        """Whether there are parts beside the trees (shared neurons or a low-rank term)."""
        return self.cost > 0

    def __bool__(self) -> bool:
        return self.beside or self.block > 1

    def to_json(self) -> dict[str, int] | None:
        """``{"shared": s, "rank": r}`` (plus ``"block": B`` when ``B > 1``), or None for a
        plain block."""
        if not self:
            return None
        data = {"shared": self.shared, "rank": self.rank}
        return {**data, "block": self.block} if self.block > 1 else data

    @classmethod
    def from_json(cls, data: Any) -> Extras:
        """The inverse of :meth:`to_json` (None: no extras)."""
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - {"shared", "rank", "block"}:
            raise InputError(f"ffn_extras entry {data!r} is not {{'shared': s, 'rank': r}} "
                             "(with an optional 'block': B)")
        return cls(int(data.get("shared", 0)), int(data.get("rank", 0)),
                   int(data.get("block", 1)))

    @property
    def label(self) -> str:
        """The spec suffix, ``b2+s16+r8`` (empty for none)."""
        return ((f"b{self.block}" if self.block > 1 else "")
                + (f"+s{self.shared}" if self.shared else "")
                + (f"+r{self.rank}" if self.rank else ""))


def parse_extras(parts: Sequence[str], entry: str, block: int = 1) -> Extras:
    """``["s16", "r8"]`` (the ``+``-separated parts after ``KxD`` of ``entry``) and the
    tree's ``block`` neurons per node -> Extras."""
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
    if parts and not values["shared"] and not values["rank"]:
        raise InputError(f"--fff entry {entry!r}: s0 / r0 add nothing; leave the part out")
    return Extras(**values, block=block)


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


class NodeNeurons(nn.Module):
    """The further neurons of block nodes: ``per_node = B - 1`` neurons for each of ``n_nodes``
    tree nodes (rows ``n * per_node + j``), computed for the nodes a token visits.

    ``linear_in.weight`` ``(n_nodes * per_node, d)``, ``linear_in.bias``, ``linear_out.weight``
    ``(d, n_nodes * per_node)``. The forward takes the visited nodes the trees' kernel returned
    and runs in torch over those rows only (``fff.pytorch.training.fff_sparse`` with the routes given:
    gradients through the visited rows, as the trees' training path).
    """

    def __init__(self, d_model: int, n_nodes: int, per_node: int):
        super().__init__()
        if per_node < 1:
            raise InputError(f"block nodes need at least one further neuron, got {per_node}")
        self.per_node = per_node
        self.linear_in = nn.Linear(d_model, n_nodes * per_node)
        self.linear_out = nn.Linear(n_nodes * per_node, d_model, bias=False)

    def rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(T, P * per_node)`` row ids of the visited ``nodes`` ``(T, P)`` (increasing along
        each row when ``nodes`` is, as a kernel's paths are)."""
        j = torch.arange(self.per_node, device=nodes.device)
        return (nodes.unsqueeze(-1) * self.per_node + j).reshape(nodes.shape[0], -1)

    def forward(self, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """``x`` ``(T, d)``, visited ``nodes`` ``(T, P)`` -> ``(T, d)`` in ``x``'s dtype."""
        from ..fff import fff_sparse
        from ..fff.pytorch.sparse import visited_logits

        w_in, b_in = self.linear_in.weight, self.linear_in.bias
        xe = x if x.dtype == w_in.dtype else x.to(w_in.dtype)
        rows = self.rows(nodes)
        with torch.no_grad():
            logits = visited_logits(xe.detach(), w_in.detach(), b_in.detach(), rows)
        y = fff_sparse(xe, w_in, b_in, self.linear_out.weight, 1, 0, routed=(rows, logits))
        return y.to(x.dtype)

    def features(self, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """``(T, n_nodes * per_node)``: each row's activation, zero off the visited nodes (the
        columns the output refit of :mod:`~ultrafastbert.convert.init` solves for)."""
        from ..fff.pytorch.sparse import visited_logits

        rows = self.rows(nodes)
        w_in, b_in = self.linear_in.weight, self.linear_in.bias
        act = torch.zeros(x.shape[0], w_in.shape[0], dtype=x.dtype, device=x.device)
        with torch.no_grad():
            logits = visited_logits(x, w_in.to(x.dtype), b_in.to(x.dtype), rows)
        return act.scatter_(1, rows, nn.functional.gelu(logits))


def make_extras(d_model: int, extras: Any) -> ExtraParts | None:
    """:class:`ExtraParts` for ``extras`` (an :class:`Extras` or its JSON), None when nothing
    stands beside the trees."""
    parts = extras if isinstance(extras, Extras) else Extras.from_json(extras)
    return ExtraParts(d_model, parts) if parts.beside else None


def make_node_neurons(d_model: int, n_trees: int, depth: int, extras: Any
                      ) -> NodeNeurons | None:
    """:class:`NodeNeurons` for a ``KxD`` tree whose nodes are blocks (``extras.block > 1``),
    None for plain nodes."""
    from ..fff.tree import n_nodes

    parts = extras if isinstance(extras, Extras) else Extras.from_json(extras)
    if parts.block == 1:
        return None
    return NodeNeurons(d_model, n_trees * n_nodes(depth), parts.block - 1)


def block_cost(spec: Sequence[int] | None, extras: Any = None) -> int:
    """Neuron-equivalents a token costs in a layer: ``K (D + 1) B + s + r`` (0: removed)."""
    if spec is None:
        return 0
    parts = extras if isinstance(extras, Extras) else Extras.from_json(extras)
    return int(spec[0]) * (int(spec[1]) + 1) * parts.block + parts.cost


@torch.no_grad()
def structured_reference(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A converted block's semantics in float64 (``block.fff``, ``block.bias``,
    ``block.extras``, ``block.node_neurons``): its trees' nodes ``(T, K, D + 1)`` (the FFF
    reference's routes) and ``y`` ``(T, d)`` float64 = FFF + bias + shared + low rank + the
    visited block nodes' further neurons (written out token by token, node by node)."""
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
    neurons = getattr(block, "node_neurons", None)
    if neurons is not None:
        y = y + _node_neurons_reference(neurons, xd, trace.nodes)
    return trace.nodes, y


def _node_neurons_reference(neurons: NodeNeurons, xd: torch.Tensor, nodes: torch.Tensor
                            ) -> torch.Tensor:
    """``(T, d)`` float64: for each token, each visited node ``n`` and ``j < per_node``,
    ``GELU(x . w_in[n B' + j] + b[n B' + j]) w_out[:, n B' + j]`` (``B' = per_node``)."""
    w_in = neurons.linear_in.weight.double()
    b_in = neurons.linear_in.bias.double()
    w_out = neurons.linear_out.weight.double()
    out = torch.zeros(xd.shape[0], w_out.shape[0], dtype=torch.float64)
    for t in range(xd.shape[0]):
        for n in nodes[t].reshape(-1).tolist():
            for j in range(neurons.per_node):
                r = n * neurons.per_node + j
                out[t] += nn.functional.gelu(xd[t] @ w_in[r] + b_in[r]) * w_out[:, r]
    return out


def describe_block(block: Any) -> str:
    """Where a converted block's parts run, in words: the trees on the kernel the dispatcher
    picks for them (block nodes' routing neurons included), block nodes' further neurons and
    the parts beside the trees in torch (no native kernel takes them)."""
    fff = getattr(block, "fff", None)
    if fff is None:
        return "removed (output zero)"
    dtype = fff.linear_in.weight.dtype
    parts = [f"{fff.n_trees}x{fff.depth} trees: kernel {fff.kernel(dtype).name!r} "
             f"({str(dtype).removeprefix('torch.')})"]
    neurons = getattr(block, "node_neurons", None)
    if neurons is not None:
        parts.append(f"block nodes of {neurons.per_node + 1}: the {neurons.per_node} further "
                     "neuron(s) of each visited node in torch (visited rows only, on the "
                     "kernel's routes)")
    extras = getattr(block, "extras", None)
    if extras is not None:
        beside = Extras(extras.spec.shared, extras.spec.rank).label.lstrip("+")
        parts.append(f"{beside} beside the trees: torch linears")
    return "; ".join(parts)
