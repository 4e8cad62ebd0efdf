"""``ultrafastbert bench ff``: the paper's Table 2, done honestly.

In one process: dense feed-forward baselines (crammedBERT-3072/-4095: d->W->d, GELU, no biases;
or any widths, with biases like a BERT FFN) as torch runs them and in every faster dense form
available, in each dtype asked for (float32 and bfloat16: plain ``F.linear`` on bf16 tensors
runs on oneDNN, AMX where the CPU has it), against FFF configs with every available
implementation in the same dtypes. Speedups are given against the fastest dense of the same
dtype and against the fastest dense of any dtype measured. Every output is checked (dense
variants against each other, FFF against the float64 reference on sampled rows, routes first,
with the low-precision route rule in bf16) before anything is timed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, RunError
from ..fff import FFF, dispatch, fff_reference
from ..fff.pytorch.routing import route
from ..fff.pytorch.training import fff_masked, fff_sparse
from ..model.linear import InferenceLinear, packed_linear_unavailable
from ..utils.options import comma_list, option, positive_int
from . import common

logger = logging.getLogger(__name__)

PAPER_CONFIGS = ("3072x0", "1536x1", "512x2", "256x3", "128x4", "64x5", "32x6", "16x7", "8x8",
                 "4x9", "2x10", "1x11")
DENSE_WIDTHS = (3072, 4095)
DEFAULT_TOKENS = (1, 8, 128, 512, 4096, 16384)
CHECK_ROWS = 256
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def parse_config(name: str) -> tuple[int, int]:
    """``"KxD"`` -> ``(n_trees, depth)``; raises ``ValueError`` naming the bad value."""
    match = re.fullmatch(r"(\d+)x(\d+)", name.strip())
    if not match:
        raise InputError(f"FFF config must look like KxD (e.g. 1x11), got {name!r}")
    return int(match.group(1)), int(match.group(2))


class DenseFF(nn.Module):
    """crammedBERT-W baseline as UltraFastBERT defines it: Linear(d, W) -> GELU -> Linear(W, d);
    ``bias=True`` gives both linears biases, as in a BERT FFN (e.g. MiniLM's 384->1536->384)."""

    def __init__(self, d_model: int, width: int, device: str = "cpu", bias: bool = False):
        super().__init__()
        self.linear_in = nn.Linear(d_model, width, bias=bias, device=device)
        self.linear_out = nn.Linear(width, d_model, bias=bias, device=device)
        for linear in (self.linear_in, self.linear_out):
            nn.init.normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.normal_(linear.bias, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, d)`` -> ``(T, d)``."""
        return self.linear_out(F.gelu(self.linear_in(x)))


def dense_variants(module: DenseFF, compile_dense: bool) -> dict[str, Callable]:
    """Ways to run the same dense FF; the benchmark keeps the fastest per token count."""
    w1t = module.linear_in.weight.t().contiguous()
    w2t = module.linear_out.weight.t().contiguous()
    b1, b2 = module.linear_in.bias, module.linear_out.bias

    def matmul_pretransposed(x: torch.Tensor) -> torch.Tensor:
        hidden = torch.mm(x, w1t) if b1 is None else torch.addmm(b1, x, w1t)
        return torch.mm(F.gelu(hidden), w2t) if b2 is None else torch.addmm(b2, F.gelu(hidden),
                                                                               w2t)

    variants: dict[str, Callable] = {"nn.Linear": module, "mm-pretransposed":
                                     matmul_pretransposed}
    weight = module.linear_in.weight
    if (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()):
        variants["mkldnn"] = _mkldnn_variant(module)
    if packed_linear_unavailable(weight.device, weight.dtype) is None:
        variants["onednn-packed"] = _packed_variant(module)
    if compile_dense:
        variants["torch.compile"] = torch.compile(module, dynamic=True)
    return variants


def _mkldnn_variant(module: DenseFF) -> Callable:
    from torch.utils import mkldnn as mkldnn_utils

    first = mkldnn_utils.to_mkldnn(nn.Sequential(module.linear_in))
    second = mkldnn_utils.to_mkldnn(nn.Sequential(module.linear_out))
    return lambda x: second(F.gelu(first(x)))


def _packed_variant(module: DenseFF) -> Callable:
    """The dense FF on prepacked oneDNN GEMMs, as the encoder runs it in inference."""
    first = InferenceLinear.from_linear(module.linear_in).eval()
    second = InferenceLinear.from_linear(module.linear_out).eval()
    return lambda x: second(F.gelu(first(x)))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def parse_dtypes(text: str) -> tuple[torch.dtype, ...]:
    """``float32,bfloat16`` -> ``(torch.float32, torch.bfloat16)`` (repeats dropped)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad or not names:
        raise InputError(f"dtypes must be among {list(DTYPE_NAMES)}, got {text!r}")
    return tuple(getattr(torch, n) for n in dict.fromkeys(names))


@dataclass
class BenchSettings:
    """Run-time settings of one benchmark invocation.

    ``dtypes``: input and weight dtypes, each measured for dense and FFF alike. ``dense_widths``:
    the dense baselines; the last one is the reference the speedups are taken against.
    ``dense_bias``: dense linears with biases (a BERT FFN) instead of crammedBERT's none.
    """

    device: str = option("cpu", help="cpu or cuda")
    d_model: int = option(768, help="model width d (384 for MiniLM-sized layers)")
    tokens: tuple[int, ...] = option(DEFAULT_TOKENS, parse=comma_list(positive_int),
                                     help="comma-separated token counts")
    configs: tuple[str, ...] = option(PAPER_CONFIGS, parse=comma_list(str),
                                      show="all paper configs",
                                      help="comma-separated FFF configs KxD")
    implementations: tuple[str, ...] = option((), parse=comma_list(str),
                                              show="every one available",
                                              help="FFF implementations to time")
    repeats: int = option(15, help="timed samples (median reported)")
    warmup: int = option(3, help="untimed calls first")
    compile_dense: bool = option(False, help="also time a torch.compile'd dense baseline (slow "
                                             "to compile)")
    seed: int = 0
    dtypes: tuple[torch.dtype, ...] = option(
        (torch.float32,), flags=("--dtypes", "--dtype"), parse=parse_dtypes,
        show=lambda dtypes: ",".join(dtype_name(d) for d in dtypes),
        help="comma-separated input and weight dtypes, each measured for dense and FFF alike: "
             + ", ".join(DTYPE_NAMES))
    dense_widths: tuple[int, ...] = option(DENSE_WIDTHS, parse=comma_list(positive_int),
                                           help="dense baseline widths; speedups are taken "
                                                "against the last")
    dense_bias: bool = option(False, help="dense linears with biases, as in a BERT FFN "
                                          "(crammedBERT has none)")

    def __post_init__(self) -> None:
        if not self.dtypes or not self.dense_widths:
            raise InputError("bench ff needs at least one dtype and one dense width")
        if min(self.dense_widths) < 1 or self.d_model < 1:
            raise InputError(f"dense widths and d_model must be positive, got "
                             f"{self.dense_widths} and {self.d_model}")

    @property
    def reference_width(self) -> int:
        """The dense width the speedups are taken against (the last of ``dense_widths``)."""
        return self.dense_widths[-1]


def _inputs(tokens: int, d_model: int, device: str, seed: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distinct LayerNorm-like rows (no aliasing of one row across the batch)."""
    gen = torch.Generator().manual_seed(seed + tokens)
    return torch.randn(tokens, d_model, generator=gen).to(device=device, dtype=dtype)


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(route margin on |logit|, relative output tolerance) for comparing with float64."""
    return (1e-4, 1e-4) if dtype in (torch.float32, torch.float64) else (3e-2, 2e-2)


def check_dense(variants: dict[str, Callable], x: torch.Tensor) -> float:
    """Max abs difference of every dense variant from ``nn.Linear``; raises if any disagrees."""
    rel = _tolerances(x.dtype)[1] * 10
    with torch.no_grad():
        expected = variants["nn.Linear"](x).float()
        worst = 0.0
        for name, fn in variants.items():
            err = (fn(x).float() - expected).abs().max().item()
            if not err <= rel * (1e-3 + expected.abs().max().item()):
                raise RunError(f"dense variant {name} disagrees with nn.Linear by {err}")
            worst = max(worst, err)
    return worst


def check_fff(layer: FFF, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """Compare the layer's kernel with the float64 reference on sampled rows, routes first.

    Rows whose reference path has a logit within a margin of 0 (``1e-4`` in fp32, ``3e-2`` in
    bf16/fp16) may legitimately route differently; they are excluded and counted. Raises when
    the rest disagree.
    """
    margin, rel = _tolerances(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=gen)[:CHECK_ROWS].to(x.device)
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
        ref = fff_reference(x[rows], layer.linear_in.weight, layer.linear_in.bias,
                            layer.linear_out.weight, layer.n_trees, layer.depth)
    ambiguous = (ref.logits.abs() < margin).flatten(1).any(1)
    same = (nodes[rows] == ref.nodes).flatten(1).all(1)
    if bool((~same & ~ambiguous).any()):
        raise RunError(f"{layer.runtime.implementation}: routes differ from the reference")
    ok = same & ~ambiguous
    err = (y[rows][ok].double() - ref.y[ok].double()).abs().max().item() if ok.any() else 0.0
    scale = ref.y.abs().max().item()
    if not err <= rel * scale + 1e-7:  # relative to the output scale, which may be small
        raise RunError(f"{layer.runtime.implementation}: output differs by {err}")
    return {"check_rows": int(rows.numel()), "excluded_rows": int(ambiguous.sum()),
            "max_abs_err": err}


def _time(fn: Callable, x: torch.Tensor, s: BenchSettings) -> float:
    with torch.no_grad():
        samples = common.time_call(lambda: fn(x), warmup=s.warmup, repeats=s.repeats,
                                   device=s.device)
    return common.median(samples)


def _row(kind: str, config: str, impl: str, tokens: int, seconds: float, **extra) -> dict:
    return {"kind": kind, "config": config, "implementation": impl, "tokens": tokens,
            "median_s": seconds, "us_per_token": seconds / tokens * 1e6,
            "tokens_per_s": tokens / seconds, **extra}


def dense_config(width: int, bias: bool) -> str:
    """Row name of a dense baseline: ``dense-4095``, or ``dense-1536+bias`` with biases."""
    return f"dense-{width}{'+bias' if bias else ''}"


def bench_dense(s: BenchSettings) -> list[dict[str, Any]]:
    """Time every dense variant of every baseline width in every dtype at every token count."""
    rows = []
    for dtype in s.dtypes:
        for width in s.dense_widths:
            torch.manual_seed(s.seed)
            module = DenseFF(s.d_model, width, s.device, bias=s.dense_bias).to(dtype).eval()
            variants = dense_variants(module, s.compile_dense)
            config = dense_config(width, s.dense_bias)
            for tokens in s.tokens:
                x = _inputs(tokens, s.d_model, s.device, s.seed, dtype)
                err = check_dense(variants, x)
                for name, fn in variants.items():
                    seconds = _time(fn, x, s)
                    rows.append(_row("dense", config, name, tokens, seconds,
                                     dtype=dtype_name(dtype), max_abs_err=err))
                    logger.info("%s %s %s T=%d: %.3g s", config, dtype_name(dtype), name,
                                tokens, seconds)
    return rows


def fff_implementations(s: BenchSettings, dtype: torch.dtype) -> list[str]:
    """Implementations to time in ``dtype``: the requested ones that can run in it (an unknown
    name, or one that runs in none of the dtypes, is an error), else every one that can."""
    runnable = [n for n, reason in dispatch.explain(s.device, dtype) if reason is None]
    if not s.implementations:
        return runnable
    for name in s.implementations:
        if not any(name in [n for n, r in dispatch.explain(s.device, d) if r is None]
                   for d in s.dtypes):
            dispatch.select(name, s.device, dtype)  # raises, naming the reason
    skipped = [n for n in s.implementations if n not in runnable]
    if skipped:
        logger.warning("%s cannot run in %s here: not timed in that dtype", skipped,
                       dtype_name(dtype))
    return [n for n in s.implementations if n in runnable]


def bench_fff(s: BenchSettings) -> list[dict[str, Any]]:
    """Time every FFF config with every implementation in every dtype at every token count
    (checked first). The bf16 rows run the public FFF layer on bf16 weights and inputs."""
    rows = []
    for dtype in s.dtypes:
        for config in s.configs:
            n_trees, depth = parse_config(config)
            torch.manual_seed(s.seed)
            layer = FFF(s.d_model, n_trees=n_trees, depth=depth, device=s.device)
            layer = layer.to(dtype).eval()
            for impl in fff_implementations(s, dtype):
                layer.set_runtime(impl)
                for tokens in s.tokens:
                    x = _inputs(tokens, s.d_model, s.device, s.seed, dtype)
                    check = check_fff(layer, x, s.seed)
                    seconds = _time(layer, x, s)
                    rows.append(_row("fff", config, impl, tokens, seconds,
                                     dtype=dtype_name(dtype), **check))
                    logger.info("fff %s %s %s T=%d: %.3g s", config, dtype_name(dtype), impl,
                                tokens, seconds)
    return rows


def add_speedups(rows: list[dict[str, Any]], reference: str = "dense-4095") -> None:
    """Speedups of every row against the ``reference`` dense config at the same token count:

    - ``speedup_vs_torch_dense``: against its ``nn.Linear`` form in the row's dtype;
    - ``speedup_vs_fastest_dense``: against its fastest form in the row's dtype;
    - ``speedup_vs_fastest_dense_any_dtype``: against its fastest form in any dtype measured
      (``fastest_dense_any_dtype`` names it, e.g. ``bfloat16 onednn-packed``).
    """
    ref = [r for r in rows if r["kind"] == "dense" and r["config"] == reference]
    if not ref:
        raise RunError(f"no {reference} rows to take speedups against")
    torch_dense = {(r["dtype"], r["tokens"]): r["median_s"] for r in ref
                   if r["implementation"] == "nn.Linear"}
    fastest: dict[tuple[str, int], float] = {}
    overall: dict[int, dict[str, Any]] = {}
    for r in ref:
        key = (r["dtype"], r["tokens"])
        fastest[key] = min(fastest.get(key, float("inf")), r["median_s"])
        if r["tokens"] not in overall or r["median_s"] < overall[r["tokens"]]["median_s"]:
            overall[r["tokens"]] = r
    for r in rows:
        key, best = (r["dtype"], r["tokens"]), overall[r["tokens"]]
        r["reference_dense"] = reference
        r["speedup_vs_torch_dense"] = torch_dense[key] / r["median_s"]
        r["speedup_vs_fastest_dense"] = fastest[key] / r["median_s"]
        r["speedup_vs_fastest_dense_any_dtype"] = best["median_s"] / r["median_s"]
        r["fastest_dense_any_dtype"] = f"{best['dtype']} {best['implementation']}"


def fastest_dense(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest form of each dense config per dtype and token count (the summary table)."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["config"], r["dtype"], r["tokens"])
        if r["kind"] == "dense" and (key not in best or r["median_s"] < best[key]["median_s"]):
            best[key] = r
    return list(best.values())


def bench_train(s: BenchSettings, config: str = "1x11") -> list[dict[str, Any]]:
    """Forward+backward: sparse FFF vs the original masked form vs dense-4095 (checked first)."""
    n_trees, depth = parse_config(config)
    torch.manual_seed(s.seed)
    layer = FFF(s.d_model, n_trees=n_trees, depth=depth, device=s.device)
    dense = DenseFF(s.d_model, 4095, s.device)  # training stays fp32 against crammedBERT-4095
    params = (layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight)
    rows = []
    for tokens in s.tokens:
        x = _inputs(tokens, s.d_model, s.device, s.seed).requires_grad_()
        err = check_train_grads(x, params, n_trees, depth, route(x, *params[:2], n_trees, depth))
        runs = {
            "fff-sparse": lambda x=x: _step(fff_sparse(x, *params, n_trees, depth), x, params),
            "fff-masked": lambda x=x: _step(fff_masked(x, *params, n_trees, depth), x, params),
            "dense-4095 nn.Linear": lambda x=x: _step(dense(x), x, tuple(dense.parameters())),
        }
        for name, fn in runs.items():
            samples = common.time_call(fn, warmup=1, repeats=max(3, s.repeats // 3),
                                       device=s.device)
            rows.append(_row("train", config if name.startswith("fff") else "dense-4095",
                             name, tokens, common.median(samples), max_grad_err=err))
    _add_train_speedups(rows)
    return rows


def _step(y: torch.Tensor, x: torch.Tensor, params: tuple) -> None:
    grads = torch.autograd.grad(y.square().sum(), (x, *params))
    del grads


def check_train_grads(x: torch.Tensor, params: tuple, n_trees: int, depth: int,
                      routed: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Max abs gradient difference sparse vs masked; raises when they disagree."""
    inputs = (x, *params)
    g_sparse = torch.autograd.grad(fff_sparse(x, *params, n_trees, depth, routed).square().sum(),
                                   inputs)
    g_masked = torch.autograd.grad(fff_masked(x, *params, n_trees, depth).square().sum(), inputs)
    worst = 0.0
    for a, b in zip(g_sparse, g_masked, strict=True):
        err = (a - b).abs().max().item()
        if not err <= 1e-3 * (1 + b.abs().max().item()):
            raise RunError(f"sparse and masked gradients differ by {err}")
        worst = max(worst, err)
    return worst


def _add_train_speedups(rows: list[dict[str, Any]]) -> None:
    masked = {r["tokens"]: r["median_s"] for r in rows if r["implementation"] == "fff-masked"}
    dense = {r["tokens"]: r["median_s"] for r in rows if r["implementation"].startswith("dense")}
    for r in rows:
        r["speedup_vs_masked"] = masked[r["tokens"]] / r["median_s"]
        r["speedup_vs_dense4095"] = dense[r["tokens"]] / r["median_s"]


TABLE_COLUMNS = ("config", "dtype", "implementation", "tokens", "us_per_token", "tokens_per_s",
                 "speedup_vs_torch_dense", "speedup_vs_fastest_dense",
                 "speedup_vs_fastest_dense_any_dtype")
FASTEST_COLUMNS = ("config", "dtype", "tokens", "implementation", "us_per_token")
TRAIN_COLUMNS = ("config", "implementation", "tokens", "median_s", "speedup_vs_masked",
                 "speedup_vs_dense4095")


def run(s: BenchSettings, out_dir: str | Path | None, train: bool = False) -> dict[str, Any]:
    """Run the inference table (and the training table) and write results; returns them."""
    env = common.environment(s.device, dtypes=[dtype_name(d) for d in s.dtypes])
    reference = dense_config(s.reference_width, s.dense_bias)
    env.update(d_model=s.d_model, dense_widths=list(s.dense_widths), dense_bias=s.dense_bias,
               reference_dense=reference, loadavg_before=common.loadavg())
    rows = bench_dense(s) + bench_fff(s)
    add_speedups(rows, reference)
    env["loadavg_after"] = common.loadavg()
    result: dict[str, Any] = {"environment": env, "rows": rows,
                              "table": common.format_table(rows, TABLE_COLUMNS),
                              "fastest_dense_table": common.format_table(fastest_dense(rows),
                                                                         FASTEST_COLUMNS)}
    if train:
        train_rows = bench_train(s)
        result["train_rows"] = train_rows
        result["train_table"] = common.format_table(train_rows, TRAIN_COLUMNS)
    if out_dir is not None:
        result["files"] = _write(out_dir, result)
    return result


def _write(out_dir: str | Path, result: dict[str, Any]) -> list[Path]:
    files = common.write_results(out_dir, "bench_ff", result["rows"], result["environment"])
    if "train_rows" in result:
        files += common.write_results(out_dir, "bench_ff_train", result["train_rows"],
                                      result["environment"])
    series = {}
    for r in result["rows"]:
        if r["kind"] == "fff":
            label = f"{r['config']} {r['dtype']} ({r['implementation']})"
            xs, ys = series.setdefault(label, ([], []))
            xs.append(r["tokens"])
            ys.append(r["speedup_vs_fastest_dense_any_dtype"])
    reference = result["environment"]["reference_dense"]
    try:
        files.append(common.plot_lines(Path(out_dir) / "bench_ff.png", series, xlabel="tokens",
                                       ylabel=f"speedup vs fastest {reference} (any dtype)",
                                       title="FFF vs dense feed-forward (same process)"))
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install ultrafastbert[bench])")
    return files
