"""Start an FFF from its dense block's neurons, on that block's own inputs.

Greedy tree growth (:func:`greedy_fff`): trees are grown one after another on the residual that
the earlier trees leave. At a node holding tokens ``S``, every dense neuron ``j`` is scored by how
much of the residual on ``S`` its activation ``a_j = GELU(x·w1_j + b1_j)`` explains with a
least-squares output row, ``|a_j^T R_S|^2 / |a_j|^2``; the best one becomes the node (its input
row and bias, so the node routes right exactly where that neuron fires) with the fitted output
row, and its children are grown on the tokens it sends each way. ``split="median"`` shifts the
node's bias so it halves its tokens (balanced trees, all leaves used); ``"neuron"`` keeps the dense
bias. Finally all output rows and the output bias are refitted jointly by ridge least squares
given the routes (:func:`refit_outputs`).

Everything runs on a sample of real inputs (``x`` ``(N, d)``) and the dense block's outputs
(``y`` ``(N, d)``, bias included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..fff.pytorch.routing import route
from ..fff.tree import n_nodes
from ..model.converted import DenseFFN, FFFBlock
from ..model.ffn_structures import ExtraParts

log = logging.getLogger(__name__)

SPLITS = ("median", "neuron")


@dataclass(frozen=True)
class InitReport:
    """How well a block fits its dense block on the sample: relative squared error
    ``|FFF(x) - y|^2 / |y - mean(y)|^2`` after greedy growth and after the refit."""

    greedy: float
    refit: float


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``|pred - target|^2 / |target - mean(target)|^2`` over all rows, ``(N, d)`` inputs."""
    centred = target - target.mean(0, keepdim=True)
    return float((pred - target).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def init_block(block: FFFBlock, dense: DenseFFN, x: torch.Tensor, *, split: str = "median",
               ridge: float = 1e-3, target: torch.Tensor | None = None) -> InitReport:
    """Initialise ``block`` from ``dense`` on inputs ``x`` ``(N, d)``; returns the fit.

    The block is fitted to ``target`` ``(N, d)``, by default the dense block's outputs on ``x``.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise InputError(f"init needs a (N >= 2, d) sample of the block's inputs, got "
                         f"{tuple(x.shape)}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if target is not None and target.shape != x.shape:
        raise InputError(f"init target {tuple(target.shape)} does not match the inputs "
                         f"{tuple(x.shape)}")
    x = x.float()
    y = dense(x).float() if target is None else target.float()
    fff = block.fff
    # Parts beside the trees first (low rank, then shared neurons); the trees grow on what
    # they leave, and the final refit solves every output row jointly.
    extra = torch.zeros_like(y) if block.extras is None else init_extras(
        block.extras, dense, x, y - dense.b2.float(), ridge)
    neurons = block.node_neurons
    per_node = 0 if neurons is None else neurons.per_node
    (w_in, b_in, w_out), companions = greedy_fff(
        x, y - dense.b2.float() - extra, dense, fff.n_trees, fff.depth, split, per_node)
    fff.linear_in.weight.copy_(w_in)
    fff.linear_in.bias.copy_(b_in)
    fff.linear_out.weight.copy_(w_out.T)
    if neurons is not None and companions is not None:
        neurons.linear_in.weight.copy_(companions[0])
        neurons.linear_in.bias.copy_(companions[1])
        neurons.linear_out.weight.copy_(companions[2].T)
    block.bias.copy_(dense.b2)
    greedy = relative_error(block(x), y)
    refit_outputs(block, x, y, ridge)
    report = InitReport(greedy, relative_error(block(x), y))
    log.info("FFF %dx%d init: relative error %.3f greedy, %.3f refit", fff.n_trees, fff.depth,
             report.greedy, report.refit)
    return report


@dataclass(frozen=True)
class _Neurons:
    """The dense neurons on the sample: logits ``pre`` ``(N, W)``, input rows ``w1`` ``(W, d)``,
    biases ``b1`` ``(W,)`` and output-row energies ``out_energy`` ``(W,)``."""

    pre: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    out_energy: torch.Tensor


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _empty_rows(n: int, d: int) -> Rows:
    return torch.zeros(n, d), torch.zeros(n), torch.zeros(n, d)


def greedy_fff(x: torch.Tensor, residual: torch.Tensor, dense: DenseFFN, n_trees: int,
               depth: int, split: str, per_node: int = 0) -> tuple[Rows, Rows | None]:
    """Grow ``n_trees`` trees on ``residual`` ``(N, d)``; returns the nodes' ``w_in``
    ``(K*M, d)``, ``b_in`` ``(K*M,)``, ``w_out`` ``(K*M, d)`` (node-major), ``M =
    2**(depth+1) - 1``, and with ``per_node > 0`` (block nodes) each node's further neurons,
    the same three for ``K*M*per_node`` rows (node ``g``'s at ``g*per_node + j``; else None).

    A block node's further neurons are chosen after its routing neuron, on the same tokens and
    by the same score on what the routing neuron leaves (dense biases kept: they do not route).
    """
    w1, b1 = dense.w1.float(), dense.b1.float()
    neurons = _Neurons(torch.nn.functional.linear(x, w1, b1), w1, b1,
                       dense.w2.float().pow(2).sum(0))
    m = n_nodes(depth)
    rows = _empty_rows(n_trees * m, x.shape[1])
    extra = _empty_rows(n_trees * m * per_node, x.shape[1]) if per_node else None
    residual = residual.clone()
    for tree in range(n_trees):
        stack = [(0, torch.arange(x.shape[0]))]
        while stack:
            node, tokens = stack.pop()
            g = tree * m + node
            right, j = _grow_node(g, tokens, neurons, residual, split, rows)
            if extra is not None:
                chosen = {j}
                for i in range(per_node):
                    chosen.add(_grow_node(g * per_node + i, tokens, neurons, residual,
                                          "neuron", extra, exclude=chosen)[1])
            if 2 * node + 2 < m:
                stack.append((2 * node + 1, tokens[~right]))
                stack.append((2 * node + 2, tokens[right]))
    return rows, extra


def _grow_node(g: int, tokens: torch.Tensor, neurons: _Neurons, residual: torch.Tensor,
               split: str, rows: Rows, candidates: int = 96, score_tokens: int = 512,
               exclude: set[int] | None = None) -> tuple[torch.Tensor, int]:
    """Choose node ``g``'s neuron on ``tokens``, fit its output row, update the residual;
    returns which of ``tokens`` go right and the dense neuron chosen. ``rows`` = ``(w_in,
    b_in, w_out)`` being filled; ``exclude``: dense neurons not to choose.

    Scoring every neuron on every token costs ``S * W * d`` per node; instead the ``candidates``
    neurons whose dense contribution has the most energy on (at most ``score_tokens`` of) the
    node's tokens are scored exactly, and the chosen one's output row is fitted on all tokens.
    """
    w_in, b_in, w_out = rows
    if tokens.numel() == 0:  # an unreachable node on the sample: any neuron, no output
        j = g % neurons.w1.shape[0]
        w_in[g], b_in[g] = neurons.w1[j], neurons.b1[j]
        return torch.zeros(0, dtype=torch.bool), j
    sub = tokens[::max(1, tokens.numel() // score_tokens)]
    p_sub = neurons.pre[sub]  # (s, W): gathering all S rows would cost more than the scoring
    energy = torch.nn.functional.gelu(p_sub).pow(2).sum(0) * neurons.out_energy
    if exclude:
        energy[list(exclude)] = -1.0
    pick = energy.topk(min(candidates, energy.numel())).indices
    shift = _shifts(p_sub[:, pick]) if split == "median" else torch.zeros(len(pick))
    a_c = torch.nn.functional.gelu(p_sub[:, pick] + shift)  # (s, C)
    ar = a_c.T @ residual[sub]  # (C, d)
    best = int((ar.pow(2).sum(1) / a_c.pow(2).sum(0).clamp_min(1e-12)).argmax())
    j, bias = int(pick[best]), neurons.b1[int(pick[best])] + shift[best]
    logit = neurons.pre[tokens, j] - neurons.b1[j] + bias
    a_j = torch.nn.functional.gelu(logit)  # (S,)
    r = residual[tokens]
    row = (a_j @ r) / a_j.pow(2).sum().clamp_min(1e-12)
    w_in[g], b_in[g], w_out[g] = neurons.w1[j], bias, row
    residual[tokens] = r - a_j[:, None] * row
    return logit > 0, j


def _shifts(pre: torch.Tensor) -> torch.Tensor:
    """Per neuron, the bias change that puts its split at the median of ``pre`` ``(S, C)``."""
    if pre.shape[0] < 2:
        return torch.zeros(pre.shape[1])
    return -pre.median(0).values


@torch.no_grad()
def refit_outputs(block: FFFBlock, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> None:
    """Refit every output row and the output bias jointly, given the routes on ``x``.

    Solves ``min |A W + 1 b^T - y|^2 + ridge * tr(A^T A) / M * |W|^2`` with ``A`` ``(N, M)``
    the visited nodes' activations (zero elsewhere); a structured block's block-node neurons
    (zero off the visited nodes), shared-neuron activations and low-rank coordinates are
    further columns of ``A``, their output weights rows of ``W``.
    """
    fff = block.fff
    act, nodes = _activations(fff, x)  # (N, M), (N, K*(D+1))
    parts = [act]
    outputs = [fff.linear_out.weight]
    if block.node_neurons is not None:
        parts.append(block.node_neurons.features(x, nodes))
        outputs.append(block.node_neurons.linear_out.weight)
    if block.extras is not None:
        parts.append(block.extras.features(x))
        outputs.extend(block.extras.output_columns())
    design = torch.cat([*parts, torch.ones(x.shape[0], 1)], 1)
    solution = _ridge(design, y, ridge)  # (columns + 1, d)
    start = 0
    for weight in outputs:
        weight.copy_(solution[start:start + weight.shape[1]].T)
        start += weight.shape[1]
    block.bias.copy_(solution[-1])


def _ridge(design: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(C, d)`` least squares of ``y`` ``(N, d)`` on ``design`` ``(N, C)`` (last column:
    ones, not penalised), ridge ``ridge * mean diagonal`` on the others."""
    gram = (design.T @ design).double()  # float32 products (fast), solved in float64
    reg = ridge * gram.diagonal()[:-1].mean()
    gram[:-1, :-1] += reg * torch.eye(gram.shape[0] - 1, dtype=gram.dtype)
    return torch.linalg.solve(gram, (design.T @ y).double()).float()


@torch.no_grad()
def init_extras(block: ExtraParts, dense: DenseFFN, x: torch.Tensor,
                target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Fit the parts beside the trees to ``target`` ``(N, d)`` (the block output less the
    dense output bias) on ``x`` ``(N, d)``; returns the part of ``target`` they explain
    ``(N, d)`` (the low-rank term centred: the mean is left to the bias).

    Low rank: the best rank-r linear map of the centred data (reduced-rank regression: the
    least-squares map ``B``, then the top-r right singular vectors ``V_r`` of ``X B``: ``down =
    (B V_r)^T``, ``up = V_r``). Shared neurons: on what is left, the dense neurons chosen
    greedily over *all* tokens as a tree's root is (:func:`_grow_node`: the candidates with
    the most contribution energy, the one whose least-squares output row explains the most
    residual), so the always-on neurons are what every token needs (in all-MiniLM-L6-v2,
    what [CLS] and the outlier dimensions carry).
    """
    residual = target.clone()
    if block.lowrank is not None:
        xc = x - x.mean(0, keepdim=True)
        yc = residual - residual.mean(0, keepdim=True)
        gram = (xc.T @ xc).double()
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        b = torch.linalg.solve(gram, (xc.T @ yc).double())  # (d, d)
        _, _, vh = torch.linalg.svd(xc.double() @ b, full_matrices=False)
        v_r = vh[:block.spec.rank].T  # (d, r)
        block.lowrank.down.weight.copy_((b @ v_r).T.float())
        block.lowrank.up.weight.copy_(v_r.float())
        low = block.lowrank(x)
        residual -= low - low.mean(0, keepdim=True)  # the mean stays for the bias
    if block.shared is not None:
        s = block.spec.shared
        w1, b1 = dense.w1.float(), dense.b1.float()
        neurons = _Neurons(torch.nn.functional.linear(x, w1, b1), w1, b1,
                           dense.w2.float().pow(2).sum(0))
        rows = (torch.zeros(s, x.shape[1]), torch.zeros(s), torch.zeros(s, x.shape[1]))
        everyone = torch.arange(x.shape[0])
        for g in range(s):
            _grow_node(g, everyone, neurons, residual, "neuron", rows)
        block.shared.linear_in.weight.copy_(rows[0])
        block.shared.linear_in.bias.copy_(rows[1])
        block.shared.linear_out.weight.copy_(rows[2].T)
    return target - residual


def _activations(fff: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K*M)``: GELU of each visited node's logit, zero at nodes off the token's paths;
    and the visited nodes ``(N, K*(D+1))``."""
    w, b = fff.linear_in.weight.float(), fff.linear_in.bias.float()
    nodes, logits = route(x, w, b, fff.n_trees, fff.depth)[:2]
    act = torch.zeros(x.shape[0], w.shape[0])
    flat = nodes.reshape(x.shape[0], -1)
    act.scatter_(1, flat, torch.nn.functional.gelu(logits.reshape(x.shape[0], -1)))
    return act, flat
