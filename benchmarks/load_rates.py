"""What bounds the FFF walk on this CPU: fp32 multiply-add rates when operands come from memory.

    PYTHONPATH=src .venv/bin/python benchmarks/load_rates.py --out benchmarks/results/load_rates

A tree walk is a string of per-token dot products (routing) and row updates (output) whose rows
depend on the token, so it cannot block registers over tokens and rows the way a dense GEMM does
(~0.25 vector loads per multiply-add): each of its vector FMAs loads at least one operand, and
usually more (the dot products: a row vector and an x vector). This measures, on one core, the
vector-FMA rate of three such loops against the rate with no loads, for working sets from L1 to
beyond L2:

- ``1 load``: ``acc_j += a * w[v]`` (the output rows: one streamed operand, a broadcast scalar);
- ``2 loads, x in L1``: ``acc_j += x[v % 24] * w[v]`` (a routing dot product whose token row is
  in L1 and whose weight rows stream from the working set);
- ``1.25 loads, rows in L1``: four token rows streamed from the working set against one row in
  L1 (the sorted walk's ``dot_row_shared<4>``: tokens at one node share that node's row).

Each loop runs the same FMAs on 64-byte aligned buffers, best of 5 timings of ~0.2 s; the rate
is in 512-bit (16-lane) FMAs per nanosecond (AVX-512) or 256-bit FMAs (AVX2 builds, reported as
such). The C++ is compiled here with g++ -O3 (the kernel's toolchain). Results:
``load_rates.json`` (rows + environment), ``.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ultrafastbert.bench import common
from ultrafastbert.errors import RunError

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#define T __attribute__((target("avx512f")))
using clk = std::chrono::steady_clock;
static double now() { return std::chrono::duration<double>(clk::now().time_since_epoch()).count(); }

T static float one_load(const float* w, long nvec, long reps) {
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
  for (long r = 0; r < reps; ++r) {
    const __m512 a = _mm512_set1_ps(1e-3f * (r & 7));
    for (long v = 0; v + 8 <= nvec; v += 8)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm512_fmadd_ps(a, _mm512_load_ps(w + (v + j) * 16), acc[j]);
  }
  __m512 s = acc[0];
  for (int j = 1; j < 8; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}

T static float two_loads(const float* x, const float* w, long nvec, long reps) {
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
  for (long r = 0; r < reps; ++r)
    for (long row = 0; row + 24 <= nvec; row += 24) {
      const float* xr = x + ((row / 24) & 3) * 384;  // 4 token rows in turn, as the walk's
      for (int k = 0; k < 24; k += 8) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j)
          acc[j] = _mm512_fmadd_ps(_mm512_load_ps(xr + (k + j) * 16),
                                   _mm512_load_ps(w + (row + k + j) * 16), acc[j]);
      }
    }
  __m512 s = acc[0];
  for (int j = 1; j < 8; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}

// Four token rows (24 vectors each, consecutive in the working set) against one row in L1.
T static float row_shared(const float* row, const float* xs, long nvec, long reps) {
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int a = 0; a < 4; ++a) acc[i][a] = _mm512_setzero_ps();
  for (long r = 0; r < reps; ++r)
    for (long t = 0; t + 96 <= nvec; t += 96) {
      const float* rr = row + ((t / 96) & 3) * 384;  // 4 node rows in turn, as the walk's
      for (int k = 0; k < 24; k += 4)
#pragma GCC unroll 4
        for (int a = 0; a < 4; ++a) {
          const __m512 wv = _mm512_load_ps(rr + (k + a) * 16);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i)
            acc[i][a] = _mm512_fmadd_ps(_mm512_load_ps(xs + (t + i * 24 + k + a) * 16), wv,
                                        acc[i][a]);
        }
    }
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < 4; ++i)
    for (int a = 0; a < 4; ++a) s = _mm512_add_ps(s, acc[i][a]);
  return _mm512_reduce_add_ps(s);
}

template <class F> static double best_rate(F f, double fmas) {
  double best = 1e30;
  for (int k = 0; k < 5; ++k) {
    const double t = now();
    f();
    best = best < now() - t ? best : now() - t;
  }
  return fmas / best / 1e9;
}

int main(int argc, char** argv) {
  volatile float sink = 0;
  for (int i = 1; i < argc; ++i) {
    const long kb = std::atol(argv[i]), nvec = kb * 1024 / 64 / 96 * 96;
    float* w = static_cast<float*>(std::aligned_alloc(64, nvec * 64 + 64 * 24));
    float* x = static_cast<float*>(std::aligned_alloc(64, 4 * 64 * 24));
    for (long j = 0; j < nvec * 16; ++j) w[j] = 1e-3f * (j % 97);
    for (int j = 0; j < 4 * 24 * 16; ++j) x[j] = 1e-3f * (j % 89);
    const long reps = 200000000 / nvec + 1;
    std::printf("one_load %ld %.4f\n", kb, best_rate([&] {
      sink = sink + one_load(w, nvec, reps); }, double(nvec / 8 * 8) * reps));
    std::printf("two_loads %ld %.4f\n", kb, best_rate([&] {
      sink = sink + two_loads(x, w, nvec, reps); }, double(nvec / 24 * 24) * reps));
    std::printf("row_shared %ld %.4f\n", kb, best_rate([&] {
      sink = sink + row_shared(x, w, nvec, reps); }, double(nvec / 96 * 96) * reps));
    std::free(w);
    std::free(x);
  }
  return 0;
}
"""

LOOPS = {"one_load": "1 load (output rows)", "two_loads": "2 loads, x in L1 (routing)",
         "row_shared": "1.25 loads, row in L1 (sorted routing)"}
COLUMNS = ("working_set_kb", *LOOPS)


def compile_and_run(sizes_kb: list[int]) -> dict[str, dict[int, float]]:
    """``{loop: {working set KB: vector FMAs per ns}}``."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RunError("g++ not found: install a C++ compiler (the native kernel needs it too)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "rates.cpp", Path(tmp) / "rates"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O3", "-std=c++17", "-o", str(exe), str(src)], check=True)
        out = subprocess.run([str(exe), *map(str, sizes_kb)], check=True, capture_output=True,
                             text=True).stdout
    rates: dict[str, dict[int, float]] = {}
    for line in out.splitlines():
        name, kb, rate = line.split()
        rates.setdefault(name, {})[int(kb)] = float(rate)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-kb", default="24,96,384,768,1536,6144,24576",
                   help="working sets in KB (default spans L1 to beyond L2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/load_rates"))
    args = p.parse_args(argv)
    env = {**common.environment(), "load_before": common.loadavg()}
    if not (env.get("cpu_flags") or {}).get("avx512f"):
        print("this microbenchmark is written for AVX-512 (avx512f)", file=sys.stderr)
        return 2
    rates = compile_and_run([int(s) for s in args.sizes_kb.split(",")])
    env["load_after"] = common.loadavg()
    rows = [{"working_set_kb": kb, **{k: rates[k][kb] for k in LOOPS}}
            for kb in sorted(rates["one_load"])]
    table = common.format_table(rows, COLUMNS)
    text = (f"# Vector FMA rates with operands from memory (one core)\n\n"
            f"512-bit FMAs per ns.\n\n{table}\n\n"
            + "\n".join(f"- `{k}`: {v}" for k, v in LOOPS.items())
            + f"\n\nCPU: {env.get('cpu')}; load {env['load_before']} -> "
              f"{env['load_after']}.\n")
    common.write_report(args.out, "load_rates", rows, env, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
