"""Tree maths for fast feedforward (FFF) layers.

K trees of depth D (D = number of decisions). A tree has ``2**(D+1) - 1`` nodes in heap order:
root 0, children of ``i`` are ``2i+1`` (left) and ``2i+2`` (right). Tree ``t`` owns the global
nodes ``t*n_nodes ... (t+1)*n_nodes - 1``. A token visits ``D+1`` nodes per tree.
"""

from __future__ import annotations

import torch

from ..errors import InputError

MAX_DEPTH = 20


def n_nodes(depth: int) -> int:
    """Number of nodes in one tree of ``depth`` decisions."""
    return 2 ** (depth + 1) - 1


def path_length(depth: int) -> int:
    """Number of nodes one token visits in one tree."""
    return depth + 1


def validate_tree_shape(n_trees: int, depth: int) -> None:
    """Raise ``ValueError`` naming the field when ``n_trees``/``depth`` are not usable."""
    if isinstance(n_trees, bool) or not isinstance(n_trees, int) or n_trees < 1:
        raise InputError(f"n_trees must be an int >= 1, got {n_trees!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise InputError(f"depth must be an int in [0, {MAX_DEPTH}], got {depth!r}")


def child(local: torch.Tensor, go_right: torch.Tensor) -> torch.Tensor:
    """Heap child of tree-local node ids: ``2*local + 1 + go_right`` (same shape as ``local``)."""
    return 2 * local + 1 + go_right.to(local.dtype)


def go_right(logits: torch.Tensor) -> torch.Tensor:
    """The routing rule: right iff ``logit > 0``; an exact 0 (and NaN) goes left."""
    return logits > 0


def tree_offsets(n_trees: int, depth: int, device: torch.device | None = None) -> torch.Tensor:
    """Global id of each tree's root, shape ``(n_trees,)`` int64."""
    return torch.arange(n_trees, device=device, dtype=torch.long) * n_nodes(depth)


def visited_mask(nodes: torch.Tensor, n_trees: int, depth: int) -> torch.Tensor:
    """One-hot mask of visited nodes.

    Args:
        nodes: ``(T, K, D+1)`` global node ids.
    Returns:
        ``(T, K * n_nodes)`` bool, True where the token visits the node.
    """
    mask = torch.zeros(nodes.shape[0], n_trees * n_nodes(depth), dtype=torch.bool,
                       device=nodes.device)
    mask.scatter_(1, nodes.reshape(nodes.shape[0], -1), True)
    return mask
