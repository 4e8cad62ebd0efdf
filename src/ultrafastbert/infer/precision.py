"""Precision per part of the encoder: the dense linears in float32, bfloat16 or int8.

``precision`` names what the dense linears (attention Q/K/V and output projections, a dense
feed-forward block, pooler, heads) compute in; the rest follows:

========== ==================================== =================== ==========================
precision  dense linears                        hidden states, norms FFF blocks
========== ==================================== =================== ==========================
float32    oneDNN GEMM, prepacked fp32 weight   float32             float32 kernel
bfloat16   oneDNN GEMM, prepacked bf16 weight   bfloat16            bf16 kernel where measured
                                                                    faster, else float32
                                                                    kernel (cast in/out)
int8       int8 weights, one scale per output   float32             int8-weight kernel where
           row; activations quantized per call                      measured faster, else
           (PyTorch's quantized dynamic linear)                     float32 kernel
========== ==================================== =================== ==========================

No GEMM is written here: the int8 path is ``torch.ops.quantized.linear_dynamic`` (FBGEMM /
oneDNN, VNNI dot products where the CPU has them) on a weight quantized per output channel,
which keeps the pooled cosine that per-tensor scales lose (docs/precision.md).

At int8 the FFF blocks run the ``native-int8`` kernel (weight format ``int8``: every node row
int8 with one scale) for each layer shape where it is measured faster than the float32 kernel
(:func:`fff_weight_format`: timed on first use at :data:`FFF_MEASURED_TOKENS`, cached per CPU
like the kernel's knobs); the model's own FFF modules are not changed (:func:`fff_at`).

:func:`unavailable` says why a precision cannot run on this CPU. A CPU is treated as lacking
VNNI / AVX512-BF16 when ``ULTRAFASTBERT_CPU_FLAGS_OFF`` names the flag (comma-separated, e.g.
``avx512_vnni,avx512_bf16,amx_int8,amx_bf16,avx_vnni``): how the fallback is tested on a CPU
that has them.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..fff import FFF
from ..fff.layer import FFFRuntime
from ..model.linear import InferenceLinear
from ..utils.cache import PackedCache
from ..utils.env import switched_off
from ..utils.machine import ENV_FLAGS_OFF as ENV_FLAGS_OFF  # re-exported: the switch's name
from ..utils.machine import flags_switched_off

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "int8")
CHOICES = (*PRECISIONS, "auto")
#: Flags that make each low precision worth running (any one of them).
NEEDED_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"),
                "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}
STREAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}


def validate(precision: str) -> str:
    """``precision`` when it is one of :data:`CHOICES`, else an error naming the set."""
    if precision not in CHOICES:
        raise InputError(f"precision must be one of {CHOICES}, got {precision!r}")
    return precision


@cache
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``), less those :data:`ENV_FLAGS_OFF` names."""
    return _proc_flags() - flags_switched_off()


