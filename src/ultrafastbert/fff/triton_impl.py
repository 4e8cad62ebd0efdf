"""Triton FFF kernel for CUDA tensors: inference and hard-routed training.

Inference (:class:`TritonKernel`, registered in the dispatcher as ``"triton"``) runs one fused
kernel: a tile of tokens walks every tree level by level, gathering only the visited nodes'
``w_in``/``w_out`` rows. Training (:meth:`TritonKernel.train_forward`) is a
``torch.autograd.Function`` whose forward stores the path logits and nodes and whose backward runs
two kernels over the visited nodes only: one per token tile (``grad_x`` and the path's logit
gradients, deterministic) and one over the (token, node) entries sorted by node (weight and bias
gradients, fp32 atomics, see :func:`.triton_kernels.fff_backward_weight_kernel`). Gradients equal
:func:`.training.fff_masked`'s. fp32, bf16 and fp16 inputs; fp32 arithmetic inside.

Triton is an optional extra (``ultrafastbert[triton]``): nothing here imports it until a kernel
runs, and its absence is an ``unavailable_reason``, not an import error.

Triton's CPU interpreter (tests only): start Python with ``TRITON_INTERPRET=1`` (Triton reads it
once, at import) and opt in with ``TritonKernel(interpret=True)`` or, for the registered kernel
the dispatcher and the layer use, ``ULTRAFASTBERT_TRITON_INTERPRET=1``. Then CPU tensors are
accepted and run through the interpreter, hundreds of times slower than any CPU kernel: that is
why ``TRITON_INTERPRET`` alone never makes the dispatcher offer this kernel for CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from ..errors import InputError
from .kernel import FFFKernel, validate_weight_format
from .tree import n_nodes, path_length

logger = logging.getLogger(__name__)

#: Set to ``1`` to let the registered Triton kernel run CPU tensors through Triton's interpreter.
INTERPRET_ENV = "ULTRAFASTBERT_TRITON_INTERPRET"
#: Widest model dimension the forward kernels keep in registers as one tile.
MAX_BLOCK_D = 8192


def triton_missing_reason() -> str | None:
    """None when Triton can be imported, else a sentence saying how to install it."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"Triton is not installed ({err}); install ultrafastbert[triton]"
    return None


def triton_interpreting() -> bool:
    """Whether Triton runs in interpreter mode in this process.

    Triton decides that once, when it is first imported (its own library functions are decorated
    then), from ``TRITON_INTERPRET=1``: setting the variable later changes nothing.
    """
    import triton.language as tl

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of another Triton version
        return os.environ.get("TRITON_INTERPRET", "") == "1"
    return isinstance(tl.zeros, InterpretedFunction)


def kernel_module() -> ModuleType:
    """The module of Triton kernels (imported on first use: Triton is optional)."""
    from . import triton_kernels

    return triton_kernels


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
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
    with _device_guard(x.device):
        _launch_forward(x, w_in, b_in, w_out_rows, y, nodes, logits, n_trees, depth, config)
    return y, nodes, logits


