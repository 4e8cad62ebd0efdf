"""The native CPU FFF kernels: fp32 (:class:`NativeCPUKernel`), bfloat16 end to end
(:class:`NativeBF16Kernel`) and fp32 with int8 weights (:class:`NativeInt8Kernel`), all running
one C++ walk (``fff_cpu_walk.h``) built into one library on first use (``build``).

The tree walk computes only the visited nodes' dot products, bias and GELU, a group of tokens at
a time level by level (several trees: tree-major blocks of tokens, or one token's trees side by
side); the visited output rows are then applied in one fused pass. How an fp32 call is walked is
chosen per shape by a short measurement on first use (``tuning``; never changes a result).
Threads come from torch's own pool.

fp32 weight formats: ``fp32``; ``bf16`` (both matrices stored as bfloat16, may change routes);
``bf16-out`` (routing rows fp32, output rows bfloat16: routes as ``fp32``).

bfloat16 (docs/precision.md): inputs, weights and outputs are bfloat16; logits, activations and
output sums are fp32. The routing dot products use AVX512-BF16 (``_mm512_dpbf16_ps``) where the
CPU has it, else widen bf16 to fp32 exactly and use fp32 FMAs (AVX-512, then AVX2).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import InputError, ResourceError
from ..kernel import WEIGHT_FORMATS, FFFKernel
from ..tree import path_length
from . import build, training, tuning


@dataclass(frozen=True)
class NativePacked:
    """The kernel's copy of the weights (checkpoint order of nodes, tree-major heap order).

    w_in: ``(K*N, d)`` routing rows, float32 or bfloat16. b_in: ``(K*N,)`` float32 (zeros when the
    layer has no bias). w_out: ``(K*N, d)`` output rows (``linear_out.weight`` transposed),
    float32 or bfloat16. All contiguous. knobs: the walk's knobs table ``(R, 7)`` int64 (see
    ``tuning``; it decides how calls are walked, never their results). n_trees: K. untuned
    (derived): the table is the fixed defaults, so calls can take the untuned op, which has
    those defaults built in (one argument fewer: ~0.05-0.1 µs of a 2.5 µs 1-token call).
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    knobs: torch.Tensor
    n_trees: int = 0
    untuned: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "untuned", self.n_trees > 0 and torch.equal(
            self.knobs, tuning.default_table(self.n_trees)))


def _cpp(op: Any) -> Callable[..., Any]:
    """The C++ callable behind a torch op overload (``_op``): one Python frame less a call."""
    return getattr(op, "_op", op)


class _NativeKernel(FFFKernel):
    """What the native kernels share: an instruction set chosen from :attr:`isa_codes` (the
    ops' numeric codes; ``isa`` None: the best this CPU runs), autotuning on or off, and the
    op callables bound on first load."""

    #: Instruction set name -> the op's numeric code.
    isa_codes: dict[str, int] = {}

    def __init__(self, isa: str | None = None, tune: bool = True):
        if isa is not None and isa not in self.isa_codes:
            raise InputError(f"isa must be None or one of {tuple(self.isa_codes)}, got {isa!r}")
        self._isa = isa
        self._tune = tune
        self._isa_code = 0
        self._key = ""
        self._forward: Callable[..., Any] | None = None
        self._forward_nodes: Callable[..., Any] | None = None

    @property
    def isa(self) -> str | None:
        """The instruction set (path) in use (None until the kernel is loaded)."""
        return {code: isa for isa, code in self.isa_codes.items()}.get(self._isa_code)


