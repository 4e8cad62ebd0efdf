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
the new one. With ``--dtypes bfloat16`` (or ``float32,bfloat16``) the same for the bf16 kernel
against the dense FFN in bf16: ``native-bf16`` (what the layer runs), the same walk with the
fp32 kernel's default knobs (``native-bf16-fp32knobs``) and the old revision's bf16 op
(``native-bf16-old``), all checked to give the same bits. With ``--dtypes int8`` the int8-weight
kernel (fp32 activations) against the fp32 dense FFN and the fp32 kernel: ``native-int8`` (its
default path on this CPU, autotuned, what the layer runs) and each other path
(``native-int8-avx512``: int8 rows widened to fp32; ``native-int8-avx512vnni``: tokens
quantized, VNNI routing dot products), each checked against the float64 reference of its own semantics (routes, then
values), with ``..._vs_native`` the per-round ratio to the fp32 kernel. Each round times every
variant back to back; the table gives medians over rounds and the speedup is the median of
per-round ratios against the round's fastest dense variant. CPU model and flags, threads and the
load average are recorded in the JSON (bench.common.environment).
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ultrafastbert.bench.common import environment, time_round
from ultrafastbert.bench.ff import DenseFF, _packed_variant
from ultrafastbert.fff import dispatch
from ultrafastbert.fff.gemm.kernel import GemmKernel
from ultrafastbert.fff.native import build, tuning
from ultrafastbert.fff.native.kernel import (
    INT8_ISA_CODES,
    NativeBF16Kernel,
    NativeCPUKernel,
    NativeInt8Kernel,
    quantize_tokens,
)
from ultrafastbert.fff.pytorch.kernel import TorchKernel
from ultrafastbert.fff.reference import fff_reference
from ultrafastbert.fff.tree import n_nodes

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = "src/ultrafastbert/fff/native"


def run_record() -> dict[str, object]:
    """bench.common's environment (CPU model, speed flags, cores, versions), the kernel's ISA
    and the load average."""
    return {**environment("cpu"), "isa": build.cpu_isa(), "load_avg": os.getloadavg()}


#: The old build's op names: ours renamed so that both libraries can be loaded in one process.
OLD_RENAMES = (("fff_cpu_forward", "fff_old_forward"), ('"fff_cpu_isa', '"fff_old_isa'),
               ("fff_bf16_forward", "fff_old_bf16_forward"), ('"fff_bf16_isa', '"fff_old_bf16_isa'))


@dataclasses.dataclass(frozen=True)
class OldOps:
    """The untuned native ops of another git revision: fp32 and (None before it existed) bf16."""

    forward: Callable[..., torch.Tensor]
    bf16_forward: Callable[..., torch.Tensor] | None


