"""Triton training: the backward of the hard-routed FFF over the visited nodes only.

Two kernels: one per token tile (``grad_x`` and the path's logit gradients, deterministic) and
one over the (token, node) entries sorted by node (weight and bias gradients, fp32 atomics, see
:func:`.jit.fff_backward_weight_kernel`). :class:`TritonFFFFunction` is the autograd function
whose forward stores the path logits and nodes (through the custom operators of ``kernel``,
which ``torch.compile`` can call). Gradients equal :func:`..pytorch.training.fff_masked`'s.
"""

from __future__ import annotations

import logging

import torch

from .routing import LaunchConfig, device_guard, kernel_module, launch_config, triton_cdiv

logger = logging.getLogger(__name__)


def fff_backward(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor,
                 w_out_rows: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor,
                 has_bias: bool, weight_grads: bool = True,
                 config: LaunchConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                            torch.Tensor | None]:
    """Gradients of the hard-routed FFF over the visited nodes.

    Args:
        grad_y, x: ``(T, d)``. w_in, w_out_rows: ``(K*N, d)``. nodes: ``(T, K, D+1)`` int64,
        logits: ``(T, K, D+1)`` fp32 (from :func:`fff_forward`).
        weight_grads: False skips the weight-gradient kernel (frozen weights).
    Returns:
        ``grad_x`` ``(T, d)`` in ``x.dtype``; ``grad_w_in`` ``(K*N, d)``, ``grad_b_in``
        ``(K*N,)`` (None without bias) and ``grad_w_out_rows`` ``(K*N, d)``, all fp32 (None when
        ``weight_grads`` is False).
    """
    config = config or launch_config(x.shape[1], x.device)
    with device_guard(x.device):
        grad_x, grad_logits = _input_grads(grad_y, w_in, w_out_rows, nodes, logits, config)
        if not weight_grads:
            return grad_x, None, None, None
        grads = _weight_grads(grad_y, x, w_in.shape, nodes, logits, grad_logits, has_bias,
                              config)
    return grad_x, *grads


def _input_grads(grad_y: torch.Tensor, w_in: torch.Tensor, w_out_rows: torch.Tensor,
                 nodes: torch.Tensor, logits: torch.Tensor, config: LaunchConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_x`` ``(T, d)`` and the path's logit gradients ``(T, K*(D+1))`` fp32."""
    tokens, d_model = grad_y.shape
    n_path = nodes.shape[1] * nodes.shape[2]
    grad_x = torch.zeros_like(grad_y)
    grad_logits = torch.zeros(tokens, n_path, dtype=torch.float32, device=grad_y.device)
    if tokens > 0:
        kernel_module().fff_backward_input_kernel[(triton_cdiv(tokens, config.block_t),)](
            grad_y, w_in, w_out_rows, nodes, logits, grad_x, grad_logits, tokens, d_model,
            n_path, BLOCK_T=config.block_t, BLOCK_D=config.block_d, num_warps=config.num_warps)
    return grad_x, grad_logits


def _weight_grads(grad_y: torch.Tensor, x: torch.Tensor, shape: torch.Size, nodes: torch.Tensor,
                  logits: torch.Tensor, grad_logits: torch.Tensor, has_bias: bool,
                  config: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fp32 ``grad_w_in`` ``(K*N, d)``, ``grad_b_in`` ``(K*N,)`` or None and
    ``grad_w_out_rows`` ``(K*N, d)``, from the (token, node) entries sorted by node."""
    sorted_nodes, order = torch.sort(nodes.reshape(-1), stable=True)
    grad_w_in = torch.zeros(shape, dtype=torch.float32, device=x.device)
    grad_w_out = torch.zeros(shape, dtype=torch.float32, device=x.device)
    grad_b = torch.zeros(shape[0], dtype=torch.float32, device=x.device) if has_bias else None
    if order.numel() == 0:
        return grad_w_in, grad_b, grad_w_out
    by_dot = config.segments_by_dot or x.device.type in _SCAN_FAILED
    grid = (triton_cdiv(order.numel(), config.chunk), triton_cdiv(x.shape[1], config.block_dw))
    args = (order, sorted_nodes, x, grad_y, logits, grad_logits, grad_w_in,
            grad_b if grad_b is not None else grad_w_in, grad_w_out, order.numel(), x.shape[1],
            grad_logits.shape[1])
    kernel = kernel_module().fff_backward_weight_kernel
    options = {"HAS_BIAS": has_bias, "CHUNK": config.chunk, "BLOCK_D": config.block_dw,
               "num_warps": config.warps_w}
    try:
        kernel[grid](*args, SEGMENTS_BY_DOT=by_dot, **options)
    except Exception as err:  # noqa: BLE001 - only a failed scan compile is retried
        if by_dot:
            raise
        _SCAN_FAILED[x.device.type] = repr(err)
        logger.warning("the segmented scan of the weight-gradient kernel failed to run (%s); "
                       "using the (slower) 0/1-product variant from now on", err)
        for grad in (grad_w_in, grad_w_out, grad_b):
            if grad is not None:
                grad.zero_()
        kernel[grid](*args, SEGMENTS_BY_DOT=True, **options)
    return grad_w_in, grad_b, grad_w_out


#: Devices on which the weight-gradient kernel's segmented scan failed (and why): a fallback
#: for a Triton version that cannot compile the tuple scan, logged when it happens.
_SCAN_FAILED: dict[str, str] = {}


class TritonFFFFunction(torch.autograd.Function):
    """``(y, nodes) = FFF(x)`` with hard routing; gradients through the visited nodes only."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, n_trees, depth):  # noqa: D102
        w_out_rows = w_out.detach().t().contiguous()
        w_in = w_in.detach().contiguous()
        bias = b_in.detach().contiguous() if b_in is not None else None
        # through the custom operators, which torch.compile can call (see custom_ops)
        y, nodes, logits = torch.ops.ultrafastbert.triton_fff_forward(
            x.detach(), w_in, bias, w_out_rows, n_trees, depth, True, True)
        ctx.save_for_backward(x, w_in, w_out_rows, nodes, logits)
        ctx.has_bias = b_in is not None
        ctx.mark_non_differentiable(nodes)
        return y, nodes

    @staticmethod
    def backward(ctx, grad_y, _grad_nodes):  # noqa: D102
        x, w_in, w_out_rows, nodes, logits = ctx.saved_tensors
        need_x, need_w_in, need_b, need_w_out = ctx.needs_input_grad[:4]
        weights = need_w_in or need_b or need_w_out
        grad_x, g_in, g_b, g_out = torch.ops.ultrafastbert.triton_fff_backward(
            grad_y.contiguous(), x, w_in, w_out_rows, nodes, logits, ctx.has_bias, weights)
        dtype = w_in.dtype
        return (grad_x if need_x else None,
                g_in.to(dtype) if need_w_in else None,
                g_b.to(dtype) if need_b else None,
                g_out.t().to(dtype) if need_w_out else None,
                None, None)
