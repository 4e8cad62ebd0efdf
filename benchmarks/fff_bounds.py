#!/usr/bin/env python3
"""What bounds the FFF 1x11 fp32 layer (d=768) at 1 token and at many: call overhead, traffic.

At 1 token: the layer's call against the native op called directly, and the floors of any op
call (``torch.add`` of two (1, 768) tensors) and of any module call (``nn.Identity``). At 128 and
4,096 tokens: microseconds per token of the native op and the bandwidth it would need if every
one of a token's 24 rows (12 routing, 12 output; 3 KB each) came from memory, against the
streaming read rate of the layer's 25 MB of weights (``Tensor.sum``). Medians of 7 samples.

    .venv/bin/python benchmarks/fff_bounds.py --out benchmarks/results/fff_1x11_bounds
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from ultrafastbert.bench.common import environment
from ultrafastbert.fff import FFF
from ultrafastbert.utils.io import atomic_write_json


def med_us(fn, n, reps=7):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out)

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", type=Path, default=Path("benchmarks/results/fff_1x11_bounds"))
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
layer = FFF(768, n_trees=1, depth=11).eval()
layer.set_runtime("native")
r = {}
with torch.inference_mode():
    x1 = torch.randn(1, 768)
    layer(x1)
    kern, packed = layer._cache.lookup(layer._key(x1.dtype))[:2]
    op, isa = kern._forward, kern._isa_code

    def op_args(x: torch.Tensor) -> tuple:
        return (x, packed.w_in, packed.b_in, packed.w_out, 1, 11, isa, packed.knobs)

    ident = torch.nn.Identity()
    r["one_token_us"] = {
        "FFF module call": med_us(lambda: layer(x1), 20000),
        "native op call alone": med_us(lambda: op(*op_args(x1)), 20000),
        "torch.add of two (1,768) tensors (an op call's floor)": med_us(lambda: torch.add(x1, x1), 20000),
        "nn.Identity module call (a module call's floor)": med_us(lambda: ident(x1), 20000),
    }
    # memory traffic: a token reads 12 routing rows and 12 output rows (768 fp32 each) = 72 KB
    w = torch.randn(2 * 4095 * 768)  # the two weight matrices, 25 MB
    sec = med_us(lambda: w.sum(), 20) / 1e6
    r["stream_read_GBps_25MB"] = w.numel() * 4 / sec / 1e9
    for T in (128, 4096):
        x = torch.randn(T, 768)
        us = med_us(lambda x=x: op(*op_args(x)), max(20, 20000 // T))
        per_token = us / T
        r[f"tokens_{T}"] = {"us_per_token": per_token, "GBps_if_every_row_from_memory":
                            12 * 2 * 768 * 4 / (per_token * 1e-6) / 1e9}
    y = layer(x1)  # checked before anything is reported: the op gives the layer's output
    assert torch.equal(op(*op_args(x1)), y)
r["environment"] = environment()
args.out.mkdir(parents=True, exist_ok=True)
atomic_write_json(args.out / "bounds.json", r)
print(r["one_token_us"], {k: v for k, v in r.items() if k.startswith(("tokens", "stream"))})