def unavailable(precision: str, device: torch.device | str = "cpu") -> str | None:
    """Why ``precision`` cannot run (or would not be fast) here, or None when it can."""
    validate(precision)
    if precision == "float32" or precision == "auto":
        return None
    if torch.device(device).type != "cpu":
        return None if precision == "bfloat16" else f"int8 linears are a CPU path, not {device}"
    flags = cpu_flags()
    if not any(f in flags for f in NEEDED_FLAGS[precision]):
        switched = os.environ.get(ENV_FLAGS_OFF)
        why = f" ({ENV_FLAGS_OFF}={switched})" if switched else ""
        return (f"this CPU has none of {NEEDED_FLAGS[precision]}{why}: {precision} would run "
                "emulated, slower than float32")
    if precision == "int8" and "fbgemm" not in torch.backends.quantized.supported_engines \
            and "x86" not in torch.backends.quantized.supported_engines:
        return "this PyTorch has no x86/fbgemm quantized engine"
    return None


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one scale per output row, and a float bias.

    ``forward(x (..., in) float32) -> (..., out) float32``; ``x`` is quantized to uint8 per call
    (one scale per call: dynamic quantization). Built from an ``nn.Linear`` (a copy; the source
    is not changed).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        q = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed: Any = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``."""
        return torch.ops.quantized.linear_dynamic(x, self._packed, False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def fused(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose outputs are those of ``linears`` stacked (Q, K, V -> QKV)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = any(lin.bias is not None for lin in linears)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            assert out.bias is not None
            out.bias.copy_(torch.cat([
                lin.bias.detach() if lin.bias is not None
                else torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device)
                for lin in linears]))
    return out


def make_linear(linear: nn.Linear, precision: str) -> nn.Module:
    """``linear`` for inference at ``precision`` (float32 shares its parameters; the others copy
    them). Input and output in :data:`STREAM_DTYPES` of ``precision``."""
    if precision == "int8":
        return Int8Linear(linear)
    if precision == "bfloat16":
        copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=torch.bfloat16)
        with torch.no_grad():
            copy.weight.copy_(linear.weight)
            if linear.bias is not None:
                assert copy.bias is not None
                copy.bias.copy_(linear.bias)
        linear = copy
    return InferenceLinear.from_linear(linear).eval()


class CastLayerNorm(nn.Module):
    """A LayerNorm's parameters in the stream dtype: ``(..., d)`` -> ``(..., d)``."""

    def __init__(self, norm: nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = None if norm.weight is None else norm.weight.detach().to(dtype)
        self.bias = None if norm.bias is None else norm.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of ``x``."""
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def norm_for(norm: nn.LayerNorm, dtype: torch.dtype) -> nn.Module:
    """``norm`` itself when its dtype is ``dtype``, else a cast copy."""
    if norm.weight is None or norm.weight.dtype == dtype:
        return norm
    return CastLayerNorm(norm, dtype)


# ------------------------------------------------------------------ FFF blocks at int8
#: Tokens per call at which the int8-weight FFF kernel is timed against the float32 one (a
#: batch of 32 short texts is ~600 tokens, 32 x 128 is 4,096); it is used where it is faster
#: on the geometric mean of its time ratios at these counts.
FFF_MEASURED_TOKENS = (128, 1024)
#: Cache entries of those measurements (in the native kernel's tuning file, one per CPU).
FFF_CACHE_KEY = "fff-int8-v3"
FFF_BF16_CACHE_KEY = "fff-bf16-v1"
#: Environment switch: ``0`` (or ``false``/``off``/``no``) keeps the FFF blocks' weights in
#: float32 at precision int8 (read when an encoder is built; how the two are compared).
FFF_INT8_SWITCH = "ULTRAFASTBERT_FFF_INT8"
#: The same for the bfloat16 FFF kernel at precision bfloat16 (``0``: the float32 kernel, with
#: the stream cast around it).
FFF_BF16_SWITCH = "ULTRAFASTBERT_FFF_BF16"
#: Per precision: the FFF weight format it may run, that format's kernel, its input dtype, the
#: switch and the cache entry of the measurement that decides.
FFF_LOW = {"int8": ("int8", "native-int8", torch.float32, FFF_INT8_SWITCH, FFF_CACHE_KEY),
           "bfloat16": ("bf16", "native-bf16", torch.bfloat16, FFF_BF16_SWITCH,
                        FFF_BF16_CACHE_KEY)}


def fff_weight_format(fff: FFF, precision: str) -> tuple[str, str]:
    """The weight format ``fff``'s kernel takes at ``precision`` (``int8``, ``bf16`` or
    ``fp32``), and why.

    ``int8`` only at precision int8 (the ``native-int8`` kernel, float32 activations),
    ``bf16`` only at precision bfloat16 (the ``native-bf16`` kernel: bfloat16 activations and
    weights, AVX512-BF16 dot products), each on the CPU where its kernel runs and was measured
    faster than the float32 ``native`` kernel for this layer shape (geometric mean over
    :data:`FFF_MEASURED_TOKENS` of the time ratios; random weights, the two timed alternately on
    first use, cached per CPU, shape, threads and kernel build; with
    ``ULTRAFASTBERT_AUTOTUNE=0`` nothing is measured: fp32; the precision's switch in
    :data:`FFF_LOW` off: fp32).
    """
    from ..fff import dispatch
    from ..fff.native import tuning

    if precision not in FFF_LOW:
        return "fp32", f"precision {precision}"
    fmt, kernel, dtype, switch, _ = FFF_LOW[precision]
    if switched_off(switch) is not None:
        return "fp32", f"switched off ({switch}={switched_off(switch)})"
    device = fff.linear_in.weight.device
    if device.type != "cpu" or fff.linear_in.weight.dtype != torch.float32:
        return "fp32", f"{fmt} FFF weights are a CPU path from float32 weights"
    reasons = dict(dispatch.explain(device, dtype, fmt))
    if reasons.get(kernel) is not None:
        return "fp32", f"{kernel} cannot run: {reasons[kernel]}"
    if dict(dispatch.explain(device, torch.float32, "fp32")).get("native") is not None:
        return fmt, "the float32 native kernel cannot run here"
    if tuning.disabled() is not None:
        return "fp32", f"not measured ({tuning.ENV_SWITCH}={tuning.disabled()})"
    entry = _fff_timings(fff, precision)
    fp32, low = entry["us_per_token"]["native"], entry["us_per_token"][kernel]
    detail = ", ".join(f"{t} tokens: fp32 {a:.3g} / {fmt} {b:.3g} us/token"
                       for t, a, b in zip(entry["tokens"], fp32, low, strict=True))
    faster = _geomean_ratio(low, fp32) < 1.0
    return (fmt if faster else "fp32"), (
        f"{fmt} weights {'faster' if faster else 'not faster'} for {fff.n_trees}x{fff.depth} "
        f"at d={fff.d_model} ({detail}; measured on first use, cached)")


def _geomean_ratio(a: list[float], b: list[float]) -> float:
    """Geometric mean of ``a[i] / b[i]``."""
    return math.exp(sum(math.log(x / y) for x, y in zip(a, b, strict=True)) / len(a))


def _fff_timings(fff: FFF, precision: str = "int8") -> dict[str, Any]:
    """The cached (or now measured) timings of the fp32 kernel and ``precision``'s low-precision
    kernel (:data:`FFF_LOW`) for ``fff``'s shape."""
    from ..fff import dispatch
    from ..fff.native import build, tuning

    fmt, kernel, dtype, _, cache_key = FFF_LOW[precision]
    shape = dispatch.Workload(fff.n_trees, fff.depth, fff.d_model)
    library = build.status()
    build_key = "" if isinstance(library, str) else library.path.name
    isa = getattr(dispatch.registry()[kernel], "isa", None)
    key = f"{shape.config}/d{shape.d_model}/t{torch.get_num_threads()}/{isa}"

    def measure() -> dict[str, Any]:
        return _time_fff_kernels(shape, (("native", "fp32", torch.float32), (kernel, fmt, dtype)))

    def valid(entry: Any) -> bool:
        return (isinstance(entry, dict) and entry.get("tokens") == list(FFF_MEASURED_TOKENS)
                and set(entry.get("us_per_token", {})) == {"native", kernel})

    return tuning.cached(f"{cache_key}/{build_key}", key, measure, valid)


