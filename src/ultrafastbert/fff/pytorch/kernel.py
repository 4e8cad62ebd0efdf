"""The vectorised PyTorch kernel (every device and floating dtype): inference on a packed copy
of the weights (:func:`pack`, :func:`forward_packed`: ``routing`` then one sparse output product)
and the sparse training path (``training``), with ``torch.compile`` custom operators."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..kernel import FFFKernel
from ..tree import path_length
from .routing import route, shallow_blocks, walk
from .sparse import combine
from .training import fff_sparse, sparse_backward, sparse_forward


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
    nodes, logits = walk(x, packed.w_in, packed.b_in, n_trees, depth, packed.blocks)
    flat = nodes.reshape(x.shape[0], -1)
    y = combine(F.gelu(logits.reshape(x.shape[0], -1)), flat, packed.w_out_rows)
    return y, (nodes if return_nodes else None)


class TorchKernel(FFFKernel):
    """The vectorised PyTorch path (every device, every floating dtype)."""

    name = "torch"
    description = "vectorised PyTorch (GEMM for shallow levels, sparse CSR products for deep)"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    weight_formats = ("fp32", "bf16", "bf16-out")
    trains = True

    def __init__(self) -> None:
        custom_ops()  # defined here, outside any torch.compile trace (see custom_ops)

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        return pack(w_in, b_in, w_out, n_trees, depth, weight_format)

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        return forward_packed(x, packed, n_trees, depth, return_nodes)

    def train_forward(self, x, w_in, b_in, w_out, n_trees, depth):  # noqa: D102
        """The sparse training path: route without autograd, then :func:`.training.fff_sparse`
        (visited nodes only; equal to :func:`.training.fff_masked` in value and gradient)."""
        if torch.compiler.is_compiling():  # sparse tensors cannot be traced: one opaque op
            y, nodes, _ = torch.ops.ultrafastbert.torch_fff_train(x, w_in, b_in, w_out, n_trees,
                                                                  depth)
            return y, nodes
        routed = route(x, w_in, b_in, n_trees, depth)
        return fff_sparse(x, w_in, b_in, w_out, n_trees, depth, routed=routed), routed[0]


# -------------------------------------------------------------- torch.compile: custom ops
@functools.cache
def custom_ops() -> Any:
    """The sparse training path as a ``torch.library`` custom operator with autograd and fake
    implementations, for ``torch.compile`` (which cannot trace sparse CSR tensors); the same
    functions as the eager path inside. Defined at first use."""

    @torch.library.custom_op("ultrafastbert::torch_fff_train", mutates_args=())
    def train(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
              w_out: torch.Tensor, n_trees: int, depth: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y`` ``(T, d)``, visited ``nodes`` and their ``logits`` ``(T, K, D+1)``."""
        nodes, logits = route(x, w_in, b_in, n_trees, depth)
        flat = x.shape[0], -1
        y = sparse_forward(w_out.t().contiguous(), nodes.reshape(flat), logits.reshape(flat))
        return y, nodes, logits

    @train.register_fake
    def _(x, w_in, b_in, w_out, n_trees, depth):  # noqa: ANN001, ANN202
        shape = (x.shape[0], n_trees, path_length(depth))
        return torch.empty_like(x), x.new_empty(shape, dtype=torch.long), x.new_empty(shape)

    @torch.library.custom_op("ultrafastbert::torch_fff_train_backward", mutates_args=())
    def backward(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor,
                 w_out: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor,
                 has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``grad_x``, ``grad_w_in``, ``grad_b_in`` (empty without bias), ``grad_w_out``."""
        flat = x.shape[0], -1
        grad_x, grad_w_in, grad_b, grad_rows = sparse_backward(
            grad_y.contiguous(), x, w_in, w_out.t().contiguous(), nodes.reshape(flat),
            logits.reshape(flat), has_bias)
        return (grad_x, grad_w_in, grad_b if grad_b is not None else x.new_empty(0),
                grad_rows.t().contiguous())

    @backward.register_fake
    def _(grad_y, x, w_in, w_out, nodes, logits, has_bias):  # noqa: ANN001, ANN202
        return (torch.empty_like(x), torch.empty_like(w_in),
                w_in.new_empty(w_in.shape[0] if has_bias else 0), torch.empty_like(w_out))

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, w_in, b_in, w_out, _, _ = inputs
        _, nodes, logits = output
        ctx.save_for_backward(x, w_in, w_out, nodes, logits)
        ctx.has_bias = b_in is not None

    def backward_rule(ctx: Any, grad_y: torch.Tensor, *_: Any) -> tuple:
        x, w_in, w_out, nodes, logits = ctx.saved_tensors
        grad_x, grad_w_in, grad_b, grad_w_out = backward(grad_y, x, w_in, w_out, nodes, logits,
                                                         ctx.has_bias)
        return grad_x, grad_w_in, grad_b if ctx.has_bias else None, grad_w_out, None, None

    train.register_autograd(backward_rule, setup_context=setup_context)
    return train
