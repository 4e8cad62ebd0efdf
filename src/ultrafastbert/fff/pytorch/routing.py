"""Routing in PyTorch: walk every tree one level at a time.

Shallow levels (few nodes per tree) are cheapest as a dense GEMM over the level's rows followed
by picking the visited logit; deep levels compute only the visited logits (``sparse``). One
walk serves inference (:func:`walk`, on packed weights, under the caller's no-grad) and
training (:func:`route`: no autograd, bias optional).
"""

from __future__ import annotations

import torch

from ..tree import go_right, n_nodes, path_length, tree_offsets
from .sparse import visited_logits

#: Levels with at most this many nodes per tree use a dense GEMM for the logits.
DENSE_LEVEL_WIDTH = 8


def level_rows(n_trees: int, depth: int, level: int, device: torch.device) -> torch.Tensor:
    """Global heap ids of ``level``'s nodes, tree-major, shape ``(K * 2**level,)``."""
    width = 2**level
    trees = torch.arange(n_trees, device=device).repeat_interleave(width)
    offsets = torch.arange(width, device=device).repeat(n_trees)
    return trees * n_nodes(depth) + (width - 1) + offsets


def shallow_blocks(w_in: torch.Tensor, b_in: torch.Tensor, n_trees: int,
                   depth: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(w, b)`` blocks ``(K*2^l, d)``, ``(K*2^l,)`` of the levels routed with a dense GEMM."""
    blocks = []
    for level in range(path_length(depth)):
        if 2**level > DENSE_LEVEL_WIDTH:
            break
        rows = level_rows(n_trees, depth, level, w_in.device)
        blocks.append((w_in[rows].contiguous(), b_in[rows].contiguous()))
    return blocks


def walk(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, n_trees: int, depth: int,
         blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk every tree for ``x`` ``(T, d)`` with weights ``w_in`` ``(K*N, d)``, ``b_in``.

    Returns ``nodes`` ``(T, K, D+1)`` int64 global ids and their ``logits`` ``(T, K, D+1)``.
    ``blocks`` are precomputed :func:`shallow_blocks` (computed here when None). Autograd is
    the caller's: use :func:`route` for a walk outside the graph.
    """
    if blocks is None:
        blocks = shallow_blocks(w_in, b_in, n_trees, depth)
    tree_base = torch.arange(n_trees, device=x.device) * n_nodes(depth)
    offset = torch.zeros(x.shape[0], n_trees, dtype=torch.long, device=x.device)
    nodes, logits = [], []
    for level in range(path_length(depth)):
        width = 2**level
        node = tree_base + (width - 1) + offset
        if level < len(blocks):
            w, b = blocks[level]
            every = torch.addmm(b, x, w.t())
            logit = every.gather(1, offset + torch.arange(n_trees, device=x.device) * width)
        else:
            logit = visited_logits(x, w_in, b_in, node)
        nodes.append(node)
        logits.append(logit)
        offset = 2 * offset + go_right(logit).long()
    return torch.stack(nodes, dim=2), torch.stack(logits, dim=2)


def route(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, n_trees: int,
          depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visited nodes ``(T, K, D+1)`` int64 and their logits ``(T, K, D+1)`` (no autograd).

    Args:
        x: ``(T, d)``; w_in: ``(K*N, d)``; b_in: ``(K*N,)`` or None (checkpoint layout).
    """
    with torch.no_grad():
        bias = b_in.detach() if b_in is not None else w_in.new_zeros(w_in.shape[0])
        return walk(x.detach(), w_in.detach(), bias, n_trees, depth)


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
