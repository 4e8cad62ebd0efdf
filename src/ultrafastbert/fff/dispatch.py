"""One place picks the FFF kernel, for inference and for training.

Kernels are listed in priority order (GPU kernel, native CPU kernel, vectorised PyTorch, the
depth-0 GEMM route); each declares the devices, dtypes and tree shapes it serves, whether it has
a training path, and says why it refuses. An explicitly named kernel that cannot run is an error,
never a silent fallback.

``"auto"`` without a layer shape takes the first kernel that can run. With one (a
:class:`Workload`: trees, depth, width and optionally the tokens per call), inference follows the
**cost rule** of :func:`plan`, which can depend on the token count (then the layer gets a
:class:`TokenSplit` that routes each call by its size):

- CPU: the native walk (when it can run) for every configuration except wide depth-0 ones
  (:data:`GEMM_MIN_TREES` trees and more), where from :data:`GEMM_MIN_TOKENS` tokens two dense
  GEMMs do the same work faster (every node is on the path; measured 2-2.5x faster than the walk
  at >= 32 tokens). The torch path (GEMM for the
  shallow levels, sparse products for the deep ones) was measured slower than the native walk
  for every configuration and token count tried (docs/native.md), so it is chosen only when the
  native kernel cannot run.
- CPU with ``ULTRAFASTBERT_AUTOTUNE`` on (the default outside the tests): the rule above is
  replaced by a measurement: every kernel that can run the shape is timed on first use at
  :data:`MEASURED_TOKENS` and the fastest serves each token range (:func:`measured_cpu_plan`;
  cached per CPU model with the native kernel's knobs), so a CPU where the GEMM route or the
  torch path wins gets it.
- Other devices: no cost measurements, so the first kernel that can run in priority order.

Each :class:`Choice` carries its reason; :func:`describe` prints them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..utils.device import device_unavailable_reason
from .kernel import FFFKernel, validate_weight_format
from .token_split import SplitByTokens, TokenSplit

logger = logging.getLogger(__name__)

#: Depth-0 layers from this many tokens per call take the GEMM route on CPU (measured: the GEMM
#: route is slower than the walk at 1-4 tokens, even at 8 and 2-2.5x faster from 32 on, for
#: 3072x0/256x0 at d=768 and 1536x0/64x0 at d=384; AMD EPYC Zen 4, 1 thread).
GEMM_MIN_TOKENS = 16
#: ... and from this many trees: with few trees the GEMMs' fixed cost dominates (measured: 2x0 at
#: d=384, 32 tokens: walk 0.11 µs/token, GEMMs 0.37).
GEMM_MIN_TREES = 64
#: Where the cost rule's measurements are written up.
EVIDENCE = "docs/native.md, 'Choosing a kernel'"

_REGISTRY: dict[str, FFFKernel] = {}


def registry() -> dict[str, FFFKernel]:
    """All known kernels by name, in priority order (imports their modules lazily, at first use).

    Filled once into a module dict rather than behind ``functools.cache``: ``torch.compile``
    ignores such caches and would re-run (and re-create the kernels) inside every trace.
    """
    if not _REGISTRY:
        from .gemm.kernel import GemmKernel
        from .native.kernel import NativeBF16Kernel, NativeCPUKernel, NativeInt8Kernel
        from .pytorch.kernel import TorchKernel
        from .triton.kernel import TritonKernel

        kernels: list[FFFKernel] = [TritonKernel(), NativeCPUKernel(), NativeBF16Kernel(),
                                    NativeInt8Kernel(), TorchKernel(), GemmKernel()]
        _REGISTRY.update((k.name, k) for k in kernels)
    return _REGISTRY


@dataclass(frozen=True)
class Workload:
    """The layer a kernel is chosen for: ``n_trees`` x ``depth`` trees over ``d_model``, and the
    tokens per call when known (None: any count)."""

    n_trees: int
    depth: int
    d_model: int
    tokens: int | None = None

    @property
    def config(self) -> str:
        """``KxD``, e.g. ``32x5``."""
        return f"{self.n_trees}x{self.depth}"


@dataclass(frozen=True)
class Choice:
    """The kernel for calls of ``min_tokens`` up to ``max_tokens`` (None: no upper bound)."""

    kernel: str
    min_tokens: int
    max_tokens: int | None
    reason: str

    def covers(self, tokens: int) -> bool:
        """Whether a call of ``tokens`` tokens takes this choice."""
        return tokens >= self.min_tokens and (self.max_tokens is None
                                              or tokens <= self.max_tokens)

    @property
    def tokens(self) -> str:
        """The token range in words: ``any token count``, ``>=16 tokens``, ``1-15 tokens``."""
        if self.max_tokens is None:
            return "any token count" if self.min_tokens <= 1 else f">={self.min_tokens} tokens"
        return f"{self.min_tokens}-{self.max_tokens} tokens"


def explain(device: torch.device | str, dtype: torch.dtype, weight_format: str = "fp32",
            training: bool = False, shape: Workload | None = None
            ) -> list[tuple[str, str | None]]:
    """``(name, reason)`` for every kernel, in priority order; reason None means it can run
    (for inference, or with ``training`` for the differentiable forward; with ``shape`` also
    for that tree shape). Why a runnable kernel is *chosen* is :func:`plan`'s."""
    device = torch.device(device)
    missing = device_unavailable_reason(device)
    if missing is not None:  # no kernel runs on a device that is not there
        return [(name, f"device {device} is not available: {missing}") for name in registry()]
    reasons = []
    for name, kernel in registry().items():
        reason = kernel.unavailable_reason(device, dtype, weight_format, training=training)
        if reason is None:
            reason = (kernel.shape_reason(shape.n_trees, shape.depth) if shape is not None
                      else kernel.shape_reason(None, None))
        reasons.append((name, reason))
    return reasons


