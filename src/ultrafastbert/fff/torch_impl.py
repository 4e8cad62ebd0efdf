"""Vectorised PyTorch FFF inference: works on every device and dtype, needs no compiler.

Weights are re-packed level-major (all trees' nodes of level 0, then level 1, ...), so a level is
one contiguous block. Shallow levels (few nodes per tree) are cheapest as a dense GEMM over the
whole block followed by picking the visited logit; deep levels gather the visited rows and do
batched dot products. Either way only the visited nodes contribute to the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernel import FFFKernel
from .tree import go_right, n_nodes, path_length

#: Levels with at most this many nodes per tree use a dense GEMM for the logits.
DENSE_LEVEL_WIDTH = 8
#: Bound on the elements of one gathered (tokens, trees, d) block.
GATHER_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LevelPacked:
    """Weights of one level, all trees: ``w_in`` ``(K*2^l, d)``, ``b_in`` ``(K*2^l,)``,
    ``w_out`` ``(K*2^l, d)`` (output rows), row ``t*2^l + j`` is offset ``j`` of tree ``t``."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor | None


def level_rows(n_trees: int, depth: int, level: int, device: torch.device) -> torch.Tensor:
    """Global heap ids of level ``level``'s nodes in level-major order, shape ``(K*2^l,)``."""
    width = 2**level
    trees = torch.arange(n_trees, device=device).repeat_interleave(width)
    offsets = torch.arange(width, device=device).repeat(n_trees)
    return trees * n_nodes(depth) + (width - 1) + offsets


def pack_levels(w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor | None,
                n_trees: int, depth: int, weight_format: str = "fp32") -> list[LevelPacked]:
    """Split checkpoint-layout weights into per-level blocks (see :class:`LevelPacked`).

    ``w_out`` None packs the routing weights only. ``weight_format`` ``bf16``/``bf16-out`` round
    the weights through bfloat16 (kept in the input dtype), reproducing a bf16-weight kernel.
    """
    bias = b_in if b_in is not None else torch.zeros(w_in.shape[0], dtype=w_in.dtype,
                                                      device=w_in.device)
    w_out_rows = w_out.t() if w_out is not None else None
    if w_out_rows is not None and weight_format in ("bf16", "bf16-out"):
        w_out_rows = w_out_rows.to(torch.bfloat16).to(w_out.dtype)
    if weight_format == "bf16":
        w_in = w_in.to(torch.bfloat16).to(w_in.dtype)
    levels = []
    for level in range(path_length(depth)):
        rows = level_rows(n_trees, depth, level, w_in.device)
        out = w_out_rows[rows].contiguous() if w_out_rows is not None else None
        levels.append(LevelPacked(w_in[rows].contiguous(), bias[rows].contiguous(), out))
    return levels


def _level_logits(x: torch.Tensor, lv: LevelPacked, offset: torch.Tensor,
                  n_trees: int, width: int) -> torch.Tensor:
    """Logits ``(T, K)`` of the visited node at this level; ``offset`` ``(T, K)`` in [0, width)."""
    rows = offset + torch.arange(n_trees, device=x.device) * width
    if width <= DENSE_LEVEL_WIDTH:
        every = torch.addmm(lv.b_in, x, lv.w_in.t())
        return every.gather(1, rows)
    gathered = lv.w_in[rows]
    return torch.bmm(gathered, x.unsqueeze(2)).squeeze(2) + lv.b_in[rows]


def _level_output(y: torch.Tensor, act: torch.Tensor, lv: LevelPacked, offset: torch.Tensor,
                  n_trees: int, width: int) -> None:
    """Add ``sum_t act[:, t] * w_out[visited row]`` to ``y`` ``(T, d)`` in place."""
    rows = offset + torch.arange(n_trees, device=y.device) * width
    if width <= DENSE_LEVEL_WIDTH:
        coeff = torch.zeros(y.shape[0], lv.w_out.shape[0], dtype=y.dtype, device=y.device)
        coeff.scatter_(1, rows, act)
        y.addmm_(coeff, lv.w_out)
    else:
        y.add_(torch.bmm(act.unsqueeze(1), lv.w_out[rows]).squeeze(1))


def forward_levels(x: torch.Tensor, levels: list[LevelPacked], n_trees: int, depth: int,
                   return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FFF forward over packed levels for ``x`` ``(T, d)``; see :class:`FFFKernel.forward`."""
    y = torch.zeros_like(x)
    offset = torch.zeros(x.shape[0], n_trees, dtype=torch.long, device=x.device)
    nodes = []
    for level, lv in enumerate(levels):
        width = 2**level
        logits = _level_logits(x, lv, offset, n_trees, width)
        if lv.w_out is not None:
            _level_output(y, F.gelu(logits), lv, offset, n_trees, width)
        if return_nodes:
            tree_base = torch.arange(n_trees, device=x.device) * n_nodes(depth)
            nodes.append(tree_base + (width - 1) + offset)
        offset = 2 * offset + go_right(logits).long()
    return y, (torch.stack(nodes, dim=2) if return_nodes else None)


def token_chunk(n_trees: int, d_model: int) -> int:
    """Tokens per chunk so that one gathered ``(tokens, K, d)`` block stays bounded."""
    return max(1, GATHER_ELEMENTS // (n_trees * d_model))


class TorchKernel(FFFKernel):
    """The vectorised PyTorch path (every device, every floating dtype)."""

    name = "torch"
    description = "vectorised PyTorch (dense GEMM for shallow levels, gathers for deep ones)"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    weight_formats = ("fp32", "bf16", "bf16-out")

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        return pack_levels(w_in, b_in, w_out, n_trees, depth, weight_format)

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        step = token_chunk(n_trees, x.shape[1])
        if x.shape[0] <= step:
            return forward_levels(x, packed, n_trees, depth, return_nodes)
        parts = [forward_levels(c, packed, n_trees, depth, return_nodes) for c in x.split(step)]
        y = torch.cat([p[0] for p in parts])
        return y, (torch.cat([p[1] for p in parts]) if return_nodes else None)
