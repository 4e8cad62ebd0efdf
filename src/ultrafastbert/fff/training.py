"""FFF training: hard routing, gradients through the visited nodes only.

:func:`fff_sparse` is mathematically identical to the original "masked" form
(:func:`fff_masked`: every neuron computed, then multiplied by a 0/1 mask of the visited nodes)
but only touches the ``K*(D+1)`` visited rows per token, so its cost grows with ``K*(D+1)``
instead of ``K*2^(D+1)``. Routing is a non-differentiable choice in both forms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .torch_impl import forward_levels, pack_levels, token_chunk
from .tree import go_right, path_length, tree_offsets, visited_mask

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def route(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
          n_trees: int, depth: int) -> torch.Tensor:
    """Visited nodes ``(T, K, D+1)`` int64 global ids for ``x`` ``(T, d)`` (no autograd)."""
    with torch.no_grad():
        levels = pack_levels(w_in.detach(), None if b_in is None else b_in.detach(), None,
                             n_trees, depth)
        step = token_chunk(n_trees, x.shape[1])
        parts = [forward_levels(c, levels, n_trees, depth, return_nodes=True)[1]
                 for c in x.detach().split(step)]
    return torch.cat(parts)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of the exact (erf) GELU: ``Phi(z) + z * phi(z)``."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _path_logits(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                 idx: torch.Tensor) -> torch.Tensor:
    """Logits ``(T, P)`` at the visited nodes ``idx`` ``(T, P)`` for ``x`` ``(T, d)``."""
    logits = torch.bmm(w_in[idx], x.unsqueeze(2)).squeeze(2)
    return logits + b_in[idx] if b_in is not None else logits


class _SparseFFF(torch.autograd.Function):
    """y = sum_p GELU(x . w_in[idx_p] + b_in[idx_p]) * w_out_rows[idx_p], with its gradient."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, idx):  # noqa: D102
        w_out_rows = w_out.t().contiguous()
        step = token_chunk(idx.shape[1], x.shape[1])
        logits = torch.cat([_path_logits(xc, w_in, b_in, ic)
                            for xc, ic in zip(x.split(step), idx.split(step), strict=True)])
        y = torch.cat([torch.bmm(F.gelu(lc).unsqueeze(1), w_out_rows[ic]).squeeze(1)
                       for lc, ic in zip(logits.split(step), idx.split(step), strict=True)])
        ctx.save_for_backward(x, w_in, w_out_rows, idx, logits)
        ctx.has_bias = b_in is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, w_in, w_out_rows, idx, logits = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        flat = idx.reshape(-1)
        grad_act = torch.bmm(w_out_rows[idx], grad_y.unsqueeze(2)).squeeze(2)
        grad_logit = grad_act * gelu_grad(logits)
        grad_x = torch.bmm(grad_logit.unsqueeze(1), w_in[idx]).squeeze(1)
        d = x.shape[1]
        grad_w_in = torch.zeros_like(w_in).index_add_(
            0, flat, (grad_logit.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, d))
        grad_b = (torch.zeros(w_in.shape[0], dtype=w_in.dtype, device=w_in.device)
                  .index_add_(0, flat, grad_logit.reshape(-1)) if ctx.has_bias else None)
        grad_rows = torch.zeros_like(w_out_rows).index_add_(
            0, flat, (F.gelu(logits).unsqueeze(2) * grad_y.unsqueeze(1)).reshape(-1, d))
        return grad_x, grad_w_in, grad_b, grad_rows.t(), None


def fff_sparse(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
               w_out: torch.Tensor, n_trees: int, depth: int,
               nodes: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable hard-routed FFF over the visited nodes only.

    Args:
        x: ``(T, d)``; w_in: ``(K*N, d)``; b_in: ``(K*N,)`` or None; w_out: ``(d, K*N)``.
        nodes: optional precomputed routes ``(T, K, D+1)``.
    Returns:
        ``(T, d)``, equal to :func:`fff_masked` in value and gradient.
    """
    if nodes is None:
        nodes = route(x, w_in, b_in, n_trees, depth)
    return _SparseFFF.apply(x, w_in, b_in, w_out, nodes.reshape(x.shape[0], -1))


def routes_from_logits(logits: torch.Tensor, n_trees: int, depth: int) -> torch.Tensor:
    """Walk the trees using precomputed logits of every node.

    Args:
        logits: ``(T, K*N)`` logits of all nodes.
    Returns:
        ``(T, K, D+1)`` int64 global ids of the visited nodes.
    """
    base = tree_offsets(n_trees, depth, logits.device)
    local = torch.zeros(logits.shape[0], n_trees, dtype=torch.long, device=logits.device)
    nodes = []
    for _ in range(path_length(depth)):
        node = base + local
        nodes.append(node)
        local = 2 * local + 1 + go_right(logits.gather(1, node)).long()
    return torch.stack(nodes, dim=2)


def fff_masked(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
               w_out: torch.Tensor, n_trees: int, depth: int) -> torch.Tensor:
    """The original dense "masking" form: all ``K*N`` neurons computed, off-path ones zeroed.

    Shapes as in :func:`fff_sparse`. Used as the training baseline and in gradient tests.
    """
    logits = F.linear(x, w_in, b_in)
    mask = visited_mask(routes_from_logits(logits.detach(), n_trees, depth), n_trees, depth)
    return F.linear(F.gelu(logits) * mask, w_out)