def plan(device: torch.device | str, dtype: torch.dtype, weight_format: str,
         shape: Workload) -> list[Choice]:
    """The ``"auto"`` inference kernels for ``shape`` by token range, each with its reason
    (the cost rule in the module docstring); only the range covering ``shape.tokens`` when set.

    Raises:
        InputError: no kernel can run this shape here (with every kernel's reason).
    """
    device = torch.device(device)
    reasons = explain(device, dtype, weight_format, shape=shape)
    runnable = [name for name, reason in reasons if reason is None]
    if not runnable:
        detail = "; ".join(f"{n}: {r}" for n, r in reasons)
        raise InputError(f"no FFF implementation can run {shape.config} on {device} / {dtype} / "
                         f"weights {weight_format} ({detail})")
    refusals = dict(reasons)
    if device.type != "cpu":
        choices = [Choice(runnable[0], 1, None,
                          f"{runnable[0]}: first that can run on {device.type} (no cost "
                          "measurements for this device; priority order)")]
    elif len(runnable) > 1 and measuring():
        choices = measured_cpu_plan(runnable, shape, dtype, weight_format)
    else:
        choices = _cpu_plan(runnable, refusals, shape)
    if shape.tokens is not None:
        choices = [c for c in choices if c.covers(max(shape.tokens, 1))]
    return choices


def _cpu_plan(runnable: list[str], refusals: dict[str, str | None],
              shape: Workload) -> list[Choice]:
    """The CPU cost rule: native walk, GEMM route for wide depth 0 from GEMM_MIN_TOKENS, torch
    (or gemm for wide depth 0) without the native kernel; another kernel that walks this dtype
    (native-bf16) has no cost measurements here and keeps its priority."""
    cfg = shape.config
    walkers = [name for name in runnable if name != "gemm"]
    wide0 = "gemm" in runnable and shape.n_trees >= GEMM_MIN_TREES
    gemm_why = (f"gemm: chosen for {cfg} at >={GEMM_MIN_TOKENS} tokens: depth 0 puts every node "
                f"on the path, so two dense GEMMs do no wasted work and reuse each weight "
                f"across tokens (measured 2-2.5x faster than the native walk from 32 tokens; "
                f"{EVIDENCE})")
    if walkers and walkers[0] == "native":
        why = (f"native: chosen for {cfg}: measured faster than the torch path at every token "
               f"count for every configuration tried ({EVIDENCE})")
        if not wide0:
            return [Choice("native", 1, None, why)]
        return [Choice("native", 1, GEMM_MIN_TOKENS - 1,
                       f"native: chosen for {cfg} below {GEMM_MIN_TOKENS} tokens: measured "
                       f"faster than the GEMM route there ({EVIDENCE})"),
                Choice("gemm", GEMM_MIN_TOKENS, None, gemm_why)]
    if walkers and walkers[0] != "torch":
        return [Choice(walkers[0], 1, None,
                       f"{walkers[0]}: first that can run {cfg} in priority order (no cost "
                       f"measurements for it; native: {refusals.get('native')})")]
    if wide0 or not walkers:
        return [Choice("gemm", 1, None, gemm_why.replace(f" at >={GEMM_MIN_TOKENS} tokens", "")
                       + f"; the native kernel cannot run ({refusals.get('native')})")]
    return [Choice("torch", 1, None, f"torch: chosen for {cfg}: the native kernel cannot run "
                                     f"({refusals.get('native')})")]


