"""Would the shallow levels of all trees be cheaper as one dense GEMM than walked? (issue 21)

    PYTHONPATH=src .venv/bin/python benchmarks/top_levels_gemm.py --out benchmarks/results/top_levels_gemm

Every token visits every tree's root, half of level 1's nodes, a quarter of level 2's..., so the
first L levels of K trees could be computed for all their ``K (2^L - 1)`` nodes at the GEMM's
rate (logits ``X W_top^T + b``, GELU, then ``act W_out_top`` with zero activations off the
token's path) and the walk could start at level L. This measures the best such a hybrid could
do, on one thread (thread CPU time, fewest of 7 samples of >= 50 ms; the native kernel with the
fixed defaults for many tokens, sorted tree-major walk):

- ``walk_full``: the K x D walk, all D+1 levels;
- ``walk_top``: the walk of a K x (L-1) tree (levels 0..L-1 only, routing and output);
- ``gemm_top``: the two GEMMs and the GELU for those levels' ``K (2^L - 1)`` rows (torch,
  oneDNN), without the masking a real hybrid also needs;
- ``bound``: walk_full / (walk_full - walk_top + gemm_top), an upper bound on the hybrid's
  speedup (it ignores the cost of starting the walk midway and of the masking).

Results: ``top_levels_gemm.json`` (rows + environment), ``.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ultrafastbert.bench import common
from ultrafastbert.fff.native import tuning
from ultrafastbert.fff.native.kernel import NativeCPUKernel, NativePacked

D_MODEL = 384
COLUMNS = ("config", "tokens", "levels", "rows", "walk_full_us", "walk_top_us", "gemm_top_us",
           "bound")


def thread_seconds(fn: Callable[[], object], samples: int = 7, budget: float = 0.05) -> float:
    """Fewest thread-CPU seconds per call of ``fn`` over ``samples`` samples of ~``budget``."""
    return min(common.time_round(lambda _: fn(), None, budget, "thread") for _ in range(samples))


def packed_walk(kernel: NativeCPUKernel, n_trees: int, depth: int) -> NativePacked:
    """Random fp32 weights of a K x D FFF, packed with the many-token fixed defaults."""
    rows = n_trees * ((2 << depth) - 1)
    packed = kernel.pack(torch.randn(rows, D_MODEL) / D_MODEL**0.5, torch.randn(rows) * 0.1,
                         torch.randn(D_MODEL, rows) / D_MODEL**0.5, n_trees, depth, "fp32")
    row = {**tuning.default_row(2, n_trees), "min_tokens": 0}
    return dataclasses.replace(packed, knobs=tuning.to_table([row]))


def gemm_seconds(x: torch.Tensor, rows: int) -> float:
    """Thread seconds of logits -> GELU -> output for ``rows`` node rows, all tokens."""
    w_in, b_in, w_out = torch.randn(rows, D_MODEL), torch.randn(rows), torch.randn(rows, D_MODEL)
    return thread_seconds(lambda: F.gelu(torch.addmm(b_in, x, w_in.t())) @ w_out)


def measure(kernel: NativeCPUKernel, config: str, tokens: int) -> list[dict[str, object]]:
    """One row per number of top levels (1-3) for ``config`` ("KxD") at ``tokens`` tokens."""
    n_trees, depth = map(int, config.split("x"))
    x = F.layer_norm(torch.randn(tokens, D_MODEL), (D_MODEL,))
    full = packed_walk(kernel, n_trees, depth)
    t_full = thread_seconds(lambda: kernel.forward(x, full, n_trees, depth))
    rows = []
    for levels in (1, 2, 3):
        top = packed_walk(kernel, n_trees, levels - 1)
        t_top = thread_seconds(functools.partial(kernel.forward, x, top, n_trees, levels - 1))
        t_gemm = gemm_seconds(x, n_trees * ((1 << levels) - 1))
        us = 1e6 / tokens
        rows.append({"config": config, "tokens": tokens, "levels": levels,
                     "rows": n_trees * ((1 << levels) - 1), "walk_full_us": t_full * us,
                     "walk_top_us": t_top * us, "gemm_top_us": t_gemm * us,
                     "bound": t_full / (t_full - t_top + t_gemm)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="8x7,32x5")
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/top_levels_gemm"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kernel = NativeCPUKernel(tune=False)
    reason = kernel.unavailable_reason(torch.device("cpu"), torch.float32)
    if reason is not None:
        print(f"the native kernel cannot run here: {reason}", file=sys.stderr)
        return 2
    env = {**common.environment(), "load_before": common.loadavg()}
    with torch.no_grad():
        rows = [r for c in args.configs.split(",") for t in map(int, args.tokens.split(","))
                for r in measure(kernel, c, t)]
    env["load_after"] = common.loadavg()
    text = ("# Shallow levels as one GEMM: upper bound on the gain (1 thread, d=384)\n\n"
            f"{common.format_table(rows, COLUMNS)}\n\nCPU: {env.get('cpu')}; load "
            f"{env['load_before']} -> {env['load_after']}; µs per token, thread CPU time.\n")
    common.write_report(args.out, "top_levels_gemm", rows, env, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
