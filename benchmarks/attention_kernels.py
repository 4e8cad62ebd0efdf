"""The packed encoder's attention kernels against each other, per batch width (issue 20).

For batches of texts of one width (the last text 3 tokens shorter, so there is padding to
skip), 12 heads of 32 (MiniLM's and BERT-base's per-head shape at d=384), float32 and bfloat16
q/k/v: the native packed attention (``fff/native/attention_cpu.cpp``; bfloat16 through its
AVX512-BF16 op where the CPU has it, with the widened float32 op beside; on an AVX-512 CPU also
its AVX2 build, as CPUs without AVX-512 run it) against the PyTorch path
``Packing.attention`` takes without it (float32: matmuls + softmax up to 48 tokens, flash SDPA
above; bfloat16: flash SDPA). Every kernel is first checked against a float64 per-text softmax,
then all are timed in interleaved rounds in this process (medians). ``--clock thread`` counts
this thread's CPU time (1 thread only: robust to other jobs on a shared machine).

    .venv/bin/python benchmarks/attention_kernels.py --threads 2 --repeats 15 \\
        --out benchmarks/results/attention_kernels
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ultrafastbert.bench.common import environment, write_results
from ultrafastbert.fff.native.build import cpu_isa
from ultrafastbert.infer import native_attention
from ultrafastbert.infer.packing import Packing

SHAPES = ((16, 32), (32, 32), (48, 32), (64, 16), (128, 8), (256, 4), (512, 2))
N_HEADS, HEAD_DIM = 12, 32


def reference(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Float64 softmax attention of each text alone, ``(T, 3d)`` -> ``(T, d)``."""
    d = qkv.shape[1] // 3
    out = []
    for start, length in zip(packing.starts.tolist(), packing.lengths.tolist(), strict=True):
        rows = qkv[start:start + length].double().view(length, 3, N_HEADS, HEAD_DIM)
        q, k, v = rows.unbind(1)
        probs = torch.einsum("shd,thd->hst", q, k).mul(HEAD_DIM ** -0.5).softmax(-1)
        out.append(torch.einsum("hst,thd->shd", probs, v).reshape(length, d))
    return torch.cat(out)


def kernels(packing: Packing, qkv: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The two paths of :meth:`Packing.attention`, switched by its width limit."""
    def with_native(limit: int) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            saved = native_attention.MAX_WIDTH
            native_attention.MAX_WIDTH = limit
            try:
                return packing.attention(qkv, N_HEADS)
            finally:
                native_attention.MAX_WIDTH = saved
        return call
    fns = {"native": with_native(1 << 30), "pytorch": with_native(0)}
    if qkv.dtype == torch.bfloat16 and native_attention._STATE.get("bf16"):
        fns["native_widened"] = lambda: native_attention.packed_attention(  # bf16 -> fp32 op
            qkv, packing.starts, packing.lengths, N_HEADS, "blocks", "avx512")
    if cpu_isa() == "avx512":  # the AVX2 build too, for CPUs without AVX-512
        fns["native_avx2"] = lambda: native_attention.packed_attention(
            qkv, packing.starts, packing.lengths, N_HEADS, "blocks", "avx2")
    return fns


def clock(name: str) -> Callable[[], float]:
    """``wall`` (perf_counter) or ``thread`` (this thread's CPU time)."""
    return time.perf_counter if name == "wall" else time.thread_time


def time_rounds(fns: dict[str, Callable[[], Any]], repeats: int, now: Callable[[], float]
                ) -> dict[str, float]:
    """Median milliseconds per call of each function, one call of each per round."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            samples[name].append((now() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def run_shape(width: int, n_texts: int, dtype: torch.dtype, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Check, then time, both kernels on one batch shape."""
    lengths = [width] * (n_texts - 1) + [width - 3]
    packing = Packing.from_lengths(lengths)
    qkv = torch.randn(packing.n_tokens, 3 * N_HEADS * HEAD_DIM,
                      generator=torch.Generator().manual_seed(width)).to(dtype)
    want = reference(qkv.float(), packing)
    fns = kernels(packing, qkv)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    errors = {}
    for name, fn in fns.items():
        err = float((fn().double() - want).abs().max())
        if err > tol:
            raise SystemExit(f"{name} attention is wrong at width {width} {dtype}: "
                             f"max error {err:.2e} > {tol}")
        errors[f"max_error_{name}"] = err
    ms = time_rounds(fns, args.repeats, clock(args.clock))
    times = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
    return {"width": width, "texts": n_texts, "dtype": str(dtype).removeprefix("torch."),
            **times, "pytorch_over_native": round(ms["pytorch"] / ms["native"], 3), **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--out", default=None, help="results folder (json + csv)")
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread counts one thread's CPU time: use --threads 1")
    reason = native_attention.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the native attention cannot run here: {reason}")
    torch.set_num_threads(args.threads)
    rows = []
    for width, n_texts in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            row = run_shape(width, n_texts, dtype, args)
            print(row, flush=True)
            rows.append(row)
    if args.out:
        env = environment(dtypes=["float32", "bfloat16"])
        env.update(threads=args.threads, clock=args.clock, repeats=args.repeats)
        write_results(args.out, "attention_kernels", rows, env)


if __name__ == "__main__":
    main()
