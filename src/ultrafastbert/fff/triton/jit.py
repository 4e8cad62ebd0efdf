"""Triton kernels for the FFF layer (docs/design.md §1.1): inference/training forward and the backward.

Kept in a file of their own, imported only through :func:`.routing.kernel_module` (never at package import), so
that Triton stays optional and its interpreter (which needs the kernels' source) can load them.
Every kernel loads its inputs in their own dtype (fp32, bf16 or fp16) and computes in fp32.

Layouts (all row-major, contiguous):

- ``x``, ``y``, ``grad_y``, ``grad_x``: ``(T, d)``.
- ``w_in``, ``w_out``: ``(K*N, d)`` one row per node (``w_out`` is the checkpoint's
  ``linear_out.weight`` transposed, so that a visited node's output row is contiguous).
- ``b_in``: ``(K*N,)``. ``nodes``: ``(T, P)`` int64 global heap ids, ``logits``/``grad_logits``:
  ``(T, P)`` fp32, with ``P = K*(D+1)`` and path slot ``p = tree*(D+1) + level``.

Routing follows :func:`..tree.go_right`: right iff ``logit > 0`` (exact 0 and NaN go left).
"""

from __future__ import annotations

import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(z):
    """Exact (erf) GELU of an fp32 tensor."""
    return 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))


