"""Triton FFF kernel for CUDA tensors: inference and hard-routed training.

Inference (:class:`TritonKernel`, registered in the dispatcher as ``"triton"``) runs one fused
kernel: a tile of tokens walks every tree level by level, gathering only the visited nodes'
``w_in``/``w_out`` rows. Training (:meth:`TritonKernel.train_forward`) is a
``torch.autograd.Function`` whose forward stores the path logits and nodes and whose backward runs
two kernels over the visited nodes only: one per token tile (``grad_x`` and the path's logit
gradients, deterministic) and one over the (token, node) entries sorted by node (weight and bias
gradients, fp32 atomics, see :func:`.jit.fff_backward_weight_kernel`). Gradients equal
:func:`..pytorch.training.fff_masked`'s. fp32, bf16 and fp16 inputs; fp32 arithmetic inside.

Triton is an optional extra (``ultrafastbert[triton]``): nothing here imports it until a kernel
runs, and its absence is an ``unavailable_reason``, not an import error.

Triton's CPU interpreter (tests only): start Python with ``TRITON_INTERPRET=1`` (Triton reads it
once, at import) and opt in with ``TritonKernel(interpret=True)`` or, for the registered kernel
the dispatcher and the layer use, ``ULTRAFASTBERT_TRITON_INTERPRET=1``. Then CPU tensors are
accepted and run through the interpreter, hundreds of times slower than any CPU kernel: that is
why ``TRITON_INTERPRET`` alone never makes the dispatcher offer this kernel for CPU tensors.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InputError
from ..kernel import FFFKernel, validate_weight_format
from ..tree import n_nodes, path_length
from .routing import fff_forward
from .training import TritonFFFFunction, fff_backward

#: Set to ``1`` to let the registered Triton kernel run CPU tensors through Triton's interpreter.
INTERPRET_ENV = "ULTRAFASTBERT_TRITON_INTERPRET"


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
            ``y`` ``(T, d)`` (gradients equal :func:`..pytorch.training.fff_masked`'s) and the visited
            ``nodes`` ``(T, K, D+1)`` int64.
        """
        self._check_device(x)
        return TritonFFFFunction.apply(x.contiguous(), w_in, b_in, w_out, n_trees, depth)

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
