"""Time the Triton FFF kernels on a CUDA GPU against dense feed-forward baselines.

Standalone (the ``ultrafastbert bench`` command may lag behind the kernels): run from the
repository root with ``PYTHONPATH=src python3 benchmarks/triton_ff_cuda.py --out result.json``.

What it measures, per dtype (fp32, bf16) and token count (16,384 as in the paper, and fewer):

- dense-4095: ``Linear(768, 4095, bias=False) -> GELU -> Linear(4095, 768, bias=False)`` through
  cuBLAS (fp32 with TF32 off, and, as the stronger fp32 baseline, with TF32 on), and the same
  module ``torch.compile``d (at the largest token count only: compiling is slow);
- the FFF (default UltraFastBERT-1x11) through the Triton kernel and the vectorised torch path;
- with ``--train``, forward+backward of the Triton training path against dense-4095 and the
  original masked form (:func:`ultrafastbert.fff.fff_masked`).

Every output is checked against the float64 reference (routes, then values; gradients against
``fff_masked`` in float64) before anything is timed. Timing: ``triton.testing.do_bench``
(CUDA events, L2 flushed before each call, median). ``--sweep`` also tries other tile sizes for
the forward kernel and reports the fastest. Results: a JSON file and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from ultrafastbert.fff import fff_masked, fff_reference
from ultrafastbert.fff.pytorch.kernel import TorchKernel
from ultrafastbert.fff.tree import n_nodes
from ultrafastbert.fff.triton import kernel as ti
from ultrafastbert.fff.triton import routing as tr
from ultrafastbert.fff.triton import training as tt

logger = logging.getLogger("triton_ff_cuda")

D_MODEL = 768
DENSE_WIDTH = 4095
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ||y - ref|| / ||ref|| accepted before timing, by dtype.
REL_TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16384,4096,1024,128",
                   help="comma-separated token counts (default: %(default)s)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32,bf16,fp16 (default: %(default)s)")
    p.add_argument("--configs", default="1x11", help="FFF configs KxD (default: %(default)s)")
    p.add_argument("--train", action="store_true", help="also time forward+backward")
    p.add_argument("--sweep", action="store_true", help="try other forward tile sizes")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile'd dense")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--device", default="cuda",
                   help="cuda; or cpu to smoke-test this script under Triton's interpreter "
                        "(TRITON_INTERPRET=1, tiny --tokens; the times mean nothing)")
    return p.parse_args()


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import triton

    gpu = {"gpu": "none (CPU smoke test)"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
               "sms": props.multi_processor_count,
               "memory_gib": round(props.total_memory / 2**30)}
    from ultrafastbert.bench.common import cpu_facts

    return {**gpu, **cpu_facts(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "python": platform.python_version(), "d_model": D_MODEL, "dense_width": DENSE_WIDTH,
            "timer": "triton.testing.do_bench, median, L2 flushed between calls",
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench_ms(fn: Callable[[], object], rep_ms: float) -> float:
    """Median milliseconds of ``fn`` (CUDA events, warm-up included; a CPU smoke test just
    times three calls)."""
    import triton.testing

    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                         return_mode="median"))


def dense_module(dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The dense-4095 FF: 768 -> 4095 -> 768, exact GELU, no biases (crammedBERT's baseline)."""
    return nn.Sequential(nn.Linear(D_MODEL, DENSE_WIDTH, bias=False), nn.GELU(),
                         nn.Linear(DENSE_WIDTH, D_MODEL, bias=False)).to(device, dtype)


