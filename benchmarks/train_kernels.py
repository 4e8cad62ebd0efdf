"""FFF training kernels, forward + backward: native vs sparse PyTorch vs masked form vs dense FFN.

    PYTHONPATH=src .venv/bin/python benchmarks/train_kernels.py                # 8x7@384, 1x11@768
    PYTHONPATH=src .venv/bin/python benchmarks/train_kernels.py --shapes 32x5:384 --tokens 128

One process, one layer shape at a time. Each step is ``y = layer(x)`` then the gradients of
``sum(y * grad_y)`` with respect to ``x`` and every weight:

- ``native``: the native CPU training kernel (``fff/native/training.py``);
- ``torch-sparse``: the sparse PyTorch path (``fff.pytorch.training.fff_sparse``);
- ``masked``: the original dense "masking" form (``fff.pytorch.training.fff_masked``);
- ``dense``: a plain FFN ``d -> W -> d`` with biases (``nn.Linear`` + exact GELU, fp32; W = 4d
  unless ``--dense-width``), what a converted model's FFF replaces (MiniLM: 384 -> 1536 -> 384).

Before anything is timed, each FFF path's routes are checked against float64 routing and its
output and gradients against the masked form computed in float64 (a mismatch stops the run).
Timing: the implementations alternate call by call (a load spike hits all alike); warm-up, then
``--repeats`` samples, fast calls looped to ~20 ms per sample; median and minimum seconds per step
(on a shared machine the minimum is the steadier figure). Results: ``train_kernels.json`` (rows +
environment: CPU, threads, versions, load average before/after) and ``train_kernels.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ultrafastbert.bench import common
from ultrafastbert.errors import RunError
from ultrafastbert.fff import dispatch
from ultrafastbert.fff.pytorch.routing import route
from ultrafastbert.fff.pytorch.training import fff_masked, fff_sparse
from ultrafastbert.fff.tree import n_nodes
from ultrafastbert.utils.io import atomic_write_text

COLUMNS = ("shape", "d", "tokens", "implementation", "median_ms", "min_ms", "us_per_token",
           "vs_masked", "vs_dense", "vs_torch_sparse")
SAMPLE_S = 0.02


def make_inputs(n_trees: int, depth: int, d: int, tokens: int, seed: int = 0
                ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``x`` (LayerNorm-ed, requires grad), ``[w_in, b_in, w_out]`` (std 0.02, bias 0: the
    released init; requires grad) and ``grad_y``."""
    g = torch.Generator().manual_seed(seed)
    width = n_trees * n_nodes(depth)
    x = F.layer_norm(torch.randn(tokens, d, generator=g), (d,)).requires_grad_()
    weights = [(torch.randn(width, d, generator=g) * 0.02).requires_grad_(),
               torch.zeros(width).requires_grad_(),
               (torch.randn(d, width, generator=g) * 0.02).requires_grad_()]
    return x, weights, torch.randn(tokens, d, generator=g)


def fff_paths(n_trees: int, depth: int) -> dict[str, Callable[..., torch.Tensor]]:
    """The FFF training paths by name: ``fn(x, w_in, b_in, w_out) -> y``."""
    native = dispatch.registry()["native"]
    paths: dict[str, Callable[..., torch.Tensor]] = {
        "torch-sparse": lambda *a: fff_sparse(*a, n_trees, depth),
        "masked": lambda *a: fff_masked(*a, n_trees, depth)}
    reason = native.unavailable_reason(torch.device("cpu"), torch.float32, training=True)
    if reason is not None:
        print(f"native training kernel unavailable: {reason}", file=sys.stderr)
    else:
        paths = {"native": lambda *a: native.train_forward(*a, n_trees, depth)[0], **paths}
    return paths


def check(paths: dict[str, Callable[..., torch.Tensor]], n_trees: int, depth: int,
          x: torch.Tensor, weights: list[torch.Tensor], grad_y: torch.Tensor) -> dict[str, float]:
    """Routes against float64 routing, then output and gradients against the float64 masked
    form; returns each path's worst relative gradient error. Raises RunError on a mismatch."""
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *weights)]
    y64 = fff_masked(*leaves64, n_trees, depth)
    want = [y64.detach(), *torch.autograd.grad(y64, leaves64, grad_y.double())]
    nodes64, logits64 = route(leaves64[0], leaves64[1], leaves64[2], n_trees, depth)
    clear = (logits64.abs() > 1e-4).all(dim=-1).all(dim=-1)  # rows no fp32 rounding can flip
    errors = {}
    for name, fn in paths.items():
        if name == "masked":
            continue
        if name == "native":
            _, nodes = dispatch.registry()["native"].train_forward(x, *weights, n_trees, depth)
            if not torch.equal(nodes[clear], nodes64[clear]):
                raise RunError(f"{name}: routes differ from float64 routing")
        y = fn(x, *weights)
        got = [y.detach(), *torch.autograd.grad(y, [x, *weights], grad_y)]
        worst = 0.0
        for label, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want, strict=True):
            err = ((a.double() - b).abs().max() / (1 + b.abs().max())).item()
            if not err <= 1e-4:
                raise RunError(f"{name}: {label} differs from the masked form by {err:.2e}")
            worst = max(worst, err)
        errors[name] = worst
    return errors


