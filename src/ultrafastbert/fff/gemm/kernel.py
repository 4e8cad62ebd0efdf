"""The GEMM route for depth-0 configurations (``Kx0``: every node is on every token's path).

At depth 0 the FFF is a dense feed-forward block of width K, so two GEMMs compute it with no
wasted work: ``y = GELU(x @ w_in.T + b_in) @ w_out.T``. The dispatcher chooses it for such
layers from :data:`...dispatch.GEMM_MIN_TOKENS` tokens, where a GEMM's reuse of each weight across
tokens beats the tree walk (see docs/native.md). Deeper trees are refused: a GEMM over all
nodes would do ``2**D`` times the work, and an off-path node's non-finite weights would leak into
the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernel import FFFKernel


@dataclass(frozen=True)
class GemmPacked:
    """``w_in`` ``(K, d)``, ``b_in`` ``(K,)`` (zeros without bias), ``w_out`` ``(d, K)``."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor


class GemmKernel(FFFKernel):
    """Depth-0 FFF layers as two dense GEMMs (every device and floating dtype)."""

    name = "gemm"
    description = "two dense GEMMs (depth-0 configurations only: every node is on the path)"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def shape_reason(self, n_trees: int | None, depth: int | None) -> str | None:
        """Why this kernel cannot run a ``n_trees x depth`` layer (None: it can)."""
        if depth is None:
            return ("serves depth-0 configurations only; the layer's shape is needed to tell "
                    "(dispatch.Workload)")
        if depth != 0:
            return (f"serves depth-0 configurations only (every node on the path); {n_trees}x"
                    f"{depth} would compute {2 ** depth}x the nodes it needs")
        return None

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        reason = self.shape_reason(n_trees, depth)
        if reason is not None:
            from ...errors import InputError

            raise InputError(f"the gemm FFF kernel cannot run: {reason}")
        bias = b_in if b_in is not None else w_in.new_zeros(w_in.shape[0])
        return GemmPacked(w_in.detach().contiguous(), bias.detach().contiguous(),
                          w_out.detach().contiguous())

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        y = F.linear(F.gelu(F.linear(x, packed.w_in, packed.b_in)), packed.w_out)
        if not return_nodes:
            return y, None
        nodes = torch.arange(n_trees, device=x.device).view(1, n_trees, 1).expand(
            x.shape[0], n_trees, 1).contiguous()
        return y, nodes
