"""Per-layer budgets from the measured error: ``--fff auto:64`` / ``auto:4.2%`` / ``auto:64@6``.

The same total multiply-add budget as a uniform ``KxD`` (``budget`` neuron-equivalents a token
per layer on average, i.e. ``L * budget / (D + 1)`` trees of depth ``D`` in all), spent where
the dense blocks are hardest to match with few neurons. The measure is cheap and needs no
fitting (the per-token oracle of ``benchmarks/ffn_topk_bound.py``): on the init's sample of
each block's inputs, keep each token's ``k`` dense neurons with the largest contributions
``|GELU(a_j)| |w2_j|`` and read the **post-norm error** of the layer's output (after the
residual sum and the layer's LayerNorm, relative to removing the block: 0 kept, 1 as if
removed), for ``k = m (D + 1)``, ``m`` trees. Trees are then handed out one at a time, each to
the layer whose error it lowers most (every layer gets at least one): for error curves that
flatten as ``k`` grows this greedy split is the one with the lowest summed error.

The choice and the curves it came from are recorded in ``conversion.json``
(``fff_allocation``); the saved model holds the chosen ``fff_layers`` like any per-layer list.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

_AUTO = re.compile(r"^\s*auto\s*:\s*(\d+(?:\.\d+)?)\s*(%?)\s*(?:@\s*(\d+))?\s*$", re.IGNORECASE)
DEFAULT_DEPTH = 7
#: Tokens a layer the measurement reads (the oracle curve is smooth; 4,096 take seconds).
MEASURE_TOKENS = 4096


@dataclass(frozen=True)
class AutoBudget:
    """``--fff auto:...``: ``budget`` neuron-equivalents a token per layer (mean over layers)
    in trees of ``depth``."""

    budget: float
    depth: int = DEFAULT_DEPTH

    def total_trees(self, n_layers: int) -> int:
        """Trees in all layers together: ``floor(L * budget / (D + 1))``."""
        return int(n_layers * self.budget // (self.depth + 1))


def is_auto(spec: Any) -> bool:
    """Whether ``spec`` is an ``auto:`` spec."""
    return isinstance(spec, str) and spec.strip().lower().startswith("auto")


def parse_auto(spec: str, ffn_width: int, n_layers: int) -> AutoBudget:
    """``auto:64`` (neuron-equivalents a token), ``auto:4.2%`` (of the dense width
    ``ffn_width``), optional ``@D`` (tree depth, default 7) -> :class:`AutoBudget`."""
    match = _AUTO.match(spec)
    if match is None:
        raise InputError(f"--fff {spec!r} is not auto:N (N neurons a token per layer on "
                         "average), auto:P% (P% of the dense FFN's width) or either with @D "
                         "(tree depth), e.g. auto:64 or auto:4.2%@7")
    value = float(match.group(1))
    budget = value / 100.0 * ffn_width if match.group(2) else value
    depth = int(match.group(3)) if match.group(3) is not None else DEFAULT_DEPTH
    if depth > 20:
        raise InputError(f"--fff {spec!r}: tree depth must be <= 20")
    auto = AutoBudget(budget, depth)
    if auto.total_trees(n_layers) < n_layers:
        raise InputError(f"--fff {spec!r}: {budget:g} neurons a token buys fewer than one tree "
                         f"of depth {depth} ({depth + 1} neurons) per layer; raise the budget "
                         "or lower the depth")
    return auto


@torch.no_grad()
def oracle_curve(x: torch.Tensor, dense: Any, norm: Callable[[torch.Tensor], torch.Tensor],
                 ks: Sequence[int]) -> list[float]:
    """Post-norm error of each token's own ``k`` largest dense neurons, for each ``k`` in
    ``ks`` (increasing): ``x`` ``(N, d)`` the block's inputs, ``dense`` its
    :class:`~ultrafastbert.model.converted.DenseFFN`, ``norm`` the layer's frozen norm after
    the residual sum. Returns one error per ``k`` (0: the block's effect kept, 1: removed)."""
    x = x.float()
    w1, b1 = dense.w1.float(), dense.b1.float()
    rows, b2 = dense.w2.float().T, dense.b2.float()  # (W, d), (d,)
    act = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1))  # (N, W)
    order = (act.abs() * rows.norm(dim=1)).argsort(dim=1, descending=True)
    full = norm(x + act @ rows + b2)
    removed = (norm(x) - full).pow(2).sum().clamp_min(1e-30)
    y = torch.zeros_like(x) + b2
    errors, have = [], 0
    for k in ks:
        idx = order[:, have:k]  # (N, k - have)
        y = y + torch.einsum("nk,nkd->nd", act.gather(1, idx), rows[idx])
        have = k
        errors.append(float((norm(x + y) - full).pow(2).sum() / removed))
    return errors


def allocate(curves: Sequence[Sequence[float]], total_trees: int) -> list[int]:
    """Trees per layer: one each, then each further tree to the layer whose error
    ``curves[l][m - 1]`` (with ``m`` trees) falls most with one more (ties: the lower layer).
    ``curves[l]`` must cover ``m = 1 .. total_trees - L + 1``."""
    n_layers = len(curves)
    if total_trees < n_layers:
        raise InputError(f"{total_trees} trees cannot give each of {n_layers} layers one")
    trees = [1] * n_layers
    for _ in range(total_trees - n_layers):
        gains = [curves[i][trees[i] - 1] - curves[i][trees[i]] for i in range(n_layers)]
        best = max(range(n_layers), key=lambda i: (gains[i], -i))
        trees[best] += 1
    return trees


def plan(auto: AutoBudget, xs: Sequence[torch.Tensor], dense: Sequence[Any],
         norms: Sequence[Callable[[torch.Tensor], torch.Tensor]], ffn_width: int,
         max_tokens: int = MEASURE_TOKENS) -> dict[str, Any]:
    """Measure each layer's oracle curve on (at most ``max_tokens`` of) its inputs ``xs[l]``
    ``(N, d)`` and split ``auto``'s trees; returns the record for ``conversion.json``
    (``fff_layers``, the curves, the budget)."""
    n_layers = len(xs)
    total = auto.total_trees(n_layers)
    per_tree = auto.depth + 1
    most = min(total - n_layers + 1, ffn_width // per_tree)  # trees a layer could get
    ks = [m * per_tree for m in range(1, most + 2)]
    ks = [min(k, ffn_width) for k in ks]
    curves = [oracle_curve(x[:max_tokens], d, n, ks) for x, d, n in
              zip(xs, dense, norms, strict=True)]
    trees = allocate([c + [c[-1]] * max(0, total - len(c) + 1) for c in curves], total)
    log.info("auto budget %.1f a token in trees of depth %d: %s trees per layer",
             auto.budget, auto.depth, trees)
    return {"budget_per_layer": auto.budget, "depth": auto.depth, "total_trees": total,
            "trees": trees, "fff_layers": [[t, auto.depth] for t in trees],
            "neurons": [t * per_tree for t in trees], "ks": ks,
            "oracle_post_norm_error": [[round(e, 4) for e in c] for c in curves],
            "tokens": int(min(max_tokens, xs[0].shape[0])) if n_layers else 0}
