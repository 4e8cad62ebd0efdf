"""FFF kernels per configuration and token count against the dense FFN of the same width.

Run (clean figures need a quiet machine; under load use --threads 1 and read the ratios):

    .venv/bin/python benchmarks/kernel_bench.py --d-model 384 --configs 1x10,4x8,8x7,32x5,16x6 \
        --tokens 1,32,128,4096 --threads 1 --old-rev 6320fe5 --json out384.json
    .venv/bin/python benchmarks/kernel_bench.py --d-model 768 --configs 1x11,8x8,32x6 ...

Per (config, tokens): median µs/token of the dense FFN (d=384: 384->1536->384 with GELU and
biases, as all-MiniLM-L6-v2; d=768: crammedBERT-4095, 768->4095->768, no biases) as nn.Linear
(``dense``) and on prepacked oneDNN GEMMs (``dense-packed``), the native kernel with its
autotuned knobs (``native``) and with the fixed defaults (``native-fixed``), for several trees
each walk with fixed knobs (:data:`WALKS`: ``native-sort``, ``native-split``...), the torch path,
the depth-0 GEMM route, what ``auto`` picks, and with ``--old-rev`` the native kernel built from
that git revision (ops renamed, same process). Each kernel's output is checked against the
float64 reference before timing (routes, then values); the old build must give the same bits as
the new one. Each round times every variant back to back; the table gives medians over rounds
and the speedup is the median of per-round ratios against the round's fastest dense variant. CPU model and flags, threads and
the load average are recorded in the JSON (bench.common.environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ultrafastbert.bench.common import environment
from ultrafastbert.bench.ff import DenseFF, _packed_variant
from ultrafastbert.fff import dispatch
from ultrafastbert.fff.gemm.kernel import GemmKernel
from ultrafastbert.fff.native import build, tuning
from ultrafastbert.fff.native.kernel import NativeCPUKernel
from ultrafastbert.fff.pytorch.kernel import TorchKernel
from ultrafastbert.fff.reference import fff_reference
from ultrafastbert.fff.tree import n_nodes

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = "src/ultrafastbert/fff/native"


def run_record() -> dict[str, object]:
    """bench.common's environment (CPU model, speed flags, cores, versions), the kernel's ISA
    and the load average."""
    return {**environment("cpu"), "isa": build.cpu_isa(), "load_avg": os.getloadavg()}


def build_old(rev: str) -> Callable[..., torch.Tensor]:
    """The native op of git revision ``rev`` (sources renamed so both libraries can load)."""
    tmp = Path(tempfile.mkdtemp(prefix="fff-old-"))
    for name in ("fff_cpu.cpp", "fff_cpu_walk.h"):
        text = subprocess.run(["git", "show", f"{rev}:{NATIVE_DIR}/{name}"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
        text = text.replace("fff_cpu_forward", "fff_old_forward").replace('"fff_cpu_isa', '"fff_old_isa')
        text = re.sub(r"TORCH_LIBRARY_FRAGMENT\(ultrafastbert\b", "TORCH_LIBRARY_FRAGMENT(ufb_old",
                      text)
        text = re.sub(r"\b(avx512|avx2)::", r"old_\1::", text)
        text = re.sub(r"namespace (avx512|avx2)\b", r"namespace old_\1", text)
        (tmp / name).write_text(text)
    from torch.utils import cpp_extension

    cpp_extension.load(name="fff_old", sources=[str(tmp / "fff_cpu.cpp")],
                       extra_cflags=build._compile_flags(), extra_ldflags=build._openmp_flags(),
                       build_directory=str(tmp), is_python_module=False, verbose=False)
    return torch.ops.ufb_old.fff_old_forward.default


def dense_ffns(d: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The dense FFN a user would compare with at this width (d=384: 384->1536->384 with
    biases; else d->4095->d without), as nn.Linear (``dense``) and on prepacked oneDNN GEMMs
    as the encoder runs it in inference (``dense-packed``, bench.ff's ``onednn-packed``)."""
    module = DenseFF(d, 1536, bias=True) if d == 384 else DenseFF(d, 4095, bias=False)
    return {"dense": module, "dense-packed": _packed_variant(module)}


#: Fixed knob tables timed beside the tuned kernel, one per walk for several trees (the knob
#: values over the defaults; see fff/native/tuning.py).
WALKS: dict[str, dict[str, int]] = {
    "native-sort": {"sort": 1, "block": 256},
    "native-split": {"split": 1, "block": 0},
    "native-split256": {"split": 1, "block": 256},
}


