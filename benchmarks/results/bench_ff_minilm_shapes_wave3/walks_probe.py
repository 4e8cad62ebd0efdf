"""Per-token thread CPU time (1 thread) of the native kernel's walks with fixed knobs beside the
dense FFN (384->1536->384 with biases, prepacked oneDNN), d=384: min over 9 rounds of ~20 ms each.

Run from the repository root: ``python .../walks_probe.py 1 8x7,32x5,12x5,16x6``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ultrafastbert.bench.ff import DenseFF, _packed_variant
from ultrafastbert.fff.native import NativeCPUKernel, tuning

D_MODEL = 384
#: "base": the pre-wave-3 defaults (unsorted tree-major blocks of 64 tokens, 8 at a time).
VARIANTS = {"base": {"sort": 0, "split": 0, "block": 64},
            "sort64": {"sort": 1, "split": 0, "block": 64},
            "sort256": {"sort": 1, "split": 0, "block": 256},
            "split64": {"split": 1, "sort": 0, "block": 64},
            "split256": {"split": 1, "sort": 0, "block": 256},
            "split4k": {"split": 1, "sort": 0, "block": 4096}}


def cpu_times(fns: dict[str, Callable], x: torch.Tensor, rounds: int = 9,
              budget: float = 0.02) -> dict[str, float]:
    """Fewest thread-CPU seconds per call of each function over ``rounds`` rounds."""
    res: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f(x)
    for _ in range(rounds):
        for k, f in fns.items():
            n, t = 0, time.thread_time()
            while True:
                f(x)
                n += 1
                e = time.thread_time() - t
                if e > budget:
                    break
            res[k].append(e / n)
    return {k: min(v) for k, v in res.items()}


def run(kernel: NativeCPUKernel, packed: object, n_trees: int, depth: int,
        x: torch.Tensor) -> torch.Tensor:
    """The kernel's output for ``x``."""
    return kernel.forward(x, packed, n_trees, depth)[0]  # type: ignore[arg-type]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]))
    dense = _packed_variant(DenseFF(D_MODEL, 1536, bias=True))
    kernel = NativeCPUKernel(tune=False)
    for config in sys.argv[2].split(","):
        n_trees, depth = map(int, config.split("x"))
        rows = n_trees * ((2 << depth) - 1)
        packed = kernel.pack(torch.randn(rows, D_MODEL) / D_MODEL**0.5, torch.randn(rows) * 0.1,
                             torch.randn(D_MODEL, rows) / D_MODEL**0.5, n_trees, depth, "fp32")
        for tokens in (128, 4096):
            x = F.layer_norm(torch.randn(tokens, D_MODEL), (D_MODEL,))
            fns: dict[str, Callable] = {"dense": dense}
            for name, over in VARIANTS.items():
                row = {**tuning.default_row(2, n_trees), **over, "min_tokens": 0}
                p = dataclasses.replace(packed, knobs=tuning.to_table([row]))
                fns[name] = functools.partial(run, kernel, p, n_trees, depth)
            r = cpu_times(fns, x)
            print(f"{config} T={tokens}: " + "  ".join(
                f"{n} {v / tokens * 1e6:.3f}us ({r['dense'] / v:.1f}x)" for n, v in r.items()),
                flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
