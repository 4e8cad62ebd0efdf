"""The vectorised PyTorch kernel: inference (``torch_impl``) and the sparse training path
(``training``), on every device and floating dtype."""

from __future__ import annotations

import torch

from .kernel import FFFKernel
from .torch_impl import forward_packed, pack
from .training import fff_sparse, route


class TorchKernel(FFFKernel):
    """The vectorised PyTorch path (every device, every floating dtype)."""

    name = "torch"
    description = "vectorised PyTorch (GEMM for shallow levels, sparse CSR products for deep)"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    weight_formats = ("fp32", "bf16", "bf16-out")
    trains = True

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        return pack(w_in, b_in, w_out, n_trees, depth, weight_format)

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        return forward_packed(x, packed, n_trees, depth, return_nodes)

    def train_forward(self, x, w_in, b_in, w_out, n_trees, depth):  # noqa: D102
        """The sparse training path: route without autograd, then :func:`.training.fff_sparse`
        (visited nodes only; equal to :func:`.training.fff_masked` in value and gradient)."""
        routed = route(x, w_in, b_in, n_trees, depth)
        return fff_sparse(x, w_in, b_in, w_out, n_trees, depth, routed=routed), routed[0]