def variants(n_trees: int, depth: int, d: int, old: Callable | None
             ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], tuple]:
    """The timed functions for one configuration, and its checkpoint-layout weights."""
    gen = torch.Generator().manual_seed(n_trees * 100 + depth)
    rows = n_trees * n_nodes(depth)
    weights = (torch.randn(rows, d, generator=gen) * 0.02, torch.randn(rows, generator=gen) * 0.05,
               torch.randn(d, rows, generator=gen) * 0.02)
    fns: dict[str, Callable] = dict(dense_ffns(d))
    tuned, fixed = NativeCPUKernel(), NativeCPUKernel(tune=False)
    assert tuned.unavailable_reason(torch.device("cpu"), torch.float32) is None
    for name, kernel in (("native", tuned), ("native-fixed", fixed), ("torch", TorchKernel()),
                         ("gemm", GemmKernel()),
                         ("auto", dispatch.select("auto", "cpu", torch.float32,
                                                  shape=dispatch.Workload(n_trees, depth, d)))):
        if kernel.shape_reason(n_trees, depth) is not None:
            continue
        packed = kernel.pack(*weights, n_trees, depth, "fp32")
        fns[name] = lambda x, k=kernel, p=packed: k.forward(x, p, n_trees, depth)[0]
    if n_trees > 1:
        base = fixed.pack(*weights, n_trees, depth, "fp32")
        for name, knobs in WALKS.items():
            rows = [{**tuning.default_row(lo, n_trees), **(knobs if lo > 1 else {})}
                    for lo, _ in tuning.TOKEN_CLASSES]
            p = dataclasses.replace(base, knobs=tuning.to_table(rows))
            fns[name] = lambda x, p=p: fixed.forward(x, p, n_trees, depth)[0]
    if old is not None:
        p = fixed.pack(*weights, n_trees, depth, "fp32")
        fns["native-old"] = lambda x: old(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                          fixed._isa_code)
    return fns, weights


def check(fns: dict, weights: tuple, n_trees: int, depth: int, d: int) -> None:
    """Every FFF variant against the float64 reference on 64 tokens; old and new native: same
    bits."""
    x = F.layer_norm(torch.randn(64, d, generator=torch.Generator().manual_seed(7)), (d,))
    ref = fff_reference(x, *weights, n_trees, depth)
    for name, fn in fns.items():
        if not name.startswith("dense"):
            torch.testing.assert_close(fn(x), ref.y, rtol=1e-4, atol=1e-5, msg=name)
    if "native-old" in fns:
        assert torch.equal(fns["native-old"](x), fns["native"](x)), "old and new native differ"


def time_round(fn: Callable, x: torch.Tensor, budget_s: float) -> float:
    """Median seconds per call over ~``budget_s`` of calls (at least 3)."""
    fn(x)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(config: str, d: int, tokens: list[int], rounds: int, budget_s: float,
          old: Callable | None) -> list[dict]:
    """Rows for one configuration."""
    n_trees, depth = map(int, config.split("x"))
    fns, weights = variants(n_trees, depth, d, old)
    check(fns, weights, n_trees, depth, d)
    out = []
    for t in tokens:
        x = F.layer_norm(torch.randn(t, d), (d,))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(time_round(fn, x, budget_s) / t * 1e6)
        row: dict[str, object] = {"config": config, "d_model": d, "tokens": t}
        # Speedups against the fastest dense variant of each round.
        fastest = [min(v) for v in zip(*(s for n, s in samples.items() if n.startswith("dense")),
                                       strict=True)]
        for name, s in samples.items():
            row[f"{name}_us_per_token"] = round(statistics.median(s), 4)
            if not name.startswith("dense"):
                row[f"{name}_speedup"] = round(statistics.median(
                    a / b for a, b in zip(fastest, s, strict=True)), 2)
        if "native-old" in samples:
            row["native_vs_old"] = round(statistics.median(
                a / b for a, b in zip(samples["native-old"], samples["native"], strict=True)), 3)
        out.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--configs", default="1x10,4x8,8x7,32x5,16x6")
    parser.add_argument("--tokens", default="1,32,128,4096")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=0.05,
                        help="seconds of calls per variant and round")
    parser.add_argument("--old-rev", default=None,
                        help="git revision whose native kernel is timed beside this one")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    old = build_old(args.old_rev) if args.old_rev else None
    env = {**run_record(), "threads": args.threads, "command": " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    with torch.no_grad():
        for config in args.configs.split(","):
            rows += bench(config, args.d_model, tokens, args.rounds, args.budget_s, old)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": {**env, "load_avg_end": os.getloadavg()},
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