def fff_weights(n_trees: int, depth: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple:
    """``(w_in (K*N, d), b_in (K*N,), w_out (d, K*N))`` with the released init (N(0, 0.02))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    width = n_trees * n_nodes(depth)
    w_in = torch.randn(width, D_MODEL, device=device, generator=gen) * 0.02
    b_in = torch.randn(width, device=device, generator=gen) * 0.02
    w_out = torch.randn(D_MODEL, width, device=device, generator=gen) * 0.02
    return w_in.to(dtype), b_in.to(dtype), w_out.to(dtype)


def check_forward(x: torch.Tensor, w: tuple, n_trees: int, depth: int, dtype_name: str,
                  y: torch.Tensor, nodes: torch.Tensor, rows: int = 4096) -> dict:
    """Routes then values of the first ``rows`` tokens against the float64 reference."""
    x, y, nodes = x[:rows], y[:rows], nodes[:rows]
    rows = x.shape[0]
    ref = fff_reference(x.double(), *(t.double() for t in w[:2]), w[2].double(), n_trees, depth)
    near = (ref.logits.abs() < 1e-4).flatten(1).any(dim=1)
    differ = (nodes != ref.nodes).flatten(1).any(dim=1) & ~near
    err = float((y.double()[~near] - ref.y[~near]).norm() / ref.y[~near].norm())
    ok = int(differ.sum()) == 0 and err < REL_TOL[dtype_name]
    if not ok:
        raise RuntimeError(f"Triton FFF output check failed: {int(differ.sum())} routes differ, "
                           f"relative error {err:.2e}")
    return {"checked_rows": rows, "near_tie_rows": int(near.sum()), "rel_error": err}


def time_dense(x: torch.Tensor, dtype: torch.dtype, rep_ms: float, compiled: bool) -> dict:
    """Dense-4095 forward times in ms: cuBLAS (fp32 also with TF32) and torch.compile'd."""
    dense = dense_module(dtype, x.device)
    out = {}
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        out["dense_ms"] = bench_ms(lambda: dense(x), rep_ms)
        if dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
            out["dense_tf32_ms"] = bench_ms(lambda: dense(x), rep_ms)
            torch.backends.cuda.matmul.allow_tf32 = False
        if compiled:
            try:
                fast = torch.compile(dense)
                fast(x)
                out["dense_compiled_ms"] = bench_ms(lambda: fast(x), rep_ms)
            except Exception as err:  # a failed compile is a missing number, not a failed run
                logger.warning("torch.compile'd dense failed: %s", err)
    return out


def time_fff_forward(x: torch.Tensor, w: tuple, n_trees: int, depth: int, dtype_name: str,
                     rep_ms: float) -> dict:
    """Check, then time, the Triton and vectorised-torch FFF forward (ms)."""
    kernel = ti.TritonKernel(interpret=x.device.type == "cpu")
    packed = kernel.pack(*w, n_trees, depth, "fp32")
    with torch.no_grad():
        y, nodes = kernel.forward(x, packed, n_trees, depth, return_nodes=True)
        out = check_forward(x, w, n_trees, depth, dtype_name, y, nodes)
        out["triton_ms"] = bench_ms(lambda: kernel.forward(x, packed, n_trees, depth), rep_ms)
        torch_kernel = TorchKernel()
        tpacked = torch_kernel.pack(*w, n_trees, depth, "fp32")
        out["torch_fff_ms"] = bench_ms(lambda: torch_kernel.forward(x, tpacked, n_trees, depth),
                                       rep_ms)
    out["default_config"] = tr.launch_config(D_MODEL, x.device).__dict__
    return out


def sweep_forward(x: torch.Tensor, w: tuple, n_trees: int, depth: int, rep_ms: float) -> dict:
    """Fastest forward tiles among a few ``(block_t, num_warps)`` (output checked for each)."""
    w_rows = w[2].t().contiguous()
    want, _, _ = tr.fff_forward(x, w[0], w[1], w_rows, n_trees, depth)
    block_d = tr.launch_config(D_MODEL, x.device).block_d
    times = {}
    for block_t in (1, 2, 4, 8, 16):
        for warps in (2, 4, 8):
            if block_t * block_d > 64 * 32 * warps:  # over ~200 live fp32 registers per thread
                continue
            cfg = tr.LaunchConfig(block_t, block_d, warps)
            name = f"block_t={block_t},num_warps={warps}"
            try:
                y, _, _ = tr.fff_forward(x, w[0], w[1], w_rows, n_trees, depth, config=cfg)
                err = float((y.double() - want.double()).norm() / want.double().norm())
                if err > 1e-3:  # only the order of the fp32 sums may change with the tile
                    raise RuntimeError(f"output changed (relative difference {err:.1e})")
                times[name] = bench_ms(lambda cfg=cfg: tr.fff_forward(
                    x, w[0], w[1], w_rows, n_trees, depth, config=cfg), rep_ms / 2)
            except Exception as err:  # one failed tile is a missing point, not a failed run
                logger.warning("tile %s failed: %s", name, err)
    best = min(times, key=times.get)
    return {"sweep_ms": times, "best": best, "best_ms": times[best]}


def sweep_backward(x: torch.Tensor, w: tuple, n_trees: int, depth: int, rep_ms: float) -> dict:
    """Backward-only ms for a few weight-gradient tiles ``(chunk, block_dw, warps)``."""
    w_rows = w[2].t().contiguous()
    _, nodes, logits = tr.fff_forward(x, w[0], w[1], w_rows, n_trees, depth, write_nodes=True,
                                      write_logits=True)
    grad_y = torch.randn_like(x)
    base = tr.launch_config(D_MODEL, x.device)
    times = {}
    for chunk, block_dw, warps in ((16, 128, 4), (16, 64, 2), (32, 128, 8), (64, 64, 8)):
        cfg = tr.LaunchConfig(base.block_t, base.block_d, base.num_warps, chunk, block_dw, warps)
        name = f"chunk={chunk},block_dw={block_dw},warps={warps}"
        try:
            times[name] = bench_ms(lambda cfg=cfg: tt.fff_backward(
                grad_y, x, w[0], w_rows, nodes, logits, True, config=cfg), rep_ms / 2)
        except Exception as err:  # one failed tile is a missing point, not a failed run
            logger.warning("backward tile %s failed: %s", name, err)
    best = min(times, key=times.get)
    return {"backward_sweep_ms": times, "backward_best": best}


def check_gradients(x: torch.Tensor, w: tuple, n_trees: int, depth: int, dtype_name: str,
                    rows: int = 2048) -> dict:
    """Gradients of the Triton training path against fff_masked in float64 (first rows)."""
    leaves = [t[:rows].clone() if i == 0 else t.clone() for i, t in enumerate((x, *w))]
    grad_y = torch.randn(leaves[0].shape, device=x.device)
    kernel = ti.TritonKernel(interpret=x.device.type == "cpu")
    got = _grads(kernel.train_forward, leaves, grad_y, n_trees, depth)
    want = _grads(fff_masked, [t.double() for t in leaves], grad_y, n_trees, depth)
    errors = [float((g.double() - r).norm() / r.norm()) for g, r in zip(got, want, strict=True)]
    if max(errors) > REL_TOL[dtype_name] * 2:
        raise RuntimeError(f"Triton FFF gradient check failed: relative errors {errors}")
    return {"grad_rel_errors": errors}


def _grads(fn, leaves: list, grad_y: torch.Tensor, n_trees: int, depth: int) -> list:
    """``[dx, dw_in, db_in, dw_out]`` of ``fn(x, w_in, b_in, w_out, n_trees, depth)``."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = fn(*leaves, n_trees, depth)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(grad_y.to(y.dtype))
    return [t.grad for t in leaves]


def time_training(x: torch.Tensor, w: tuple, n_trees: int, depth: int, dtype: torch.dtype,
                  rep_ms: float) -> dict:
    """Forward+backward ms: Triton FFF, masked FFF, dense-4095 (input and weight gradients)."""
    grad_y = torch.randn_like(x)
    xs = x.detach().clone().requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in w]
    kernel = ti.TritonKernel(interpret=x.device.type == "cpu")

    def triton_step():
        y, _ = kernel.train_forward(xs, *params, n_trees, depth)
        y.backward(grad_y)

    def masked_step():
        fff_masked(xs, *params, n_trees, depth).backward(grad_y)

    dense = dense_module(dtype, x.device)

    def dense_step():
        dense(xs).backward(grad_y)

    out = {"train_triton_ms": bench_ms(triton_step, rep_ms),
           "train_masked_ms": bench_ms(masked_step, rep_ms)}
    torch.backends.cuda.matmul.allow_tf32 = False
    out["train_dense_ms"] = bench_ms(dense_step, rep_ms)
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        out["train_dense_tf32_ms"] = bench_ms(dense_step, rep_ms)
        torch.backends.cuda.matmul.allow_tf32 = False
    return out


def derive(row: dict) -> None:
    """Add speedups and throughput to a result row (in place)."""
    dense_keys = [k for k in ("dense_ms", "dense_tf32_ms", "dense_compiled_ms") if k in row]
    best_dense = min(row[k] for k in dense_keys)
    row["speedup_vs_dense"] = row["dense_ms"] / row["triton_ms"]
    row["speedup_vs_best_dense"] = best_dense / row["triton_ms"]
    row["triton_tokens_per_s"] = row["tokens"] / (row["triton_ms"] / 1e3)
    if "train_triton_ms" in row:
        train_dense = min(row[k] for k in ("train_dense_ms", "train_dense_tf32_ms") if k in row)
        row["train_speedup_vs_best_dense"] = train_dense / row["train_triton_ms"]


def run_one(tokens: int, dtype_name: str, config: str, args: argparse.Namespace,
            compiled: bool) -> dict:
    """All measurements for one (tokens, dtype, FFF config)."""
    dtype = DTYPES[dtype_name]
    n_trees, depth = (int(v) for v in config.split("x"))
    device = torch.device(args.device)
    x = torch.randn(tokens, D_MODEL, device=device).to(dtype)
    w = fff_weights(n_trees, depth, dtype, device)
    row = {"tokens": tokens, "dtype": dtype_name, "config": config}
    row.update(time_dense(x, dtype, args.rep_ms, compiled))
    row.update(time_fff_forward(x, w, n_trees, depth, dtype_name, args.rep_ms))
    if args.sweep and tokens == max(int(t) for t in args.tokens.split(",")):
        row.update(sweep_forward(x, w, n_trees, depth, args.rep_ms))
    if args.train:
        row.update(check_gradients(x, w, n_trees, depth, dtype_name))
        row.update(time_training(x, w, n_trees, depth, dtype, args.rep_ms))
        if args.sweep and tokens == max(int(t) for t in args.tokens.split(",")):
            row.update(sweep_backward(x, w, n_trees, depth, args.rep_ms))
    derive(row)
    return row


def table(rows: list[dict]) -> str:
    """A plain-text table of the main figures."""
    head = (f"{'config':7s} {'dtype':5s} {'tokens':>6s} {'dense':>8s} {'tf32':>8s} "
            f"{'compiled':>8s} {'triton':>8s} {'torchFFF':>8s} {'x dense':>7s} {'x best':>7s} "
            f"{'trainFFF':>8s} {'trainDns':>8s} {'x train':>7s}")
    lines = [head + "   (times in ms)"]
    for r in rows:
        def f(key, r=r):
            return f"{r[key]:8.3f}" if key in r else f"{'-':>8s}"
        train_x = (f"{r['train_speedup_vs_best_dense']:7.2f}"
                   if "train_speedup_vs_best_dense" in r else f"{'-':>7s}")
        lines.append(f"{r['config']:7s} {r['dtype']:5s} {r['tokens']:6d} {f('dense_ms')} "
                     f"{f('dense_tf32_ms')} {f('dense_compiled_ms')} {f('triton_ms')} "
                     f"{f('torch_fff_ms')} {r['speedup_vs_dense']:7.2f} "
                     f"{r['speedup_vs_best_dense']:7.2f} {f('train_triton_ms')} "
                     f"{f('train_dense_ms')} {train_x}")
    return "\n".join(lines)


def main() -> int:
    """Run every measurement, print the table, write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.error("no CUDA device: this benchmark needs a GPU (--device cpu: smoke test)")
        return 2
    torch.manual_seed(0)
    env = environment(device)
    logger.info("environment: %s", json.dumps(env))
    token_counts = [int(t) for t in args.tokens.split(",")]
    rows = []
    for config in args.configs.split(","):
        for dtype_name in args.dtypes.split(","):
            for tokens in token_counts:
                compiled = (not args.no_compile and device.type == "cuda"
                            and tokens == max(token_counts))
                rows.append(run_one(tokens, dtype_name, config, args, compiled))
                logger.info("%s", json.dumps(rows[-1]))
    logger.info("\n%s", table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "results": rows}, fh, indent=2)
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
