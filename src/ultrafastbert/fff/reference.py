"""The reference FFF: the specification every fast path is tested against.

Plain and readable, in float64, one tree and one level at a time (vectorised over tokens only).
Semantics (docs/design.md §1.1)::

    logit_n = x . w_in[n] + b_in[n]
    go right iff logit_n > 0 (an exact 0 goes left)
    y = sum over trees, sum over visited n of GELU(logit_n) * w_out[:, n]   (exact erf GELU)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .tree import go_right, n_nodes, path_length


class FFFTrace(NamedTuple):
    """What a forward pass did.

    y: ``(T, d)`` output. nodes: ``(T, K, D+1)`` int64 global node ids visited.
    logits: ``(T, K, D+1)`` the logit at each visited node.
    """

    y: torch.Tensor
    nodes: torch.Tensor
    logits: torch.Tensor


def fff_reference(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                  w_out: torch.Tensor, n_trees: int, depth: int) -> FFFTrace:
    """Evaluate the FFF exactly as specified, in float64.

    Args:
        x: ``(T, d)`` inputs.
        w_in: ``(K*N, d)`` input rows (``linear_in.weight``).
        b_in: ``(K*N,)`` input biases or None.
        w_out: ``(d, K*N)`` output columns (``linear_out.weight``, checkpoint layout).
    Returns:
        An :class:`FFFTrace`; ``y`` is cast back to ``x.dtype``, logits stay float64.
    """
    xd, wi, wo = x.double(), w_in.double(), w_out.double()
    bi = b_in.double() if b_in is not None else torch.zeros(wi.shape[0], dtype=torch.float64,
                                                              device=x.device)
    tokens = x.shape[0]
    y = torch.zeros(tokens, x.shape[1], dtype=torch.float64, device=x.device)
    nodes = torch.empty(tokens, n_trees, path_length(depth), dtype=torch.long, device=x.device)
    logits = torch.empty(tokens, n_trees, path_length(depth), dtype=torch.float64, device=x.device)
    for tree in range(n_trees):
        local = torch.zeros(tokens, dtype=torch.long, device=x.device)
        for level in range(path_length(depth)):
            node = tree * n_nodes(depth) + local
            logit = (xd * wi[node]).sum(dim=1) + bi[node]
            y += F.gelu(logit).unsqueeze(1) * wo[:, node].T
            nodes[:, tree, level] = node
            logits[:, tree, level] = logit
            local = 2 * local + 1 + go_right(logit).long()
    return FFFTrace(y.to(x.dtype), nodes, logits)