#: Token counts at which ``"auto"`` times every kernel that can run a CPU layer shape (on first
#: use; each choice then covers the counts from its own up to the next one's).
MEASURED_TOKENS = (1, 16, 128, 1024)
#: Seconds of calls per timing sample (3 samples per kernel and count).
SAMPLE_S = 0.004
#: Cache entries of measured plans (in the native kernel's tuning file, one per CPU model).
PLAN_CACHE_KEY = "dispatch-plan-v1"


def measuring() -> bool:
    """Whether ``"auto"`` measures the CPU kernels on first use (``ULTRAFASTBERT_AUTOTUNE``
    not off); otherwise it follows the fixed rule of :func:`_cpu_plan`."""
    from .native import tuning

    return tuning.disabled() is None


def measured_cpu_plan(runnable: list[str], shape: Workload, dtype: torch.dtype,
                      weight_format: str) -> list[Choice]:
    """``"auto"`` on this CPU by measurement: each kernel in ``runnable`` timed on random weights
    of ``shape`` at :data:`MEASURED_TOKENS` (cached per CPU model, shape, dtype, weight format
    and thread count), the fastest at each count chosen for the counts up to the next one."""
    from .native import tuning

    key = (f"{shape.config}/d{shape.d_model}/{str(dtype).replace('torch.', '')}/"
           f"{weight_format}/t{torch.get_num_threads()}/{'+'.join(runnable)}")

    def valid(entry: Any) -> bool:
        return (isinstance(entry, dict) and entry.get("tokens") == list(MEASURED_TOKENS)
                and set(entry.get("us_per_token", {})) == set(runnable))

    entry = tuning.cached(PLAN_CACHE_KEY, key, lambda: time_kernels(
        runnable, shape, dtype, weight_format), valid)
    return choices_from_timings(entry, shape)


def choices_from_timings(entry: dict[str, Any], shape: Workload) -> list[Choice]:
    """Choices from ``{"tokens": [...], "us_per_token": {kernel: [...]}}``: the fastest
    kernel at each measured count, adjacent counts with the same winner merged."""
    tokens, times = entry["tokens"], entry["us_per_token"]
    winners = [min(times, key=lambda k: times[k][i]) for i in range(len(tokens))]
    choices: list[Choice] = []
    for i, name in enumerate(winners):
        if choices and choices[-1].kernel == name:
            continue
        end = next((j for j in range(i + 1, len(tokens)) if winners[j] != name), None)
        lo = 1 if i == 0 else tokens[i]
        hi = None if end is None else tokens[end] - 1
        counts = tokens[i:end]
        detail = ", ".join(f"{k} {times[k][i]:.3g}" for k in times)
        choices.append(Choice(name, lo, hi, (
            f"{name}: measured fastest on this CPU for {shape.config} at d={shape.d_model} at "
            f"{'/'.join(map(str, counts))} tokens (us/token at {counts[0]}: {detail}; timed "
            f"on first use and cached; ULTRAFASTBERT_AUTOTUNE=0 gives the fixed rule)")))
    return choices