@torch.no_grad()
def _time_fff_kernels(shape: Any, specs: tuple[tuple[str, str, torch.dtype], ...],
                      samples: int = 7, sample_s: float = 0.004) -> dict[str, Any]:
    """µs per token of each kernel of ``specs`` (``(name, weight format, input dtype)``, e.g.
    the fp32 ``native`` and ``native-int8``) on random weights of ``shape`` (std 0.02) at each
    count of :data:`FFF_MEASURED_TOKENS`: the fastest of ``samples`` samples of about
    ``sample_s`` of calls each, the kernels' samples alternating (a load spike slows one sample,
    not one kernel)."""
    import time

    from ..fff import dispatch
    from ..fff.tree import n_nodes

    g = torch.Generator().manual_seed(0)
    width, d = shape.n_trees * n_nodes(shape.depth), shape.d_model
    weights = (torch.randn(width, d, generator=g) * 0.02, torch.zeros(width),
               torch.randn(d, width, generator=g) * 0.02)
    kernels = dispatch.registry()
    runs = {name: (kernels[name], kernels[name].pack(*weights, shape.n_trees, shape.depth, fmt),
                   dtype) for name, fmt, dtype in specs}
    result: dict[str, list[float]] = {name: [] for name in runs}
    for count in FFF_MEASURED_TOKENS:
        x = F.layer_norm(torch.randn(count, d, generator=g), (d,))
        inputs = {name: x.to(dtype) for name, (_, _, dtype) in runs.items()}
        best = {name: float("inf") for name in runs}
        calls = {}
        for name, (kernel, packed, _) in runs.items():
            kernel.forward(inputs[name], packed, shape.n_trees, shape.depth)  # warm-up
            start = time.perf_counter()
            kernel.forward(inputs[name], packed, shape.n_trees, shape.depth)
            calls[name] = max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))
        for _ in range(samples):
            for name, (kernel, packed, _) in runs.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    kernel.forward(inputs[name], packed, shape.n_trees, shape.depth)
                per_token = (time.perf_counter() - start) / calls[name] / count * 1e6
                best[name] = min(best[name], per_token)
        for name in runs:
            result[name].append(round(best[name], 4))
    logger.info("FFF %s at d=%d: kernels %s, us/token at %s tokens: %s", shape.config, d,
                list(runs), list(FFF_MEASURED_TOKENS), result)
    return {"tokens": list(FFF_MEASURED_TOKENS), "us_per_token": result}


