"""FFF training in PyTorch: hard routing, gradients through the visited nodes only.

:func:`fff_sparse` is mathematically identical to the original "masked" form
(:func:`fff_masked`: every neuron computed, then multiplied by a 0/1 mask of the visited nodes)
but only touches the ``K*(D+1)`` visited rows per token, so its cost grows with ``K*(D+1)``
instead of ``K*2^(D+1)``. Routing is a non-differentiable choice in both forms.

With ``A`` the sparse ``(T, K*N)`` matrix of visited activations and ``G`` that of the logit
gradients: ``y = A @ W_out^T``, ``dW_out^T = A^T @ dy``, ``dact = (dy @ W_out) at visited``,
``dx = G @ W_in``, ``dW_in = G^T @ x``, ``db = column sums of G``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tree import visited_mask
from .routing import route, routes_from_logits
from .sparse import combine, sparse_csr, uses_csr, visited_logits

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of the exact (erf) GELU: ``Phi(z) + z * phi(z)``."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _sampled_dot(a: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """``out[t, p] = a[t] . rows[nodes[t, p]]`` for ``a`` ``(T, d)``, ``rows`` ``(M, d)``."""
    return visited_logits(a, rows, rows.new_zeros(rows.shape[0]), nodes)


class _Transposed:
    """The ``(M, T)`` transpose of a ``(T, M)`` pattern with ``P`` ids per row, built once.

    ``scatter(coeff, src)`` gives ``out[m] = sum over (t, p) with nodes[t, p] == m of
    coeff[t, p] * src[t]`` as one CSR product (a sort of the ``T*P`` ids, no dense scatter).
    """

    def __init__(self, nodes: torch.Tensor, n_rows: int):
        flat = nodes.reshape(-1)
        self.nodes, self.n_rows = nodes, n_rows
        # a unique key makes the order well defined without a (slow) stable sort
        key = flat * flat.numel() + torch.arange(flat.numel(), device=flat.device)
        self.order = torch.sort(key).indices
        counts = torch.bincount(flat, minlength=n_rows)
        self.crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.cols = torch.div(self.order, nodes.shape[1], rounding_mode="floor")

    def scatter(self, coeff: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``(M, d)`` from ``coeff`` ``(T, P)`` and ``src`` ``(T, d)``."""
        if not uses_csr(src):
            flat = (coeff.unsqueeze(2) * src.unsqueeze(1)).reshape(-1, src.shape[1])
            return src.new_zeros(self.n_rows, src.shape[1]).index_add_(
                0, self.nodes.reshape(-1), flat)
        values = coeff.reshape(-1)[self.order]
        matrix = sparse_csr(self.crow, self.cols, values, (self.n_rows, src.shape[0]))
        return matrix @ src


class _SparseFFF(torch.autograd.Function):
    """``y = sum_p GELU(logit_p) * w_out[:, node_p]`` with logits already computed by routing."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, nodes, logits):  # noqa: D102
        w_out_rows = w_out.t().contiguous()
        y = sparse_forward(w_out_rows, nodes, logits)
        ctx.save_for_backward(x, w_in, w_out_rows, nodes, logits)
        ctx.has_bias = b_in is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, w_in, w_out_rows, nodes, logits = ctx.saved_tensors
        grad_x, grad_w_in, grad_b, grad_rows = sparse_backward(
            grad_y.contiguous(), x, w_in, w_out_rows, nodes, logits, ctx.has_bias)
        return grad_x, grad_w_in, grad_b, grad_rows.t(), None, None


def sparse_forward(w_out_rows: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor
                   ) -> torch.Tensor:
    """``y`` ``(T, d)`` from the visited ``nodes`` and ``logits`` ``(T, K*(D+1))`` and the
    output rows ``(K*N, d)``."""
    return combine(F.gelu(logits), nodes, w_out_rows)


def sparse_backward(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor,
                    w_out_rows: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor,
                    has_bias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients over the visited nodes: ``grad_x`` ``(T, d)``, ``grad_w_in`` ``(K*N, d)``,
    ``grad_b_in`` ``(K*N,)`` (None without bias), ``grad_w_out_rows`` ``(K*N, d)``."""
    n_rows = w_in.shape[0]
    grad_logit = _sampled_dot(grad_y, w_out_rows, nodes) * gelu_grad(logits)
    grad_x = combine(grad_logit, nodes, w_in.contiguous())
    transposed = _Transposed(nodes, n_rows)
    grad_w_in = transposed.scatter(grad_logit, x)
    grad_b = (grad_logit.new_zeros(n_rows).index_add_(0, nodes.reshape(-1),
                                                      grad_logit.reshape(-1))
              if has_bias else None)
    grad_rows = transposed.scatter(F.gelu(logits), grad_y)
    return grad_x, grad_w_in, grad_b, grad_rows


def fff_sparse(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
               w_out: torch.Tensor, n_trees: int, depth: int,
               routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Differentiable hard-routed FFF over the visited nodes only.

    Args:
        x: ``(T, d)``; w_in: ``(K*N, d)``; b_in: ``(K*N,)`` or None; w_out: ``(d, K*N)``.
        routed: optional ``(nodes, logits)`` from :func:`route` for these inputs and weights.
    Returns:
        ``(T, d)``, equal to :func:`fff_masked` in value and gradient.
    """
    nodes, logits = routed if routed is not None else route(x, w_in, b_in, n_trees, depth)
    tokens = x.shape[0]
    return _SparseFFF.apply(x, w_in, b_in, w_out, nodes.reshape(tokens, -1),
                            logits.reshape(tokens, -1))


def fff_masked(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
               w_out: torch.Tensor, n_trees: int, depth: int) -> torch.Tensor:
    """The original dense "masking" form: all ``K*N`` neurons computed, off-path ones zeroed.

    Shapes as in :func:`fff_sparse`. Used as the training baseline and in gradient tests.
    """
    logits = F.linear(x, w_in, b_in)
    mask = visited_mask(routes_from_logits(logits.detach(), n_trees, depth), n_trees, depth)
    return F.linear(F.gelu(logits) * mask, w_out)