def _launch_forward(x: torch.Tensor, w_in: torch.Tensor,
                    b_in: torch.Tensor | None, w_out_rows: torch.Tensor, y: torch.Tensor,
                    nodes: torch.Tensor | None, logits: torch.Tensor | None, n_trees: int,
                    depth: int, config: LaunchConfig) -> None:
    """Launch :func:`.triton_kernels.fff_forward_kernel` (outputs preallocated; see
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
    with _device_guard(x.device):
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


class _TritonFFFFunction(torch.autograd.Function):
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


@dataclass(frozen=True)
class TritonPacked:
    """Inference copy: ``w_in`` ``(K*N, d)``, ``b_in`` ``(K*N,)`` fp32 or None, ``w_out``
    ``(K*N, d)`` output rows; the weights in the dtype the weight format asks for."""

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor


class TritonKernel(FFFKernel):
    """Triton kernel for CUDA tensors (CPU tensors only through the interpreter, by opt-in).

    Args:
        interpret: True accepts CPU tensors and runs them through Triton's interpreter (which
            needs ``TRITON_INTERPRET=1`` when Python starts); False never does; None (default)
            asks the environment variable ``ULTRAFASTBERT_TRITON_INTERPRET`` at each call.
    """

    name = "triton"
    description = "Triton GPU kernel (fused tree walk, sparse training backward)"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    weight_formats = ("fp32", "bf16", "bf16-out")
    trains = True

    def __init__(self, interpret: bool | None = None):
        self.interpret = interpret
        custom_ops()  # defined here, outside any torch.compile trace (see custom_ops)

    def interpret_enabled(self) -> bool:
        """Whether CPU tensors may run through Triton's interpreter (see the class docstring)."""
        if self.interpret is not None:
            return self.interpret
        return os.environ.get(INTERPRET_ENV, "") == "1"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype,
                           weight_format: str = "fp32", training: bool = False
                           ) -> str | None:  # noqa: D102
        device = torch.device(device)
        if device.type == "cpu" and self.interpret_enabled():
            if (dtype not in self.dtypes or weight_format not in self.weight_formats
                    or (training and weight_format != "fp32")):
                # the GPU's sentence for the dtype/format (returned before any CUDA check)
                return super().unavailable_reason(torch.device("cuda"), dtype, weight_format,
                                                  training)
            return triton_missing_reason() or self._interpreter_reason()
        reason = super().unavailable_reason(device, dtype, weight_format, training)
        if reason is not None and device.type == "cpu":
            reason += (" (Triton's interpreter runs CPU tensors, for tests: set "
                       f"TRITON_INTERPRET=1 and {INTERPRET_ENV}=1)")
        if reason is None and dtype == torch.bfloat16:
            reason = self._bf16_reason(device)
        return reason

    def extra_reason(self, device: torch.device) -> str | None:  # noqa: D102
        missing = triton_missing_reason()
        if missing is not None:
            return missing
        if not torch.cuda.is_available():
            return (f"CUDA is not available to this PyTorch ({torch.__version__}, built for CUDA "
                    f"{torch.version.cuda}); install a CUDA build of torch on a GPU machine")
        return None

    @staticmethod
    def _interpreter_reason() -> str | None:
        """CPU tensors need Triton in interpreter mode."""
        if triton_interpreting():
            return None
        return ("Triton was imported without TRITON_INTERPRET=1, so its interpreter is off; set "
                "TRITON_INTERPRET=1 before starting Python to run it on CPU tensors")

    @staticmethod
    def _bf16_reason(device: torch.device) -> str | None:
        """bf16 needs compute capability 8.0 (Ampere) or newer."""
        if device.type != "cuda":
            return None
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bf16 needs compute capability >= 8.0, this GPU has {major}.{minor}"
        return None

    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> TritonPacked:
        """Weights for :meth:`forward`: ``w_out`` ``(d, K*N)`` transposed to rows; ``bf16``
        stores both matrices in bfloat16, ``bf16-out`` only the output rows."""
        validate_weight_format(weight_format)
        expected = n_trees * n_nodes(depth)
        if w_in.shape[0] != expected or w_out.shape[1] != expected:
            raise InputError(f"weights have {w_in.shape[0]}/{w_out.shape[1]} nodes, expected "
                             f"{expected} for {n_trees} trees of depth {depth}")
        in_dtype = torch.bfloat16 if weight_format == "bf16" else w_in.dtype
        out_dtype = torch.bfloat16 if weight_format in ("bf16", "bf16-out") else w_out.dtype
        bias = b_in.detach().float().contiguous() if b_in is not None else None
        return TritonPacked(w_in.detach().to(in_dtype).contiguous(), bias,
                            w_out.detach().t().to(out_dtype).contiguous())

    def forward(self, x: torch.Tensor, packed: TritonPacked, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See :meth:`FFFKernel.forward`: ``x`` ``(T, d)`` -> ``y`` ``(T, d)``, nodes
        ``(T, K, D+1)``."""
        self._check_device(x)
        if x.shape[1] != packed.w_in.shape[1]:
            raise InputError(f"input width {x.shape[1]} differs from the packed weights' "
                             f"{packed.w_in.shape[1]}")
        if torch.compiler.is_compiling():  # through the custom op (a fake gives the shapes)
            y, nodes, _ = torch.ops.ultrafastbert.triton_fff_forward(
                x.contiguous(), packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                return_nodes, False)
            return y, (nodes if return_nodes else None)
        y, nodes, _ = fff_forward(x.contiguous(), packed.w_in, packed.b_in, packed.w_out,
                                  n_trees, depth, write_nodes=return_nodes)
        return y, nodes

    def train_forward(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                      w_out: torch.Tensor, n_trees: int, depth: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable hard-routed forward (the training path).

        Args:
            x: ``(T, d)``; w_in: ``(K*N, d)``; b_in: ``(K*N,)`` or None; w_out: ``(d, K*N)``.
        Returns:
            ``y`` ``(T, d)`` (gradients equal :func:`.training.fff_masked`'s) and the visited
            ``nodes`` ``(T, K, D+1)`` int64.
        """
        self._check_device(x)
        return _TritonFFFFunction.apply(x.contiguous(), w_in, b_in, w_out, n_trees, depth)

    def _check_device(self, x: torch.Tensor) -> None:
        """Refuse CPU tensors unless the interpreter was asked for and is on."""
        if x.device.type != "cpu":
            return
        if not self.interpret_enabled():
            raise InputError(f"the Triton kernel got CPU tensors; move them to CUDA, or set "
                             f"TRITON_INTERPRET=1 and {INTERPRET_ENV}=1 to use Triton's "
                             "interpreter (tests only)")
        reason = self._interpreter_reason()
        if reason is not None:
            raise InputError(f"the Triton kernel cannot run CPU tensors: {reason}")


# -------------------------------------------------------------- torch.compile: custom ops
@functools.cache
def custom_ops() -> tuple[Any, Any]:
    """The Triton forward and backward as ``torch.library`` custom operators with fake
    implementations (shapes only), so ``torch.compile`` can call them; defined at first use."""

    @torch.library.custom_op("ultrafastbert::triton_fff_forward", mutates_args=())
    def forward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                w_out_rows: torch.Tensor, n_trees: int, depth: int, write_nodes: bool,
                write_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y`` ``(T, d)``, ``nodes`` and ``logits`` ``(T, K, D+1)`` (empty when not asked)."""
        y, nodes, logits = fff_forward(x, w_in, b_in, w_out_rows, n_trees, depth,
                                       write_nodes=write_nodes, write_logits=write_logits)
        return (y, nodes if nodes is not None else x.new_empty(0, dtype=torch.long),
                logits if logits is not None else x.new_empty(0, dtype=torch.float32))

    @forward.register_fake
    def _(x, w_in, b_in, w_out_rows, n_trees, depth, write_nodes, write_logits):  # noqa: ANN001, ANN202
        shape = (x.shape[0], n_trees, path_length(depth))
        return (torch.empty_like(x),
                x.new_empty(shape if write_nodes else (0,), dtype=torch.long),
                x.new_empty(shape if write_logits else (0,), dtype=torch.float32))

    @torch.library.custom_op("ultrafastbert::triton_fff_backward", mutates_args=())
    def backward(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor,
                 w_out_rows: torch.Tensor, nodes: torch.Tensor, logits: torch.Tensor,
                 has_bias: bool, weight_grads: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``grad_x``; ``grad_w_in``, ``grad_b_in``, ``grad_w_out_rows`` fp32 (empty when not
        computed)."""
        grads = fff_backward(grad_y, x, w_in, w_out_rows, nodes, logits, has_bias,
                             weight_grads=weight_grads)
        return grads[0], *(g if g is not None else x.new_empty(0, dtype=torch.float32)
                           for g in grads[1:])  # type: ignore[return-value]

    @backward.register_fake
    def _(grad_y, x, w_in, w_out_rows, nodes, logits, has_bias, weight_grads):  # noqa: ANN001, ANN202
        fp32 = torch.float32
        if not weight_grads:
            return (torch.empty_like(grad_y), *(x.new_empty(0, dtype=fp32) for _ in range(3)))
        return (torch.empty_like(grad_y), w_in.new_empty(w_in.shape, dtype=fp32),
                w_in.new_empty(w_in.shape[0] if has_bias else 0, dtype=fp32),
                w_in.new_empty(w_in.shape, dtype=fp32))

    return forward, backward