@triton.jit
def _gelu_grad(z):
    """Derivative of the exact GELU: ``Phi(z) + z * phi(z)``."""
    return 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def fff_forward_kernel(x_ptr, w_in_ptr, b_in_ptr, w_out_ptr, y_ptr, nodes_ptr, logits_ptr,
                       n_tokens, d_model, n_trees, n_nodes,
                       DEPTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                       WRITE_NODES: tl.constexpr, WRITE_LOGITS: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: ``BLOCK_T`` tokens through every tree (``n_nodes`` each), level by level.

    The token tile ``x`` ``(BLOCK_T, BLOCK_D)`` and the output accumulator stay in registers
    (``BLOCK_D >= d_model``); each level gathers one ``w_in`` and one ``w_out`` row per token
    (both addresses are known before the logit is, so the two loads overlap).
    Grid: ``(cdiv(T, BLOCK_T),)``.
    """
    n_path = n_trees * (DEPTH + 1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_tokens
    mask = row_mask[:, None] & (cols < d_model)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * d_model + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    y = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for tree in range(n_trees):
        local = tl.zeros((BLOCK_T,), dtype=tl.int64)
        for level in range(DEPTH + 1):
            node = tree * n_nodes + local
            offs = node[:, None] * d_model + cols[None, :]
            w_in = tl.load(w_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w_out = tl.load(w_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            logit = tl.sum(x * w_in, axis=1)
            if HAS_BIAS:
                logit += tl.load(b_in_ptr + node, mask=row_mask, other=0.0).to(tl.float32)
            y += _gelu(logit)[:, None] * w_out
            slot = rows64 * n_path + tree * (DEPTH + 1) + level
            if WRITE_NODES:
                tl.store(nodes_ptr + slot, node, mask=row_mask)
            if WRITE_LOGITS:
                tl.store(logits_ptr + slot, logit, mask=row_mask)
            local = 2 * local + 1 + (logit > 0).to(tl.int64)
    y_offs = rows64[:, None] * d_model + cols[None, :]
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fff_backward_input_kernel(grad_y_ptr, w_in_ptr, w_out_ptr, nodes_ptr, logits_ptr,
                              grad_x_ptr, grad_logits_ptr, n_tokens, d_model, n_path,
                              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token tile: ``grad_logit[t, p] = (w_out[node] . grad_y[t]) * GELU'(logit[t, p])`` and
    ``grad_x[t] = sum_p grad_logit[t, p] * w_in[node]``.

    Deterministic (each program owns its tokens). Grid: ``(cdiv(T, BLOCK_T),)``.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_tokens
    mask = row_mask[:, None] & (cols < d_model)[None, :]
    rows64 = rows.to(tl.int64)
    tile = rows64[:, None] * d_model + cols[None, :]
    grad_y = tl.load(grad_y_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    grad_x = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for p in range(n_path):
        slot = rows64 * n_path + p
        node = tl.load(nodes_ptr + slot, mask=row_mask, other=0)
        logit = tl.load(logits_ptr + slot, mask=row_mask, other=0.0)
        offs = node[:, None] * d_model + cols[None, :]
        w_out = tl.load(w_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w_in = tl.load(w_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_logit = tl.sum(grad_y * w_out, axis=1) * _gelu_grad(logit)
        tl.store(grad_logits_ptr + slot, grad_logit, mask=row_mask)
        grad_x += grad_logit[:, None] * w_in
    tl.store(grad_x_ptr + tile, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum2(a, b, key_a, c, e, key_c):
    """Combine for a segmented inclusive scan over entries sorted by ``key``."""
    same = key_a == key_c
    return tl.where(same, a + c, c), tl.where(same, b + e, e), key_c


@triton.jit
def _segment_sum1(a, key_a, c, key_c):
    """One-value version of :func:`_segment_sum2`."""
    return tl.where(key_a == key_c, a + c, c), key_c


@triton.jit
def fff_backward_weight_kernel(order_ptr, sorted_nodes_ptr, x_ptr, grad_y_ptr, logits_ptr,
                               grad_logits_ptr, grad_w_in_ptr, grad_b_in_ptr, grad_w_out_ptr,
                               n_entries, d_model, n_path, HAS_BIAS: tl.constexpr,
                               SEGMENTS_BY_DOT: tl.constexpr,
                               CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Weight gradients from the visited (token, node) entries, sorted by node.

    ``grad_w_in[n] += sum grad_logit * x[t]``, ``grad_b_in[n] += sum grad_logit``,
    ``grad_w_out[n] += sum GELU(logit) * grad_y[t]`` over the entries of node ``n``. One program
    takes ``CHUNK`` consecutive sorted entries and a ``BLOCK_D`` slice of the columns; a
    segmented scan sums each run of equal nodes, and only a run's last entry adds its total with
    an fp32 atomic. So a node gets one atomic add per chunk it spans (a root: ``T/CHUNK``),
    not one per token; the order of those adds, and so the last bits of the sums of nodes that
    span several chunks, can change between runs. Grid: ``(cdiv(E, CHUNK), cdiv(d, BLOCK_D))``.

    ``SEGMENTS_BY_DOT`` sums the runs with an fp32 ``(CHUNK, CHUNK) x (CHUNK, BLOCK_D)`` product
    by a 0/1 same-node matrix instead of the scan: too slow for a GPU, but Triton's interpreter
    runs a product as one NumPy call and a custom scan one Python call per element.
    """
    lane = tl.arange(0, CHUNK)
    entry = tl.program_id(0) * CHUNK + lane
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    entry_mask = entry < n_entries
    mask = entry_mask[:, None] & (cols < d_model)[None, :]
    node = tl.load(sorted_nodes_ptr + entry, mask=entry_mask, other=-1)
    next_mask = (lane < CHUNK - 1) & (entry + 1 < n_entries)
    next_node = tl.load(sorted_nodes_ptr + entry + 1, mask=next_mask, other=-1)
    run_end = entry_mask & (node != next_node)
    flat = tl.load(order_ptr + entry, mask=entry_mask, other=0)
    token = flat // n_path
    grad_logit = tl.load(grad_logits_ptr + flat, mask=entry_mask, other=0.0)
    act = _gelu(tl.load(logits_ptr + flat, mask=entry_mask, other=0.0))
    tile = token[:, None] * d_model + cols[None, :]
    x = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    grad_y = tl.load(grad_y_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    part_in = grad_logit[:, None] * x
    part_out = act[:, None] * grad_y
    if SEGMENTS_BY_DOT:
        same = (node[:, None] == node[None, :]).to(tl.float32)  # (CHUNK, CHUNK): same run
        sum_in = tl.dot(same, part_in, input_precision="ieee")
        sum_out = tl.dot(same, part_out, input_precision="ieee")
        sum_b = tl.sum(same * grad_logit[None, :], axis=1)
    else:
        key = node.to(tl.int32)  # node ids < 2**31; half the registers of int64 keys
        key_2d = key[:, None] + tl.zeros((CHUNK, BLOCK_D), dtype=tl.int32)
        sum_in, sum_out, _ = tl.associative_scan((part_in, part_out, key_2d), 0, _segment_sum2)
        sum_b, _ = tl.associative_scan((grad_logit, key), 0, _segment_sum1)
    dest = node[:, None] * d_model + cols[None, :]
    end_mask = run_end[:, None] & mask
    tl.atomic_add(grad_w_in_ptr + dest, sum_in, mask=end_mask, sem="relaxed")
    tl.atomic_add(grad_w_out_ptr + dest, sum_out, mask=end_mask, sem="relaxed")
    if HAS_BIAS:  # the bias once, by the programs of the first column block
        first = (lane * 0 + tl.program_id(1)) == 0  # as a (CHUNK,) mask
        tl.atomic_add(grad_b_in_ptr + node, sum_b, mask=run_end & first, sem="relaxed")