@torch.no_grad()
def time_kernels(names: list[str], shape: Workload, dtype: torch.dtype, weight_format: str,
                 tokens: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Microseconds per token of each kernel in ``names`` on random weights of ``shape`` (std
    0.02, the released init) at each count of ``tokens`` (default :data:`MEASURED_TOKENS`):
    fastest of 3 samples of about :data:`SAMPLE_S` of calls each. Returns ``{"tokens":
    [...], "us_per_token": {name: [...]}}``."""
    import time

    from .tree import n_nodes

    tokens = MEASURED_TOKENS if tokens is None else tokens

    g = torch.Generator().manual_seed(0)
    width, d = shape.n_trees * n_nodes(shape.depth), shape.d_model
    w_in = (torch.randn(width, d, generator=g) * 0.02).to(dtype)
    b_in = torch.zeros(width, dtype=dtype)
    w_out = (torch.randn(d, width, generator=g) * 0.02).to(dtype)
    kernels = registry()
    packs = {n: kernels[n].pack(w_in, b_in, w_out, shape.n_trees, shape.depth, weight_format)
             for n in names}
    result: dict[str, list[float]] = {n: [] for n in names}
    for count in tokens:
        x = torch.randn(count, d, generator=g).to(dtype)
        for name in names:
            kernel, packed = kernels[name], packs[name]
            kernel.forward(x, packed, shape.n_trees, shape.depth)  # warm-up
            start = time.perf_counter()
            kernel.forward(x, packed, shape.n_trees, shape.depth)
            once = time.perf_counter() - start  # calls per sample: about SAMPLE_S of work
            calls = max(1, min(4096, int(SAMPLE_S / max(once, 1e-7))))
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(calls):
                    kernel.forward(x, packed, shape.n_trees, shape.depth)
                samples.append((time.perf_counter() - start) / calls / count * 1e6)
            result[name].append(min(samples))
    logger.info("FFF %s at d=%d: measured us/token at %s tokens: %s", shape.config, d,
                list(tokens), {n: [round(v, 3) for v in t] for n, t in result.items()})
    return {"tokens": list(tokens), "us_per_token": result}


def select(name: str, device: torch.device | str, dtype: torch.dtype,
           weight_format: str = "fp32", training: bool = False,
           shape: Workload | None = None) -> FFFKernel:
    """The kernel to use: ``name`` (``"auto"`` or a registered name) for this device and dtype,
    for inference or (``training``) for the differentiable forward. With ``shape``, ``"auto"``
    inference follows :func:`plan` (a :class:`TokenSplit` when the choice depends on the token
    count and ``shape.tokens`` is None), and a named kernel must serve that shape.

    Raises:
        InputError: unknown name, or a named kernel that cannot run here (with the reason), or
            ``"auto"`` with no kernel available (with every kernel's reason).
    """
    validate_weight_format(weight_format)
    device = torch.device(device)
    kernels = registry()
    if name != "auto":
        return _named(name, device, dtype, weight_format, training, shape)
    if shape is not None and training:  # measured per shape on the CPU (train_plan)
        return _kernel_for(train_plan(device, dtype, shape), kernels, training=True)
    if shape is not None and not training:
        choices = plan(device, dtype, weight_format, shape)
        if len(choices) == 1:
            return kernels[choices[0].kernel]
        return TokenSplit(choices, kernels)
    reasons = explain(device, dtype, weight_format, training=training, shape=shape)
    for kname, reason in reasons:
        if reason is None:
            return kernels[kname]
    detail = "; ".join(f"{n}: {r}" for n, r in reasons)
    mode = "train" if training else "run"
    raise InputError(f"no FFF implementation can {mode} on {device} / {dtype} / weights "
                     f"{weight_format} ({detail})")


def _named(name: str, device: torch.device, dtype: torch.dtype, weight_format: str,
           training: bool, shape: Workload | None) -> FFFKernel:
    """The explicitly requested kernel, or an error saying why it cannot run (no fallback)."""
    kernels = registry()
    if name not in kernels:
        raise InputError(f"unknown FFF implementation {name!r}; choose 'auto' or one of "
                         f"{sorted(kernels)}")
    reason = kernels[name].unavailable_reason(device, dtype, weight_format, training=training)
    if reason is None:
        reason = (kernels[name].shape_reason(shape.n_trees, shape.depth) if shape is not None
                  else kernels[name].shape_reason(None, None))
    if reason is not None:
        mode = "train" if training else "run"
        what = f" {shape.config}" if shape is not None else ""
        raise InputError(f"FFF implementation {name!r} cannot {mode}{what} on {device} / "
                         f"{dtype} / weights {weight_format}: {reason}")
    return kernels[name]


def describe(device: torch.device | str, dtype: torch.dtype = torch.float32,
             weight_format: str = "fp32", training: bool | None = None,
             shape: Workload | None = None) -> str:
    """A human-readable table of the kernels and whether each can run here: for inference,
    for training, or (``training=None``) both, one section each; with ``shape`` also the
    ``"auto"`` choice for it by token range, with the reasons."""
    if training is None:
        return "\n".join(["inference:", describe(device, dtype, weight_format, False, shape),
                          "", "training:", describe(device, dtype, "fp32", True, shape)])
    lines = []
    rows = explain(device, dtype, weight_format, training=training, shape=shape)
    width = max(len(name) for name, _ in rows)
    for name, reason in rows:
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"{name:{width}s} {status}  ({registry()[name].description})")
    if shape is not None:
        lines.append(f"auto for {shape.config} at d={shape.d_model}:")
        try:
            choices = (train_plan(device, dtype, shape) if training
                       else plan(device, dtype, weight_format, shape))
            lines += [f"  {c.tokens}: {c.reason}" for c in choices]
        except InputError as err:
            lines.append(f"  none: {err}")
    return "\n".join(lines)


# ------------------------------------------------------------------ training: the measured choice

#: Token counts at which ``"auto"`` times every kernel that can train a CPU layer shape (forward
#: and backward, on first use; each choice then covers the counts up to the next one's).
TRAIN_MEASURED_TOKENS = (16, 256, 2048)
#: Cache entries of measured training plans (in the native kernel's tuning file).
TRAIN_PLAN_CACHE_KEY = "dispatch-train-plan-v1"


def train_plan(device: torch.device | str, dtype: torch.dtype, shape: Workload) -> list[Choice]:
    """The ``"auto"`` training kernels for ``shape`` by token range, each with its reason.

    CPU with ``ULTRAFASTBERT_AUTOTUNE`` on and several kernels that can train: each is timed
    (forward + backward) on first use at :data:`TRAIN_MEASURED_TOKENS`, the fastest serves each
    range (cached per CPU model, shape, dtype, threads and native build). Otherwise (and inside
    a ``torch.compile`` trace) the first that can train in priority order (on the CPU: native,
    measured faster than the torch path at every count tried, docs/fff.md).

    Raises:
        InputError: no kernel can train this shape here (with every kernel's reason).
    """
    device = torch.device(device)
    reasons = explain(device, dtype, "fp32", training=True, shape=shape)
    runnable = [name for name, reason in reasons if reason is None]
    if not runnable:
        detail = "; ".join(f"{n}: {r}" for n, r in reasons)
        raise InputError(f"no FFF implementation can train {shape.config} on {device} / "
                         f"{dtype} ({detail})")
    if (device.type == "cpu" and len(runnable) > 1 and not torch.compiler.is_compiling()
            and measuring()):  # no timing (nor cache files) inside a torch.compile trace
        choices = measured_train_plan(runnable, shape, dtype)
    else:
        choices = [Choice(runnable[0], 1, None,
                          f"{runnable[0]}: first that can train {shape.config} on "
                          f"{device.type} / {str(dtype).replace('torch.', '')} in priority order")]
    if shape.tokens is not None:
        choices = [c for c in choices if c.covers(max(shape.tokens, 1))]
    return choices


def _kernel_for(choices: list[Choice], kernels: dict[str, FFFKernel],
                training: bool = False) -> FFFKernel:
    """The one chosen kernel, or a split by token count when the choice depends on it."""
    if len(choices) == 1:
        return kernels[choices[0].kernel]
    return TrainSplit(choices, kernels) if training else TokenSplit(choices, kernels)


def measured_train_plan(runnable: list[str], shape: Workload, dtype: torch.dtype
                        ) -> list[Choice]:
    """``"auto"`` training on this CPU by measurement (see :func:`train_plan`)."""
    from .native import build, tuning

    key = (f"{shape.config}/d{shape.d_model}/{str(dtype).replace('torch.', '')}/"
           f"t{torch.get_num_threads()}/{'+'.join(runnable)}")
    library = build.status()  # timings belong to one build of the native kernel
    kernel_key = TRAIN_PLAN_CACHE_KEY + ("" if isinstance(library, str)
                                         else f"/{library.path.name}")

    def valid(entry: Any) -> bool:
        return (isinstance(entry, dict) and entry.get("tokens") == list(TRAIN_MEASURED_TOKENS)
                and set(entry.get("us_per_token", {})) == set(runnable))

    entry = tuning.cached(kernel_key, key, lambda: time_training(runnable, shape, dtype), valid)
    return [Choice(c.kernel, c.min_tokens, c.max_tokens,
                   c.reason.replace("measured fastest", "measured fastest to train (forward + "
                                    "backward)"))
            for c in choices_from_timings(entry, shape)]


def time_training(names: list[str], shape: Workload, dtype: torch.dtype,
                  tokens: tuple[int, ...] | None = None,
                  clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """Microseconds per token of a forward + backward (gradients of the input and the three
    weights) of each training kernel in ``names``, random weights of ``shape`` (std 0.02), at
    each count of ``tokens`` (default :data:`TRAIN_MEASURED_TOKENS`): the fastest of 3 samples
    of about :data:`SAMPLE_S` of calls each, timed alternately across kernels (a load spike
    slows one sample, not one kernel). ``clock``: seconds (default ``time.perf_counter``).
    Returns ``{"tokens": [...], "us_per_token": {name: [...]}}``."""
    import time

    from .tree import n_nodes

    tokens = TRAIN_MEASURED_TOKENS if tokens is None else tokens
    clock = clock or time.perf_counter
    g = torch.Generator().manual_seed(0)
    width, d = shape.n_trees * n_nodes(shape.depth), shape.d_model
    weights = [(torch.randn(width, d, generator=g) * 0.02).to(dtype).requires_grad_(),
               torch.zeros(width, dtype=dtype).requires_grad_(),
               (torch.randn(d, width, generator=g) * 0.02).to(dtype).requires_grad_()]
    kernels = registry()
    result: dict[str, list[float]] = {n: [] for n in names}
    for count in tokens:
        x = torch.nn.functional.layer_norm(torch.randn(count, d, generator=g), (d,)).to(dtype)
        x.requires_grad_()
        grad_y = torch.randn(count, d, generator=g).to(dtype)

        def step(kernel: FFFKernel, x: torch.Tensor = x, grad_y: torch.Tensor = grad_y) -> None:
            y, _ = kernel.train_forward(x, weights[0], weights[1], weights[2], shape.n_trees,
                                        shape.depth)
            torch.autograd.grad(y, [x, *weights], grad_y)

        calls = {}
        for name in names:
            step(kernels[name])  # warm-up
            start = clock()
            step(kernels[name])
            calls[name] = max(1, min(64, int(SAMPLE_S / max(clock() - start, 1e-7))))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(3):
            for name in names:
                start = clock()
                for _ in range(calls[name]):
                    step(kernels[name])
                samples[name].append((clock() - start) / calls[name] / count * 1e6)
        for name in names:
            result[name].append(min(samples[name]))
    logger.info("FFF %s at d=%d: training (forward + backward) us/token at %s tokens: %s",
                shape.config, d, list(tokens),
                {n: [round(v, 3) for v in t] for n, t in result.items()})
    return {"tokens": list(tokens), "us_per_token": result}


class TrainSplit(SplitByTokens):
    """``"auto"`` training for a layer whose fastest training kernel depends on the tokens per
    call: each call trains on the kernel of the :class:`Choice` covering its token count."""

    trains = True

    def __init__(self, choices: list[Choice], kernels: dict[str, FFFKernel]):
        super().__init__(choices, kernels, "auto-train")

    def train_forward(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                      w_out: torch.Tensor, n_trees: int, depth: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The differentiable forward of ``x`` ``(T, d)`` on the kernel chosen for ``T``."""
        return self.kernel_for(x.shape[0]).train_forward(x, w_in, b_in, w_out, n_trees, depth)

    def pack(self, w_in, b_in, w_out, n_trees, depth, weight_format):  # noqa: D102
        return self._kernels[-1][1].pack(w_in, b_in, w_out, n_trees, depth, weight_format)

    def forward(self, x, packed, n_trees, depth, return_nodes=False):  # noqa: D102
        return self._kernels[-1][1].forward(x, packed, n_trees, depth, return_nodes)
