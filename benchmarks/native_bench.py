"""Per-token latency of the native FFF kernel vs a dense nn.Linear FF, in one process.

Run: .venv/bin/python benchmarks/native_bench.py [--threads 2] [--format fp32] [--json out.json]

For each token count: median µs/token of the dense-4095 FF (768->4095->768, exact GELU, no
biases, ``nn.Linear``), of the native kernel called directly (``kernel.forward``; also its best
round), and of ``FFF.eval()`` layer calls under ``torch.no_grad()``, with the speedups over dense.
The output is checked against the reference before anything is timed. Each round times dense,
kernel and layer back to back; a round's figure is the median of its calls; the table gives the
median over rounds, and the speedup is the median of the per-round ratios (on a shared machine a
load spike tends to hit both sides of one round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ultrafastbert import FFF
from ultrafastbert.bench.common import environment, speed_summary
from ultrafastbert.fff.native.kernel import NativeCPUKernel
from ultrafastbert.fff.reference import fff_reference

TOKENS = (1, 8, 128, 512, 4096, 16384)
D_MODEL, TREES, DEPTH, DENSE_WIDTH = 768, 1, 11, 4095


def median_call_s(fn: Callable[[], object], calls: int) -> float:
    """Median seconds per call of ``fn`` over ``calls`` calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_output(layer: FFF, kernel: NativeCPUKernel, packed, x: torch.Tensor,
                 weight_format: str) -> None:
    """The kernel and the layer agree with the reference on the first tokens (fp32 only)."""
    head = x[:64].contiguous()
    ref = fff_reference(head, layer.linear_in.weight, layer.linear_in.bias,
                        layer.linear_out.weight, TREES, DEPTH)
    y, nodes = kernel.forward(head, packed, TREES, DEPTH, return_nodes=True)
    if weight_format != "bf16":
        assert torch.equal(nodes, ref.nodes), "routes differ from the reference"
    if weight_format == "fp32":
        torch.testing.assert_close(y, ref.y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer(head), ref.y, rtol=1e-4, atol=1e-5)


def bench_tokens(tokens: int, timed: dict[str, Callable[[torch.Tensor], object]],
                 rounds: int) -> dict[str, list[float]]:
    """Per round, the median µs/token of each function in ``timed`` on ``tokens`` inputs."""
    x = F.layer_norm(torch.randn(tokens, D_MODEL), (D_MODEL,))
    calls = {name: max(2, min(1000, (1_000 if name == "dense" else 100_000) // tokens))
             for name in timed}
    for name, fn in timed.items():  # warm-up
        median_call_s(lambda fn=fn: fn(x), max(1, calls[name] // 5))
    rounds_s: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            rounds_s[name].append(median_call_s(lambda fn=fn: fn(x), calls[name]))
    return {name: [t / tokens * 1e6 for t in s] for name, s in rounds_s.items()}


def summarise(tokens: int, us: dict[str, list[float]]) -> dict[str, float]:
    """Medians over rounds, the median of the per-round speedups (dense and FFF timed seconds
    apart, so a load spike from another process tends to hit both), and the best round."""
    row: dict[str, float] = {"tokens": tokens}
    for name, values in us.items():
        row[f"{name}_us_per_token"] = statistics.median(values)
        row[f"{name}_best_us_per_token"] = min(values)
    for name in ("kernel", "layer"):
        row[f"speedup_{name}"] = statistics.median(
            d / f for d, f in zip(us["dense"], us[name], strict=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="fp32", choices=("fp32", "bf16", "bf16-out"))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense_in = torch.nn.Linear(D_MODEL, DENSE_WIDTH, bias=False)
    dense_out = torch.nn.Linear(DENSE_WIDTH, D_MODEL, bias=False)
    layer = FFF(D_MODEL, n_trees=TREES, depth=DEPTH).eval()
    layer.set_runtime("native", args.format)
    kernel = NativeCPUKernel()
    assert kernel.unavailable_reason(torch.device("cpu"), torch.float32) is None
    packed = kernel.pack(layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight,
                         TREES, DEPTH, args.format)
    check_output(layer, kernel, packed, torch.randn(64, D_MODEL), args.format)
    timed = {"dense": lambda x: dense_out(F.gelu(dense_in(x))),
             "kernel": lambda x: kernel.forward(x, packed, TREES, DEPTH),
             "layer": layer}
    env = {**environment("cpu", dtypes=["float32"]), "threads": args.threads,
           "format": args.format, "isa": kernel.isa, "load_avg": os.getloadavg()}
    print(speed_summary(env))
    print(" ".join(f"{k}={env[k]}" for k in ("threads", "format", "isa", "load_avg")))
    print(f"{'tokens':>7} {'dense us/tok':>13} {'kernel us/tok':>14} {'(best)':>7} "
          f"{'layer us/tok':>13} {'x kernel':>9} {'x layer':>8}")
    rows = []
    with torch.no_grad():
        for tokens in map(int, args.tokens.split(",")):
            row = summarise(tokens, bench_tokens(tokens, timed, args.rounds))
            rows.append(row)
            print(f"{tokens:7d} {row['dense_us_per_token']:13.2f} "
                  f"{row['kernel_us_per_token']:14.3f} {row['kernel_best_us_per_token']:7.3f} "
                  f"{row['layer_us_per_token']:13.3f} {row['speedup_kernel']:9.1f} "
                  f"{row['speedup_layer']:8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"env": {**env, "load_avg_end": os.getloadavg()}, "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
