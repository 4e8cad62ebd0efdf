"""The Triton forward: one fused kernel in which a tile of tokens walks every tree level by level
(routing) and adds each visited node's output row, gathering only the visited rows; its launch
configuration and the helpers the training launches share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType

import torch

from ...errors import InputError
from ..tree import n_nodes, path_length

#: Widest model dimension the forward kernels keep in registers as one tile.
MAX_BLOCK_D = 8192


def kernel_module() -> ModuleType:
    """The module of Triton kernels (imported on first use: Triton is optional)."""
    from . import jit

    return jit


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make the tensors' GPU current: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes. Forward and input-gradient kernels: ``block_t`` tokens per program by
    ``block_d`` (a power of two >= d) columns, ``num_warps``. Weight-gradient kernel: ``chunk``
    sorted (token, node) entries by ``block_dw`` columns, ``warps_w``; it sums runs of equal
    nodes with a segmented scan (GPU) or, ``segments_by_dot``, a 0/1 matrix product (fast
    under the interpreter)."""

    block_t: int
    block_d: int
    num_warps: int
    chunk: int = 16
    block_dw: int = 128
    warps_w: int = 4
    segments_by_dot: bool = False


def launch_config(d_model: int, device: torch.device) -> LaunchConfig:
    """Default tiles. On a GPU about 4,096 fp32 elements per forward tile (d 768: 4 tokens x
    1,024 columns, 4 warps; x, the accumulator and the two gathered rows stay in registers:
    160 registers, no spills on sm_90 per ptxas), and 16 entries x 128 columns in the
    weight-gradient kernel (156 registers, no spills). Under the interpreter bigger tiles:
    its cost is per operation, not per element."""
    block_d = max(16, 1 << (d_model - 1).bit_length())
    if block_d > MAX_BLOCK_D:
        raise InputError(f"the Triton FFF kernel supports d_model <= {MAX_BLOCK_D}, got {d_model}")
    if device.type == "cpu":
        return LaunchConfig(block_t=16, block_d=block_d, num_warps=4, chunk=32,
                            block_dw=block_d, segments_by_dot=True)
    block_t = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_t * block_d <= 4096 else 8
    return LaunchConfig(block_t, block_d, num_warps, block_dw=min(block_d, 128))


def fff_forward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                w_out_rows: torch.Tensor, n_trees: int, depth: int, *,
                write_nodes: bool = False, write_logits: bool = False,
                config: LaunchConfig | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the forward kernel.

    Args:
        x: ``(T, d)`` contiguous. w_in: ``(K*N, d)``. b_in: ``(K*N,)`` or None.
        w_out_rows: ``(K*N, d)`` output rows (``linear_out.weight`` transposed), contiguous.
        config: tile sizes (default :func:`launch_config`).
    Returns:
        ``y`` ``(T, d)`` in ``x.dtype``; ``nodes`` ``(T, K, D+1)`` int64 and ``logits``
        ``(T, K, D+1)`` fp32 when asked, else None.
    """
    config = config or launch_config(x.shape[1], x.device)
    tokens = x.shape[0]
    y = torch.empty_like(x)
    shape = (tokens, n_trees, path_length(depth))
    nodes = torch.empty(shape, dtype=torch.long, device=x.device) if write_nodes else None
    logits = torch.empty(shape, dtype=torch.float32, device=x.device) if write_logits else None
    if tokens == 0:
        return y, nodes, logits
    with device_guard(x.device):
        _launch_forward(x, w_in, b_in, w_out_rows, y, nodes, logits, n_trees, depth, config)
    return y, nodes, logits


def _launch_forward(x: torch.Tensor, w_in: torch.Tensor,
                    b_in: torch.Tensor | None, w_out_rows: torch.Tensor, y: torch.Tensor,
                    nodes: torch.Tensor | None, logits: torch.Tensor | None, n_trees: int,
                    depth: int, config: LaunchConfig) -> None:
    """Launch :func:`.jit.fff_forward_kernel` (outputs preallocated; see
    :func:`fff_forward`)."""
    tokens, d_model = x.shape
    kernel_module().fff_forward_kernel[(triton_cdiv(tokens, config.block_t),)](
        x, w_in, b_in if b_in is not None else w_in, w_out_rows, y,
        nodes if nodes is not None else y, logits if logits is not None else y,
        tokens, d_model, n_trees, n_nodes(depth), DEPTH=depth, HAS_BIAS=b_in is not None,
        WRITE_NODES=nodes is not None, WRITE_LOGITS=logits is not None,
        BLOCK_T=config.block_t, BLOCK_D=config.block_d, num_warps=config.num_warps)


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (host side)."""
    return -(-a // b)
