"""Native CPU training: the FFF's forward and backward over the visited nodes only.

The C++ ops of ``fff_cpu_train.cpp`` (built into the native library on first use, see
``build``), wrapped as one ``torch.library`` custom operator with an autograd formula and a
fake (shape-only) implementation, so that eager code and ``torch.compile`` both call it.

- Forward: walks every tree for each token (a few tokens' trees at a time, independent dot
  products side by side), records the visited nodes and their logits (pre-activations), and
  sums ``GELU(logit) * w_out`` row of each visited node.
- Backward: per token, the logit gradients ``(dy . w_out row) * GELU'(logit)`` and
  ``dx = sum g * w_in row``; then the (token, node) pairs grouped by node (a counting sort), and
  each node's gradient rows ``dW_in[n] = sum g * x`` and ``dW_out[:, n] = sum GELU(logit) * dy``
  accumulated in registers by the one task that owns that node and column block (balanced by the
  tokens each node serves): no races, no per-thread partial gradients, and results that do not
  depend on the thread count. ``grad_w_out`` is written in ``linear_out.weight``'s own layout.

Equal in value and gradient to :func:`..training.fff_masked` (the original dense "masking" form)
to float32 rounding; routes equal float64 routing away from ties (an exact 0 logit goes left).
float32 only; other dtypes train on the PyTorch path (``training.fff_sparse``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..tree import path_length


@functools.cache
def custom_ops() -> Any:
    """``ultrafastbert::native_fff_train`` (forward, with autograd) and
    ``ultrafastbert::native_fff_train_backward``; defined once the library is loaded (the C++
    ops themselves are composite, so they cannot take a fake). Returns the forward:

    ``train(x (T, d) float32, w_in (K*N, d), b_in (K*N,) | None, w_out (d, K*N), n_trees,
    depth, isa)`` -> ``y`` ``(T, d)`` (autograd flows to ``x`` and the weights), ``nodes``
    ``(T, K, D+1)`` int64, ``logits`` ``(T, K, D+1)`` and the output rows ``(K*N, d)``;
    ``isa`` is the instruction set's code (``build.ISA_CODES``).
    """
    ops = torch.ops.ultrafastbert

    @torch.library.custom_op("ultrafastbert::native_fff_train", mutates_args=())
    def train(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
              w_out: torch.Tensor, n_trees: int, depth: int, isa: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y`` ``(T, d)``, ``nodes`` and ``logits`` ``(T, K, D+1)``, and the output rows
        ``(K*N, d)`` (``w_out`` transposed, kept for the backward)."""
        bias = b_in.contiguous() if b_in is not None else w_in.new_zeros(w_in.shape[0])
        rows = torch.empty(w_out.shape[1], w_out.shape[0], dtype=w_out.dtype)
        rows.copy_(w_out.t())  # a copy even when w_out.t() is contiguous (no aliasing)
        y, nodes, logits = ops.fff_cpu_train_forward(x.contiguous(), w_in.contiguous(), bias,
                                                     rows, n_trees, depth, isa)
        return y, nodes, logits, rows

    @train.register_fake
    def _(x, w_in, b_in, w_out, n_trees, depth, isa):  # noqa: ANN001, ANN202
        shape = (x.shape[0], n_trees, path_length(depth))
        return (torch.empty_like(x), x.new_empty(shape, dtype=torch.long), x.new_empty(shape),
                w_out.new_empty(w_out.shape[1], w_out.shape[0]))

    @torch.library.custom_op("ultrafastbert::native_fff_train_backward", mutates_args=())
    def backward(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor,
                 rows: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor, n_trees: int,
                 depth: int, isa: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``grad_x`` ``(T, d)``, ``grad_w_in`` ``(K*N, d)``, ``grad_b_in`` ``(K*N,)``,
        ``grad_w_out`` ``(d, K*N)``."""
        return ops.fff_cpu_train_backward(grad_y.contiguous(), x.contiguous(),
                                          w_in.contiguous(), rows, nodes, logits, n_trees,
                                          depth, isa)

    @backward.register_fake
    def _(grad_y, x, w_in, rows, nodes, logits, n_trees, depth, isa):  # noqa: ANN001, ANN202
        return (torch.empty_like(x), torch.empty_like(w_in), w_in.new_empty(w_in.shape[0]),
                rows.new_empty(rows.shape[1], rows.shape[0]))

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, w_in, b_in, _, n_trees, depth, isa = inputs
        _, nodes, logits, rows = output
        ctx.mark_non_differentiable(nodes, logits, rows)
        ctx.set_materialize_grads(False)  # no zero-filled gradients made for those three
        ctx.save_for_backward(x, w_in, rows, nodes, logits)
        ctx.has_bias, ctx.shape = b_in is not None, (n_trees, depth, isa)

    def backward_rule(ctx: Any, grad_y: torch.Tensor | None, *_: Any) -> tuple:
        if grad_y is None:  # y took no part in the loss
            return None, None, None, None, None, None, None
        x, w_in, rows, nodes, logits = ctx.saved_tensors
        grad_x, grad_w_in, grad_b, grad_w_out = backward(grad_y, x, w_in, rows, nodes, logits,
                                                         *ctx.shape)
        return grad_x, grad_w_in, grad_b if ctx.has_bias else None, grad_w_out, None, None, None

    train.register_autograd(backward_rule, setup_context=setup_context)
    return train