class NativeCPUKernel(_NativeKernel):
    """AVX-512/AVX2 C++ kernel built on first use.

    Args:
        isa: ``None`` for the best instruction set of this CPU, or ``"avx2"``/``"avx512"`` to
            force one (the AVX2 path can then be tested on an AVX-512 machine).
        tune: choose the walk's knobs per shape by measurement on first pack (``tuning``;
            ``ULTRAFASTBERT_AUTOTUNE=0`` also turns it off); False: the fixed defaults.
    """

    name = "native"
    description = "native C++ CPU kernel (AVX-512/AVX2, built on first use)"
    devices = ("cpu",)
    dtypes = (torch.float32,)
    weight_formats = ("fp32", "bf16", "bf16-out")
    trains = True  # float32, forward and backward over the visited nodes (training.py)

    isa_codes = build.ISA_CODES

    def __init__(self, isa: str | None = None, tune: bool = True):
        super().__init__(isa, tune)
        self._library: build.NativeLibrary | None = None
        self._forward_untuned: Callable[..., Any] | None = None
        self._train: Callable[..., Any] | None = None

    def extra_reason(self, device: torch.device) -> str | None:
        """Why the kernel cannot run: disabled, CPU, toolchain or build failure (builds once)."""
        if self._library is not None:  # the per-call path: one attribute test
            return None
        if torch.compiler.is_compiling():  # loading (file reads, a build) would break the graph
            return ("not loaded yet in this process, and a torch.compile trace does not load "
                    "it; one eager call before compiling loads it")
        library = build.status()
        if isinstance(library, str):
            return library
        isa = self._isa or library.isa
        if build.ISA_CODES[isa] > build.ISA_CODES.get(library.isa, 0):
            return f"this CPU does not support {isa} (best: {library.isa or 'neither'})"
        self._isa_code = build.ISA_CODES[isa]
        self._forward = _cpp(library.forward)
        self._forward_nodes = _cpp(library.forward_nodes)
        self._forward_untuned = _cpp(torch.ops.ultrafastbert.fff_cpu_forward.default)
        self._library = library
        native_fakes()  # so torch.compile can trace calls of the operators
        self._train = training.custom_ops()  # defined here, outside any torch.compile trace
        return None

    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> NativePacked:
        """The kernel's layout; see :class:`NativePacked`.

        fp32 routing rows and bias that are already contiguous fp32 are used as they are (no
        12 MB copy for 1x11); the output rows are always a transposed copy.
        """
        w_in = w_in.detach()
        out_rows = w_out.detach().t()
        bias = (b_in.detach() if b_in is not None else w_in.new_zeros(w_in.shape[0]))
        in_dtype = torch.bfloat16 if weight_format == "bf16" else torch.float32
        out_dtype = torch.bfloat16 if weight_format in ("bf16", "bf16-out") else torch.float32
        packed = NativePacked(w_in.to(in_dtype).contiguous(), bias.float().contiguous(),
                              out_rows.to(out_dtype).contiguous(), tuning.default_table(n_trees),
                              n_trees)
        knobs = self.knobs_for(packed, n_trees, depth, weight_format)
        return NativePacked(packed.w_in, packed.b_in, packed.w_out, knobs, n_trees)

    def knobs_for(self, packed: NativePacked, n_trees: int, depth: int,
                  weight_format: str) -> torch.Tensor:
        """The knobs table for these packed weights: tuned (cached per CPU model) or defaults."""
        if not self._tune or self.unavailable_reason(torch.device("cpu"), torch.float32,
                                                     weight_format) is not None:
            return tuning.default_table(n_trees)
        assert self._library is not None and self._forward is not None
        forward = self._forward

        def run(x: torch.Tensor, knobs: torch.Tensor) -> object:
            return forward(x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                           self._isa_code, knobs)

        shape = tuning.Shape(n_trees, depth, packed.w_in.shape[1], weight_format,
                             torch.get_num_threads())
        return tuning.table_for(shape, run, f"{self._library.path.name}/{self.isa}")

    def forward(self, x: torch.Tensor, packed: NativePacked, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(T, d)`` float32 contiguous -> ``y`` ``(T, d)``, nodes ``(T, K, D+1)``|None."""
        if self._library is None:
            reason = self.unavailable_reason(x.device, x.dtype)
            if reason is not None:
                raise ResourceError(f"the native FFF kernel cannot run: {reason}")
        assert self._forward is not None and self._forward_nodes is not None  # set by loading
        # One op call and little else: at 1 token the Python around it is most of the cost.
        if return_nodes:
            return self._forward_nodes(x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                                       self._isa_code, packed.knobs)
        if packed.untuned:
            assert self._forward_untuned is not None  # set by loading
            return self._forward_untuned(x, packed.w_in, packed.b_in, packed.w_out, n_trees,
                                         depth, self._isa_code), None
        return self._forward(x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth,
                             self._isa_code, packed.knobs), None

    def train_forward(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                      w_out: torch.Tensor, n_trees: int, depth: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The native training path (:func:`.training.custom_ops`): ``y`` ``(T, d)`` with
        autograd to ``x`` and the weights, and the visited nodes ``(T, K, D+1)``."""
        if self._library is None:
            reason = self.unavailable_reason(x.device, x.dtype, training=True)
            if reason is not None:
                raise ResourceError(f"the native FFF kernel cannot train: {reason}")
        assert self._train is not None  # set by loading
        y, nodes, _, _ = self._train(x, w_in, b_in, w_out, n_trees, depth, self._isa_code)
        return y, nodes


@functools.cache
def native_fakes() -> None:
    """``ultrafastbert::native_fff_forward``: the native kernel as a ``torch.library`` custom
    operator with a fake implementation (shapes only), so code under ``torch.compile`` can call
    it (``torch.ops.ultrafastbert.native_fff_forward(x, w_in, b_in, w_out_rows, K, D, isa)``).
    The C++ operators themselves are composite, so they cannot take a fake. Defined once the
    library is loaded; the eager layer keeps calling the C++ operator directly (fewer steps)."""

    @torch.library.custom_op("ultrafastbert::native_fff_forward", mutates_args=())
    def forward(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                n_trees: int, depth: int, isa: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``y`` ``(T, d)`` and the visited nodes ``(T, K, D+1)``."""
        return torch.ops.ultrafastbert.fff_cpu_forward_nodes(x, w_in, b_in, w_out, n_trees,
                                                             depth, isa)

    @forward.register_fake
    def _(x, w_in, b_in, w_out, n_trees, depth, isa):  # noqa: ANN001, ANN202
        nodes = x.new_empty((x.shape[0], n_trees, path_length(depth)), dtype=torch.long)
        return torch.empty_like(x), nodes


# ------------------------------------------------------------------- bfloat16 end to end
#: The kernel's paths, best first, with the op's numeric code.
BF16_ISA_CODES = {"avx512bf16": 3, "avx512": 2, "avx2": 1}
#: Environment switch forcing a path (e.g. ``avx512`` to time the widening fallback on a CPU
#: that has AVX512-BF16); read when a kernel without an explicit ``isa`` is first loaded.
BF16_ISA_ENV = "ULTRAFASTBERT_BF16_ISA"


def bf16_cpu_path() -> str:
    """The best path the loaded library runs on this CPU: ``avx512bf16``, ``avx512``, ``avx2``
    or ``""`` (the library must be loaded)."""
    return torch.ops.ultrafastbert.fff_bf16_isa()


@dataclass(frozen=True)
class NativeBF16Packed:
    """The kernel's copy of the weights (checkpoint node order, tree-major heap order).

    w_in: ``(K*N, d)`` bfloat16 routing rows. b_in: ``(K*N,)`` float32 (zeros without a bias).
    w_out: ``(K*N, d)`` bfloat16 output rows (``linear_out.weight`` transposed). All contiguous.
    knobs: the walk's knobs table (``tuning``; never changes a result; None: the bf16 ops'
    fixed defaults). untuned (derived): the table is those defaults, so calls take the untuned
    op.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    knobs: torch.Tensor | None = None
    n_trees: int = 0
    untuned: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "untuned", self.knobs is None or torch.equal(
            self.knobs, tuning.bf16_default_table(self.n_trees)))


