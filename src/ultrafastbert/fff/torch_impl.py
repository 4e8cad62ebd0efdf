"""Vectorised PyTorch FFF: routing, sparse output, and the inference kernel built on them.

Works on every device and dtype and needs no compiler. Routing walks all trees one level at a
time. Shallow levels (few nodes per tree) are cheapest as a dense GEMM over the level's rows
followed by picking the visited logit; deep levels compute only the visited logits, with a
sampled dense-dense product on a CSR pattern (float32/float64) or gathers (other dtypes).
The output ``sum_p GELU(logit_p) * w_out_row[node_p]`` is one CSR-times-dense product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tree import go_right, n_nodes, path_length

#: Levels with at most this many nodes per tree use a dense GEMM for the logits.
DENSE_LEVEL_WIDTH = 8
#: Bound on the elements of one gathered (tokens, trees, d) block (gather fallback only).
GATHER_ELEMENTS = 1 << 24
_CSR_DTYPES = (torch.float32, torch.float64)


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


def uses_csr(x: torch.Tensor) -> bool:
    """Whether the sparse (CSR) products serve this tensor's dtype."""
    return x.dtype in _CSR_DTYPES and x.device.type in ("cpu", "cuda")


def _csr(values: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """CSR ``(T, n_cols)`` with ``P`` entries per row: ``values``/``cols`` ``(T, P)``,
    columns increasing along each row."""
    tokens, per_row = cols.shape
    crow = torch.arange(0, tokens * per_row + 1, per_row, device=cols.device)
    return sparse_csr(crow, cols.reshape(-1), values.reshape(-1), (tokens, n_cols))


def sparse_csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without torch's "CSR support is in beta" warning (the paths
    that use it are tested here). Under ``torch.compile`` a warnings filter is a graph break, so
    there the warning is left to torch (it warns once per process)."""
    if torch.compiler.is_compiling():
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def visited_logits(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                   node: torch.Tensor) -> torch.Tensor:
    """Logits ``(T, K)`` of the nodes ``node`` ``(T, K)`` (ids increasing along each row)."""
    if uses_csr(x):  # index_select: much cheaper than advanced indexing for scalar gathers
        pattern = _csr(b_in.index_select(0, node.reshape(-1)), node, w_in.shape[0])
        return torch.sparse.sampled_addmm(pattern, x, w_in.t()).values().view(node.shape)
    return torch.bmm(w_in[node], x.unsqueeze(2)).squeeze(2) + b_in[node]


def route(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, n_trees: int, depth: int,
          blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk every tree for ``x`` ``(T, d)`` with weights ``w_in`` ``(K*N, d)``, ``b_in``.

    Returns ``nodes`` ``(T, K, D+1)`` int64 global ids and their ``logits`` ``(T, K, D+1)``.
    ``blocks`` are precomputed :func:`shallow_blocks` (computed here when None).
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


def combine(act: torch.Tensor, nodes: torch.Tensor, w_out_rows: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_p act[t, p] * w_out_rows[nodes[t, p]]``.

    Args:
        act: ``(T, P)`` coefficients; nodes: ``(T, P)`` ids increasing along each row;
        w_out_rows: ``(K*N, d)`` output rows (``linear_out.weight.T``), contiguous.
    Returns:
        ``(T, d)``.
    """
    if uses_csr(act):
        return _csr(act, nodes, w_out_rows.shape[0]) @ w_out_rows
    step = max(1, GATHER_ELEMENTS // (nodes.shape[1] * w_out_rows.shape[1]))
    return torch.cat([torch.bmm(a.unsqueeze(1), w_out_rows[n]).squeeze(1)
                      for a, n in zip(act.split(step), nodes.split(step), strict=True)])


@dataclass(frozen=True)
class TorchPacked:
    """Inference copy: ``w_in`` ``(K*N, d)``, ``b_in`` ``(K*N,)``, ``w_out_rows`` ``(K*N, d)``
    and the shallow levels' dense blocks."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out_rows: torch.Tensor
    blocks: list[tuple[torch.Tensor, torch.Tensor]]


def pack(w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, n_trees: int,
         depth: int, weight_format: str = "fp32") -> TorchPacked:
    """Build :class:`TorchPacked`. ``bf16``/``bf16-out`` round weights through bfloat16 (kept in
    the input dtype), reproducing what a bf16-weight kernel computes."""
    bias = b_in if b_in is not None else w_in.new_zeros(w_in.shape[0])
    w_out_rows = w_out.t()
    if weight_format in ("bf16", "bf16-out"):
        w_out_rows = w_out_rows.to(torch.bfloat16).to(w_out.dtype)
    if weight_format == "bf16":
        w_in = w_in.to(torch.bfloat16).to(w_in.dtype)
    w_in, bias = w_in.contiguous(), bias.contiguous()
    return TorchPacked(w_in, bias, w_out_rows.contiguous(),
                       shallow_blocks(w_in, bias, n_trees, depth))


def forward_packed(x: torch.Tensor, packed: TorchPacked, n_trees: int, depth: int,
                   return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FFF forward for ``x`` ``(T, d)``; see :meth:`FFFKernel.forward`."""
    nodes, logits = route(x, packed.w_in, packed.b_in, n_trees, depth, packed.blocks)
    flat = nodes.reshape(x.shape[0], -1)
    y = combine(F.gelu(logits.reshape(x.shape[0], -1)), flat, packed.w_out_rows)
    return y, (nodes if return_nodes else None)