def build_old(rev: str) -> OldOps:
    """The native ops of git revision ``rev``: every C++ source of the native folder there, ops
    renamed (``fff_old_*`` in namespace ``ufb_old``), built as a second library."""
    tmp = Path(tempfile.mkdtemp(prefix="fff-old-"))
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{NATIVE_DIR}"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split()
    names = [n for n in listing if n.endswith((".cpp", ".h"))]
    for name in names:
        text = subprocess.run(["git", "show", f"{rev}:{NATIVE_DIR}/{name}"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
        for old, new in OLD_RENAMES:
            text = text.replace(old, new)
        text = re.sub(r"TORCH_LIBRARY_FRAGMENT\(ultrafastbert\b", "TORCH_LIBRARY_FRAGMENT(ufb_old",
                      text)
        isas = r"(avx512bf16|avx512|avx2|bf16_dp|bf16_avx512|bf16_avx2)"
        text = re.sub(rf"\b{isas}::", r"old_\1::", text)
        text = re.sub(rf"namespace {isas}\b", r"namespace old_\1", text)
        (tmp / name).write_text(text)
    from torch.utils import cpp_extension

    cpp_extension.load(name="fff_old", sources=[str(tmp / n) for n in names if n.endswith(".cpp")],
                       extra_cflags=build._compile_flags(), extra_ldflags=build._openmp_flags(),
                       build_directory=str(tmp), is_python_module=False, verbose=False)
    ops = torch.ops.ufb_old
    bf16 = ops.fff_old_bf16_forward.default if hasattr(ops, "fff_old_bf16_forward") else None
    return OldOps(ops.fff_old_forward.default, bf16)


def dense_ffns(d: int, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The dense FFN a user would compare with at this width (d=384: 384->1536->384 with
    biases; else d->4095->d without), in ``dtype``, as nn.Linear (``dense``) and on prepacked
    oneDNN GEMMs as the encoder runs it in inference (``dense-packed``, bench.ff's
    ``onednn-packed``)."""
    module = DenseFF(d, 1536, bias=True) if d == 384 else DenseFF(d, 4095, bias=False)
    module = module.to(dtype)
    return {"dense": module, "dense-packed": _packed_variant(module)}


#: Fixed knob tables timed beside the tuned kernel, one per walk for several trees (the knob
#: values over the defaults; see fff/native/tuning.py).
WALKS: dict[str, dict[str, int]] = {
    "native-sort": {"sort": 1, "block": 256},
    "native-split": {"split": 1, "block": 0},
    "native-split256": {"split": 1, "block": 256},
}


def make_weights(n_trees: int, depth: int, d: int) -> tuple[torch.Tensor, ...]:
    """Checkpoint-layout fp32 weights ``(w_in, b_in, w_out)`` of one configuration."""
    gen = torch.Generator().manual_seed(n_trees * 100 + depth)
    rows = n_trees * n_nodes(depth)
    return (torch.randn(rows, d, generator=gen) * 0.02, torch.randn(rows, generator=gen) * 0.05,
            torch.randn(d, rows, generator=gen) * 0.02)


def variants(n_trees: int, depth: int, d: int, old: OldOps | None
             ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], tuple]:
    """The timed fp32 functions for one configuration, and its checkpoint-layout weights."""
    weights = make_weights(n_trees, depth, d)
    fns: dict[str, Callable] = dict(dense_ffns(d, torch.float32))
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
        fns["native-old"] = lambda x: old.forward(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                                  fixed._isa_code)
    return fns, weights


def bf16_variants(n_trees: int, depth: int, d: int, old: OldOps | None
                  ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], tuple]:
    """The timed bf16 functions: dense in bf16, ``native-bf16`` (its untuned op, what the layer
    runs), with the fp32 kernel's default knobs (``native-bf16-fp32knobs``, through the tuned
    op) and, with ``old``, the bf16 op of that revision."""
    weights = make_weights(n_trees, depth, d)
    fns: dict[str, Callable] = dict(dense_ffns(d, torch.bfloat16))
    kernel = NativeBF16Kernel()
    assert kernel.unavailable_reason(torch.device("cpu"), torch.bfloat16) is None
    p = kernel.pack(*weights, n_trees, depth, "fp32")
    isa = kernel._isa_code
    fns["native-bf16"] = lambda x: kernel.forward(x, p, n_trees, depth)[0]
    table = tuning.default_table(n_trees)
    tuned = torch.ops.ultrafastbert.fff_bf16_forward_tuned.default
    fns["native-bf16-fp32knobs"] = lambda x: tuned(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                                   isa, table)
    if old is not None and old.bf16_forward is not None:
        old_bf16 = old.bf16_forward
        fns["native-bf16-old"] = lambda x: old_bf16(x, p.w_in, p.b_in, p.w_out, n_trees, depth,
                                                    isa)
    return fns, weights


def int8_variants(n_trees: int, depth: int, d: int
                  ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict]:
    """The timed functions of the int8 comparison: fp32 dense, the fp32 kernel (``native``,
    autotuned) and the int8-weight kernel on each AVX-512 path this CPU runs (autotuned; the
    best path, what the layer runs, as ``native-int8``); and each int8 path's (kernel, packed
    weights)."""
    weights = make_weights(n_trees, depth, d)
    fns: dict[str, Callable] = dict(dense_ffns(d, torch.float32))
    fp32 = NativeCPUKernel()
    p32 = fp32.pack(*weights, n_trees, depth, "fp32")
    fns["native"] = lambda x: fp32.forward(x, p32, n_trees, depth)[0]
    best = NativeInt8Kernel()
    assert best.unavailable_reason(torch.device("cpu"), torch.float32, "int8") is None
    paths = {}
    for isa in INT8_ISA_CODES:
        if isa == "avx2" and best.isa != "avx2":
            continue  # the AVX2 fallback: not what an AVX-512 CPU runs
        kernel = NativeInt8Kernel(isa)
        if kernel.unavailable_reason(torch.device("cpu"), torch.float32, "int8") is not None:
            continue
        packed = kernel.pack(*weights, n_trees, depth, "int8")
        name = "native-int8" if isa == best.isa else f"native-int8-{isa}"
        fns[name] = lambda x, k=kernel, p=packed: k.forward(x, p, n_trees, depth)[0]
        paths[name] = (kernel, packed)
    return fns, paths


def check_int8(paths: dict, n_trees: int, depth: int, d: int) -> None:
    """Every int8 path against the float64 reference of its own semantics (dequantized weights;
    on VNNI the dequantized tokens) on 300 tokens: routes equal except where a path logit is
    within 1e-5 of 0 (at most 2% of tokens), then values."""
    x = F.layer_norm(torch.randn(300, d, generator=torch.Generator().manual_seed(7)), (d,))
    for name, (kernel, packed) in paths.items():
        y, nodes = kernel.forward(x, packed, n_trees, depth, return_nodes=True)
        w_in, b_in, w_out = packed.dequantized()
        xr = x.double()
        if kernel.isa == "avx512vnni":
            q, scale = quantize_tokens(x)
            xr = q.double() * scale.double()[:, None]
        ref = fff_reference(xr, w_in.double(), b_in.double(), w_out.double(), n_trees, depth)
        near = (ref.logits[..., :-1].abs() < 1e-5).flatten(1).any(1)
        same = (nodes == ref.nodes).flatten(1).all(1)
        assert (same | near).all() and near.float().mean() <= 0.02, f"{name}: routes differ"
        err = (y.double() - ref.y)[~near].abs().max().item()
        assert err <= 1e-5 * ref.y.abs().max().item() + 1e-7, f"{name}: values differ ({err})"


def check(fns: dict, weights: tuple, n_trees: int, depth: int, d: int) -> None:
    """Every fp32 FFF variant against the float64 reference on 64 tokens; old and new native:
    same bits."""
    x = F.layer_norm(torch.randn(64, d, generator=torch.Generator().manual_seed(7)), (d,))
    ref = fff_reference(x, *weights, n_trees, depth)
    for name, fn in fns.items():
        if not name.startswith("dense"):
            torch.testing.assert_close(fn(x), ref.y, rtol=1e-4, atol=1e-5, msg=name)
    if "native-old" in fns:
        assert torch.equal(fns["native-old"](x), fns["native"](x)), "old and new native differ"


def check_bf16(fns: dict, weights: tuple, n_trees: int, depth: int, d: int) -> None:
    """The bf16 variants on 300 tokens: every one gives the same bits as ``native-bf16``; that
    one matches the float64 reference of its rounded inputs on the rows whose routes agree
    (at least 90% of them), to bf16 precision."""
    x = F.layer_norm(torch.randn(300, d, generator=torch.Generator().manual_seed(7)), (d,))
    x16 = x.bfloat16()
    want = fns["native-bf16"](x16)
    for name, fn in fns.items():
        if name.startswith("native-bf16"):
            assert torch.equal(fn(x16), want), f"{name} differs from native-bf16"
    rounded = [w.bfloat16().float() for w in weights]
    ref = fff_reference(x16.float(), *rounded, n_trees, depth)
    _, nodes = NativeBF16Kernel().forward(x16, NativeBF16Kernel().pack(
        *weights, n_trees, depth, "fp32"), n_trees, depth, return_nodes=True)
    same = (nodes == ref.nodes).flatten(1).all(dim=1)
    assert same.float().mean() >= 0.9, f"bf16 routes agree on only {same.float().mean():.0%}"
    torch.testing.assert_close(want.float()[same], ref.y.float()[same], rtol=2e-2, atol=2e-3)


def bench(config: str, d: int, tokens: list[int], rounds: int, budget_s: float,
          old: OldOps | None, dtype: torch.dtype | str = torch.float32, clock: str = "wall"
          ) -> list[dict]:
    """Rows for one configuration in ``dtype`` (float32, bfloat16 or ``"int8"``: int8
    weights, fp32 activations); per variant the median
    over rounds (wall clock) or the fewest (``clock="thread"``: CPU time, where interference
    only adds)."""
    summary = min if clock == "thread" else statistics.median
    n_trees, depth = map(int, config.split("x"))
    if dtype == "int8":
        fns, paths = int8_variants(n_trees, depth, d)
        check_int8(paths, n_trees, depth, d)
        fns_dtype = torch.float32
    elif dtype == torch.bfloat16:
        fns, weights = bf16_variants(n_trees, depth, d, old)
        check_bf16(fns, weights, n_trees, depth, d)
    else:
        fns, weights = variants(n_trees, depth, d, old)
        check(fns, weights, n_trees, depth, d)
    if dtype != "int8":
        fns_dtype = dtype
    out = []
    for t in tokens:
        x = F.layer_norm(torch.randn(t, d), (d,)).to(fns_dtype)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(time_round(fn, x, budget_s, clock) / t * 1e6)
        row: dict[str, object] = {"config": config, "d_model": d, "tokens": t,
                                  "dtype": str(dtype).replace("torch.", "")}
        if dtype == "int8":
            row["dtype"] = "float32 (int8 weights)"
        # Speedups against the fastest dense variant of each round.
        fastest = [min(v) for v in zip(*(s for n, s in samples.items() if n.startswith("dense")),
                                       strict=True)]
        for name, s in samples.items():
            row[f"{name}_us_per_token"] = round(summary(s), 4)
            if not name.startswith("dense"):
                row[f"{name}_speedup"] = round(statistics.median(
                    a / b for a, b in zip(fastest, s, strict=True)), 2)
        for name in samples:  # the int8 paths against the fp32 kernel (> 1: int8 faster)
            if name.startswith("native-int8"):
                row[f"{name}_vs_native"] = round(statistics.median(
                    a / b for a, b in zip(samples["native"], samples[name], strict=True)), 3)
        for new, old_name in (("native", "native-old"), ("native-fixed", "native-old"),
                              ("native-bf16", "native-bf16-old"),
                              ("native-bf16-fp32knobs", "native-bf16-old")):
            if old_name in samples and new in samples:  # > 1: the new one is faster
                row[f"{new}_vs_old"] = round(statistics.median(
                    a / b for a, b in zip(samples[old_name], samples[new], strict=True)), 3)
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
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: this thread's CPU time per call, fewest over rounds "
                             "(needs --threads 1; robust to other load on the machine)")
    parser.add_argument("--dtypes", default="float32",
                        help="float32, bfloat16 (the bf16 kernel against bf16 dense) and/or "
                             "int8 (the int8-weight kernel against fp32 dense and fp32 kernel)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    old = build_old(args.old_rev) if args.old_rev else None
    env = {**run_record(), "threads": args.threads, "clock": args.clock,
           "command": " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    with torch.no_grad():
        for dtype in (name if name == "int8" else getattr(torch, name)
                      for name in args.dtypes.split(",")):
            for config in args.configs.split(","):
                rows += bench(config, args.d_model, tokens, args.rounds, args.budget_s, old,
                              dtype, args.clock)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": {**env, "load_avg_end": os.getloadavg()},
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