class NativeBF16Kernel(_NativeKernel):
    """bfloat16 inputs and weights -> bfloat16 outputs, fp32 accumulation.

    Args:
        isa: ``None`` for the best path of this CPU (or the one ``ULTRAFASTBERT_BF16_ISA``
            names), or ``"avx512bf16"``/``"avx512"``/``"avx2"`` to force one (so the widening
            fallback can be tested on a CPU with AVX512-BF16).
        tune: choose the walk's knobs per shape by measurement on first pack, starting from
            the bf16 defaults (``tuning``; ``ULTRAFASTBERT_AUTOTUNE=0`` also turns it off).
    """

    name = "native-bf16"
    description = "native C++ CPU kernel in bfloat16 (AVX512-BF16 dot products, else widening)"
    devices = ("cpu",)
    dtypes = (torch.bfloat16,)
    #: For bfloat16 inputs every float format means bfloat16 weights: the layer's own.
    weight_formats = tuple(f for f in WEIGHT_FORMATS if f != "int8")

    isa_codes = BF16_ISA_CODES

    def __init__(self, isa: str | None = None, tune: bool = True):
        super().__init__(isa, tune)
        self._forward_tuned: Callable[..., Any] | None = None

    def extra_reason(self, device: torch.device) -> str | None:
        """Why the kernel cannot run: disabled, CPU, toolchain, build failure or a forced path
        this CPU lacks (builds once)."""
        if self._forward is not None:
            return None
        library = build.status()
        if isinstance(library, str):
            return library
        ops = torch.ops.ultrafastbert
        best = bf16_cpu_path()
        isa = self._isa or os.environ.get(BF16_ISA_ENV) or best
        if isa not in BF16_ISA_CODES:
            return f"{BF16_ISA_ENV}={isa!r} is not one of {tuple(BF16_ISA_CODES)}; fix or unset it"
        if BF16_ISA_CODES[isa] > BF16_ISA_CODES.get(best, 0):
            return f"this CPU does not support the {isa} path (best: {best or 'none'})"
        self._isa_code = BF16_ISA_CODES[isa]
        self._key = f"{library.path.name}/bf16-{isa}"
        forward, tuned = ops.fff_bf16_forward.default, ops.fff_bf16_forward_tuned.default
        forward_nodes = ops.fff_bf16_forward_tuned_nodes.default
        self._forward_tuned = _cpp(tuned)
        self._forward_nodes = _cpp(forward_nodes)
        self._forward = _cpp(forward)
        return None

    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> NativeBF16Packed:
        """bfloat16 rows (no copy when ``w_in`` already is contiguous bf16) and the knobs
        (tuned per shape as the fp32 kernel's, or the bf16 defaults); see the class doc."""
        w_in = w_in.detach()
        bias = b_in.detach() if b_in is not None else w_in.new_zeros(w_in.shape[0])
        packed = NativeBF16Packed(w_in.to(torch.bfloat16).contiguous(), bias.float().contiguous(),
                                  w_out.detach().t().to(torch.bfloat16).contiguous(),
                                  tuning.bf16_default_table(n_trees), n_trees)
        return dataclasses.replace(packed, knobs=self.knobs_for(packed, n_trees, depth,
                                                                weight_format))

    def knobs_for(self, packed: NativeBF16Packed, n_trees: int, depth: int,
                  weight_format: str) -> torch.Tensor:
        """The knobs table for these packed weights: tuned (cached per CPU model; from the bf16
        defaults) or those defaults."""
        if not self._tune or self.unavailable_reason(torch.device("cpu"), torch.bfloat16,
                                                     weight_format) is not None:
            return tuning.bf16_default_table(n_trees)
        forward, p = self._forward_tuned, packed
        assert forward is not None

        def run(x: torch.Tensor, knobs: torch.Tensor) -> object:
            return forward(x.bfloat16(), p.w_in, p.b_in, p.w_out, n_trees, depth,
                           self._isa_code, knobs)

        shape = tuning.Shape(n_trees, depth, packed.w_in.shape[1], "bf16",
                             torch.get_num_threads())
        return tuning.table_for(shape, run, self._key, tuning.bf16_default_row)

    def forward(self, x: torch.Tensor, packed: NativeBF16Packed, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(T, d)`` bfloat16 contiguous -> ``y`` ``(T, d)`` bfloat16, nodes
        ``(T, K, D+1)`` | None."""
        if self._forward is None:
            reason = self.unavailable_reason(x.device, x.dtype)
            if reason is not None:
                raise ResourceError(f"the native bf16 FFF kernel cannot run: {reason}")
        assert self._forward is not None and self._forward_nodes is not None
        p = packed
        knobs = p.knobs if p.knobs is not None else tuning.bf16_default_table(n_trees)
        if return_nodes:
            return self._forward_nodes(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                       self._isa_code, knobs)
        if p.untuned:
            return self._forward(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                 self._isa_code), None
        assert self._forward_tuned is not None
        return self._forward_tuned(x, p.w_in, p.b_in, p.w_out, n_trees, depth, self._isa_code,
                                   knobs), None


# ------------------------------------------------------------------- int8 weights
#: The int8 kernel's paths, best first, with the op's numeric code: ``avx512vnni`` quantizes
#: each token and takes the routing dot products with VNNI; the others widen the int8 rows.
INT8_ISA_CODES = {"avx512vnni": 3, "avx512": 2, "avx2": 1}
#: CPU flags (``/proc/cpuinfo`` names) each int8 path needs.
INT8_ISA_FLAGS = {"avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                  "avx512": ("avx512f", "avx512bw", "avx512vl"), "avx2": ("avx2", "fma")}


@dataclass(frozen=True)
class NativeInt8Packed:
    """The int8 kernel's copy of the weights (checkpoint node order, tree-major heap order).

    w_in, w_out: ``(K*N, d)`` int8 routing and output rows (``linear_out.weight`` transposed),
    each row ``scale * q`` with ``q`` in [-127, 127] (symmetric, one scale per row); s_in, s_out:
    ``(K*N,)`` float32 those scales; c_in: ``(K*N,)`` float32 ``128 * w_in.sum(1)`` (the VNNI
    path's offset); b_in: ``(K*N,)`` float32 (zeros without a bias). knobs: the
    walk's knobs table (``tuning``; never changes a result). untuned (derived): the table is the
    fixed defaults, so calls can take the untuned op.
    """

    w_in: torch.Tensor
    s_in: torch.Tensor
    c_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    s_out: torch.Tensor
    knobs: torch.Tensor
    n_trees: int = 0
    untuned: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "untuned", self.n_trees > 0 and torch.equal(
            self.knobs, tuning.default_table(self.n_trees)))

    def args(self) -> tuple[torch.Tensor, ...]:
        """The op's weight arguments: ``(w_in, s_in, c_in, b_in, w_out, s_out)``."""
        return self.w_in, self.s_in, self.c_in, self.b_in, self.w_out, self.s_out

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_in (K*N, d), b_in (K*N,), w_out (d, K*N))`` float32 in checkpoint layout: the
        weights whose FFF the kernel computes."""
        return (self.w_in.float() * self.s_in[:, None], self.b_in,
                (self.w_out.float() * self.s_out[:, None]).t())


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``rows`` ``(R, d)`` -> ``(q (R, d) int8, scale (R,) float32)``
    with ``rows ~ scale[:, None] * q``, ``q`` in [-127, 127], ``scale = max|row| / 127`` (0 for
    an all-zero row)."""
    rows = rows.detach().float()
    scale = rows.abs().amax(dim=1) / 127.0
    q = torch.round(rows / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    return q.clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


class NativeInt8Kernel(_NativeKernel):
    """float32 inputs and outputs, int8 node rows with one float scale per row (weight format
    ``int8``): the FFF of the dequantized weights, computed in fp32 with the int8 values widened
    in registers, so a quarter of the fp32 rows' bytes are streamed. Routes may differ from the
    float32 weights' where a logit is near 0 (docs/precision.md).

    The ``avx512vnni`` path also quantizes each token once per call (symmetric int8, one scale
    per token, :func:`quantize_tokens`) and takes the routing dot products in integers with
    AVX512-VNNI; it computes the FFF of the dequantized weights on the dequantized tokens.

    The default is the best widening path (``avx512``, else ``avx2``): on the converted MiniLM
    8x7 the ``avx512vnni`` path, although faster, lost the accuracy rule (pooled cosine to
    float32 0.9896 < 0.99 with int8 linears; the widening path 0.9906, docs/precision.md), so
    it runs only when asked for.

    Args:
        isa: ``None`` for the default path (less the flags ``ULTRAFASTBERT_CPU_FLAGS_OFF``
            hides), or one of :data:`INT8_ISA_CODES`.
        tune: choose the walk's knobs per shape by measurement on first pack (as the fp32
            kernel; ``ULTRAFASTBERT_AUTOTUNE=0`` also turns it off).
    """

    name = "native-int8"
    description = ("native C++ CPU kernel with int8 weights, one scale per node row "
                   "(weight format int8; AVX-512/AVX2)")
    devices = ("cpu",)
    dtypes = (torch.float32,)
    weight_formats = ("int8",)

    isa_codes = INT8_ISA_CODES

    def __init__(self, isa: str | None = None, tune: bool = True):
        super().__init__(isa, tune)
        self._forward_untuned: Callable[..., Any] | None = None

    def extra_reason(self, device: torch.device) -> str | None:
        """Why the kernel cannot run: disabled, CPU, toolchain, build failure or a forced
        instruction set this CPU lacks (builds once)."""
        if self._forward is not None:
            return None
        if torch.compiler.is_compiling():
            return ("not loaded yet in this process, and a torch.compile trace does not load "
                    "it; one eager call before compiling loads it")
        library = build.status()
        if isinstance(library, str):
            return library
        available = _int8_paths()
        isa = self._isa or next((p for p in available if p != "avx512vnni"), "")
        if isa not in available:
            return (f"this CPU does not support {isa or 'any int8 path'} (best: "
                    f"{available[0] if available else 'none'})")
        self._isa_code = INT8_ISA_CODES[isa]
        self._key = f"{library.path.name}/int8-{isa}"
        ops = torch.ops.ultrafastbert
        tuned, nodes = ops.fff_int8_forward_tuned.default, ops.fff_int8_forward_tuned_nodes.default
        untuned = ops.fff_int8_forward.default
        self._forward_untuned = _cpp(untuned)
        self._forward_nodes = _cpp(nodes)
        self._forward = _cpp(tuned)
        return None

    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> NativeInt8Packed:
        """Quantize each node row (:func:`quantize_rows`); see :class:`NativeInt8Packed`."""
        q_in, s_in = quantize_rows(w_in)
        q_out, s_out = quantize_rows(w_out.detach().t())
        c_in = (128 * q_in.sum(dim=1, dtype=torch.int64)).float().contiguous()
        bias = (b_in.detach() if b_in is not None else w_in.new_zeros(w_in.shape[0]))
        packed = NativeInt8Packed(q_in, s_in, c_in, bias.float().contiguous(), q_out, s_out,
                                  tuning.default_table(n_trees), n_trees)
        knobs = self.knobs_for(packed, n_trees, depth)
        return dataclasses.replace(packed, knobs=knobs)

    def knobs_for(self, packed: NativeInt8Packed, n_trees: int, depth: int) -> torch.Tensor:
        """The knobs table for these packed weights: tuned (cached per CPU model) or defaults."""
        if not self._tune or self.unavailable_reason(torch.device("cpu"), torch.float32,
                                                     "int8") is not None:
            return tuning.default_table(n_trees)
        forward, p = self._forward, packed
        assert forward is not None

        def run(x: torch.Tensor, knobs: torch.Tensor) -> object:
            return forward(x, *p.args(), n_trees, depth, self._isa_code, knobs)

        shape = tuning.Shape(n_trees, depth, packed.w_in.shape[1], "int8",
                             torch.get_num_threads())
        return tuning.table_for(shape, run, self._key)

    def forward(self, x: torch.Tensor, packed: NativeInt8Packed, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(T, d)`` float32 contiguous -> ``y`` ``(T, d)``, nodes ``(T, K, D+1)``|None."""
        if self._forward is None:
            reason = self.unavailable_reason(x.device, x.dtype, "int8")
            if reason is not None:
                raise ResourceError(f"the native int8 FFF kernel cannot run: {reason}")
        assert self._forward is not None and self._forward_nodes is not None
        p = packed
        if return_nodes:
            return self._forward_nodes(x, *p.args(), n_trees, depth, self._isa_code, p.knobs)
        if p.untuned:
            assert self._forward_untuned is not None
            return self._forward_untuned(x, *p.args(), n_trees, depth, self._isa_code), None
        return self._forward(x, *p.args(), n_trees, depth, self._isa_code, p.knobs), None


def _int8_paths() -> list[str]:
    """The int8 paths the loaded library runs on this CPU, best first, less those needing a
    flag ``ULTRAFASTBERT_CPU_FLAGS_OFF`` hides."""
    from ...utils.machine import flags_switched_off

    best = torch.ops.ultrafastbert.fff_int8_isa()
    hidden = flags_switched_off()
    paths = list(INT8_ISA_CODES)
    return [isa for isa in (paths[paths.index(best):] if best in paths else [])
            if not hidden & set(INT8_ISA_FLAGS[isa])]


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``avx512vnni`` path's token quantization (the kernel's own, for tests and references):
    ``x`` ``(T, d)`` float32 -> ``(q (T, d) int8, scale (T,) float32)``, ``q = round(x * 127 /
    max|x|)`` (to nearest even), ``scale = max|x| / 127``; the token is read as ``scale * q``.
    Needs the library loaded and a CPU with AVX512-VNNI."""
    return torch.ops.ultrafastbert.fff_int8_quantize_tokens(x.float().contiguous())
