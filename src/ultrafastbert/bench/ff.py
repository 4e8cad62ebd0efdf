"""``ultrafastbert bench ff``: the paper's Table 2, done honestly.

In one process: dense feed-forward baselines (crammedBERT-3072/-4095: 768->W->768, GELU, no
biases) as torch runs them and the fastest dense variant available, against FFF configs with
every available implementation. Every output is checked (dense variants against each other, FFF
against the float64 reference on sampled rows, routes first) before anything is timed.
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
from ..fff.training import fff_masked, fff_sparse, route
from ..model.linear import InferenceLinear, packed_linear_unavailable
from . import common

logger = logging.getLogger(__name__)

PAPER_CONFIGS = ("3072x0", "1536x1", "512x2", "256x3", "128x4", "64x5", "32x6", "16x7", "8x8",
                 "4x9", "2x10", "1x11")
DENSE_WIDTHS = (3072, 4095)
DEFAULT_TOKENS = (1, 8, 128, 512, 4096, 16384)
CHECK_ROWS = 256


def parse_config(name: str) -> tuple[int, int]:
    """``"KxD"`` -> ``(n_trees, depth)``; raises ``ValueError`` naming the bad value."""
    match = re.fullmatch(r"(\d+)x(\d+)", name.strip())
    if not match:
        raise InputError(f"FFF config must look like KxD (e.g. 1x11), got {name!r}")
    return int(match.group(1)), int(match.group(2))


class DenseFF(nn.Module):
    """crammedBERT-W baseline as UltraFastBERT defines it: Linear(d, W) -> GELU -> Linear(W, d)."""

    def __init__(self, d_model: int, width: int, device: str = "cpu"):
        super().__init__()
        self.linear_in = nn.Linear(d_model, width, bias=False, device=device)
        self.linear_out = nn.Linear(width, d_model, bias=False, device=device)
        nn.init.normal_(self.linear_in.weight, std=0.02)
        nn.init.normal_(self.linear_out.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, d)`` -> ``(T, d)``."""
        return self.linear_out(F.gelu(self.linear_in(x)))


def dense_variants(module: DenseFF, compile_dense: bool) -> dict[str, Callable]:
    """Ways to run the same dense FF; the benchmark keeps the fastest per token count."""
    w1t = module.linear_in.weight.t().contiguous()
    w2t = module.linear_out.weight.t().contiguous()

    def matmul_pretransposed(x: torch.Tensor) -> torch.Tensor:
        hidden = torch.mm(x, w1t)
        return torch.mm(F.gelu(hidden), w2t)

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


@dataclass
class BenchSettings:
    """Run-time settings of one benchmark invocation."""

    device: str = "cpu"
    d_model: int = 768
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    configs: tuple[str, ...] = PAPER_CONFIGS
    implementations: tuple[str, ...] = ()
    repeats: int = 15
    warmup: int = 3
    compile_dense: bool = False
    seed: int = 0
    dtype: torch.dtype = torch.float32


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


def bench_dense(s: BenchSettings) -> list[dict[str, Any]]:
    """Time every dense variant of every baseline width at every token count."""
    rows = []
    for width in DENSE_WIDTHS:
        module = DenseFF(s.d_model, width, s.device).to(s.dtype).eval()
        variants = dense_variants(module, s.compile_dense)
        for tokens in s.tokens:
            x = _inputs(tokens, s.d_model, s.device, s.seed, s.dtype)
            err = check_dense(variants, x)
            for name, fn in variants.items():
                seconds = _time(fn, x, s)
                rows.append(_row("dense", f"dense-{width}", name, tokens, seconds,
                                 max_abs_err=err))
                logger.info("dense-%d %s T=%d: %.3g s", width, name, tokens, seconds)
    return rows


def fff_implementations(s: BenchSettings) -> list[str]:
    """Implementations to time: the requested ones, else every one that can run here."""
    if s.implementations:
        return list(s.implementations)
    return [n for n, reason in dispatch.explain(s.device, s.dtype) if reason is None]


def bench_fff(s: BenchSettings) -> list[dict[str, Any]]:
    """Time every FFF config with every implementation at every token count (checked first)."""
    rows = []
    for config in s.configs:
        n_trees, depth = parse_config(config)
        torch.manual_seed(s.seed)
        layer = FFF(s.d_model, n_trees=n_trees, depth=depth, device=s.device).to(s.dtype).eval()
        for impl in fff_implementations(s):
            layer.set_runtime(impl)
            for tokens in s.tokens:
                x = _inputs(tokens, s.d_model, s.device, s.seed, s.dtype)
                check = check_fff(layer, x, s.seed)
                seconds = _time(layer, x, s)
                rows.append(_row("fff", config, impl, tokens, seconds, **check))
                logger.info("fff %s %s T=%d: %.3g s", config, impl, tokens, seconds)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Add speedups vs torch's ``nn.Linear`` dense-4095 and vs the fastest dense-4095."""
    torch_dense = {r["tokens"]: r["median_s"] for r in rows
                   if r["config"] == "dense-4095" and r["implementation"] == "nn.Linear"}
    fastest: dict[int, float] = {}
    for r in rows:
        if r["config"] == "dense-4095":
            fastest[r["tokens"]] = min(fastest.get(r["tokens"], float("inf")), r["median_s"])
    for r in rows:
        r["speedup_vs_torch_dense4095"] = torch_dense[r["tokens"]] / r["median_s"]
        r["speedup_vs_fastest_dense4095"] = fastest[r["tokens"]] / r["median_s"]


def bench_train(s: BenchSettings, config: str = "1x11") -> list[dict[str, Any]]:
    """Forward+backward: sparse FFF vs the original masked form vs dense-4095 (checked first)."""
    n_trees, depth = parse_config(config)
    torch.manual_seed(s.seed)
    layer = FFF(s.d_model, n_trees=n_trees, depth=depth, device=s.device)
    dense = DenseFF(s.d_model, 4095, s.device)
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


TABLE_COLUMNS = ("config", "implementation", "tokens", "us_per_token", "tokens_per_s",
                 "speedup_vs_torch_dense4095", "speedup_vs_fastest_dense4095")
TRAIN_COLUMNS = ("config", "implementation", "tokens", "median_s", "speedup_vs_masked",
                 "speedup_vs_dense4095")


def run(s: BenchSettings, out_dir: str | Path | None, train: bool = False) -> dict[str, Any]:
    """Run the inference table (and the training table) and write results; returns them."""
    env = common.environment(s.device)
    env.update(dtype=str(s.dtype).replace("torch.", ""), d_model=s.d_model)
    rows = bench_dense(s) + bench_fff(s)
    add_speedups(rows)
    result: dict[str, Any] = {"environment": env, "rows": rows,
                              "table": common.format_table(rows, TABLE_COLUMNS)}
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
            xs, ys = series.setdefault(f"{r['config']} ({r['implementation']})", ([], []))
            xs.append(r["tokens"])
            ys.append(r["speedup_vs_fastest_dense4095"])
    try:
        files.append(common.plot_lines(Path(out_dir) / "bench_ff.png", series, xlabel="tokens",
                                       ylabel="speedup vs fastest dense-4095 FF",
                                       title="FFF vs dense feed-forward (same process)"))
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install ultrafastbert[bench])")
    return files