def step_fns(paths: dict[str, Callable[..., torch.Tensor]], x: torch.Tensor,
             weights: list[torch.Tensor], grad_y: torch.Tensor, dense_width: int
             ) -> dict[str, Callable[[], None]]:
    """One forward + backward per call, for every FFF path and the dense FFN."""
    d = x.shape[1]
    lin1, lin2 = torch.nn.Linear(d, dense_width), torch.nn.Linear(dense_width, d)
    dense_leaves = [x, *lin1.parameters(), *lin2.parameters()]
    steps = {name: (lambda fn=fn: _grads(fn(x, *weights), [x, *weights], grad_y))
             for name, fn in paths.items()}
    steps["dense"] = lambda: _grads(lin2(F.gelu(lin1(x))), dense_leaves, grad_y)
    return steps


def _grads(y: torch.Tensor, leaves: list[torch.Tensor], grad_y: torch.Tensor) -> None:
    torch.autograd.grad(y, leaves, grad_y)


def time_steps(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step, sample by sample, the steps alternating."""
    calls = {}
    for name, fn in steps.items():
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(SAMPLE_S / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def measure(shape: str, d: int, tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check, then time every path at one shape and token count; one row per path."""
    n_trees, depth = (int(v) for v in shape.split("x"))
    x, weights, grad_y = make_inputs(n_trees, depth, d, tokens, args.seed)
    paths = fff_paths(n_trees, depth)
    errors = check(paths, n_trees, depth, x, weights, grad_y)
    samples = time_steps(step_fns(paths, x, weights, grad_y, args.dense_width or 4 * d),
                         args.repeats)
    rows = []
    for name, secs in samples.items():
        med = statistics.median(secs)
        rows.append({"shape": shape, "d": d, "tokens": tokens, "implementation": name,
                     "median_ms": med * 1e3, "min_ms": min(secs) * 1e3,
                     "us_per_token": med / tokens * 1e6, "max_rel_grad_err": errors.get(name),
                     "samples_ms": [s * 1e3 for s in secs]})
    base = {r["implementation"]: r["min_ms"] for r in rows}
    for r in rows:  # speedups from the minima (the steadier figure on a shared machine)
        r["vs_masked"] = base["masked"] / r["min_ms"]
        r["vs_dense"] = base["dense"] / r["min_ms"]
        r["vs_torch_sparse"] = base["torch-sparse"] / r["min_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x7:384,1x11:768",
                   help="comma list of KxD:d (default 8x7:384,1x11:768)")
    p.add_argument("--tokens", default="128,4096", help="comma list (default 128,4096)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dense-width", type=int, default=0, help="dense FFN width (0: 4*d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train_kernels"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = common.environment("cpu", dtypes=["float32"])
    env.update(loadavg_before=common.loadavg(), command=" ".join(sys.argv))
    rows = []
    for item in args.shapes.split(","):
        shape, _, d = item.partition(":")
        for tokens in (int(t) for t in args.tokens.split(",")):
            rows += measure(shape, int(d), tokens, args)
            print(common.format_table(rows[-4:], COLUMNS), flush=True)
    env["loadavg_after"] = common.loadavg()
    table = common.format_table(rows, COLUMNS)
    files = common.write_results(args.out, "train_kernels", rows, env, {"table": table})
    atomic_write_text(args.out / "train_kernels.md", _markdown(table, env))
    print(table)
    print(f"wrote {', '.join(map(str, files))} and train_kernels.md")
    return 0


def _markdown(table: str, env: dict[str, Any]) -> str:
    return (f"# FFF training kernels: forward + backward\n\n{table}\n\n"
            f"Times are per step (forward + gradients of x and all weights), float32; speedups "
            f"from the minimum of the samples. {common.speed_summary(env)}; load average before {env.get('loadavg_before')}, after "
            f"{env.get('loadavg_after')}; commit {env.get('git_commit')}.\n\n"
            f"Command: `{env.get('command')}`\n")


if __name__ == "__main__":
    sys.exit(main())