def fff_at(block: nn.Module, precision: str) -> nn.Module:
    """``block`` (an :class:`FFF`, or a module whose direct children include one, such as a
    converted ``FFFBlock``) as it runs at ``precision``: itself, or where
    :func:`fff_weight_format` says ``int8``, a shallow copy whose FFF takes int8 weights (the
    copy shares every parameter), or where it says ``bf16``, a bfloat16 copy of the whole
    block (its FFF on bfloat16 weights; its bias and any parts beside the trees in bfloat16 too,
    as the precision's other layers are), so its input and output are bfloat16. The model's own
    modules are not changed."""
    if precision not in FFF_LOW:
        return block
    if isinstance(block, FFF):
        return _fff_view(block, precision)
    if precision == "bfloat16":
        return _bf16_block(block)
    children = {name: _fff_view(m, precision) if isinstance(m, FFF) else m
                for name, m in block._modules.items()}
    if all(children[name] is m for name, m in block._modules.items()):
        return block
    view = _shallow_copy(block)
    view._modules = children
    return view


def _bf16_block(block: nn.Module) -> nn.Module:
    """``block`` itself, or (where its first FFF child runs bf16 weights) a bfloat16 copy whose
    FFF children run the bf16 kernel."""
    fffs = [name for name, m in block.named_children() if isinstance(m, FFF)]
    if not fffs:
        return block
    first = block._modules[fffs[0]]
    assert isinstance(first, FFF)
    fmt, why = fff_weight_format(first, "bfloat16")
    logger.info("FFF %dx%d at d=%d, precision bfloat16: %s weights (%s)", first.n_trees,
                first.depth, first.d_model, fmt, why)
    if fmt != "bf16":
        return block
    view = copy.deepcopy(block).to(torch.bfloat16).requires_grad_(False)
    for name in fffs:
        fff = view._modules[name]
        assert isinstance(fff, FFF)
        fff._cache = PackedCache()
        fff.runtime = FFFRuntime("auto", "bf16", fff.runtime.training)
    return view


def _shallow_copy(module: nn.Module) -> Any:
    """A copy of ``module`` sharing its parameters, buffers and submodules, with dicts of its own
    (assigning to the copy, or hooking it, leaves ``module`` as it was)."""
    view = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):  # _parameters, _modules, _buffers, the hooks ...
            view.__dict__[name] = copy.copy(value)
    return view


def _fff_view(fff: FFF, precision: str) -> FFF:
    """``fff`` itself, or a copy that runs int8 weights (sharing its parameters) or bfloat16
    ones (holding bfloat16 copies); logged."""
    fmt, why = fff_weight_format(fff, precision)
    logger.info("FFF %dx%d at d=%d, precision %s: %s weights (%s)", fff.n_trees, fff.depth,
                fff.d_model, precision, fmt, why)
    if fmt == fff.runtime.weight_format:
        return fff
    if fmt == "bf16":
        view = copy.deepcopy(fff).to(torch.bfloat16).requires_grad_(False)
    else:
        view = _shallow_copy(fff)
    view._cache = PackedCache()  # its own packed copy (the original's stays with it)
    view.runtime = FFFRuntime("auto", fmt, fff.runtime.training)
    return view
