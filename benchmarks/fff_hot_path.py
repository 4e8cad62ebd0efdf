"""Time the 1-token inference hot path of ``FFF`` (and ``InferenceLinear``) against an earlier
revision of the same module, in one process.

Loads ``src/ultrafastbert/fff/layer.py`` and ``src/ultrafastbert/model/linear.py`` as they were at
``--before`` (a git revision) next to the current ones, builds both layers with the same
weights, checks that they give the same output, then times single calls in interleaved rounds
(one round = ``--calls`` calls of each, in alternating order) and prints the median per-call time
of each and their ratio. Needs the native kernel (or pass ``--kernel torch``).

    .venv/bin/python benchmarks/fff_hot_path.py --before main --rounds 31 --calls 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ultrafastbert.bench.common import environment

ROOT = Path(__file__).resolve().parents[1]


def load_old(rev: str, relpath: str, name: str, tmp: Path):
    """The module at ``relpath`` as of ``rev``, imported as ``name`` (same package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{relpath}"], check=True,
                            capture_output=True, text=True).stdout
    path = tmp / (name.rpartition(".")[2] + ".py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def per_call_us(fn, x, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def compare(old, new, x, rounds: int, calls: int) -> dict:
    """Median per-call µs of ``old(x)`` and ``new(x)`` over interleaved rounds."""
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)
        for _ in range(3):  # warm-up (packs the weights)
            per_call_us(old, x, calls // 10 + 1)
            per_call_us(new, x, calls // 10 + 1)
        times = {"before": [], "after": []}
        for r in range(rounds):
            order = [("before", old), ("after", new)][:: 1 if r % 2 == 0 else -1]
            for label, fn in order:
                times[label].append(per_call_us(fn, x, calls))
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {"before_us": before, "after_us": after, "after_over_before": after / before,
            "before_min_us": min(times["before"]), "after_min_us": min(times["after"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="main", help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ultrafastbert.fff import layer as new_layer
    from ultrafastbert.model import linear as new_linear

    with tempfile.TemporaryDirectory() as tmp:
        old_layer = load_old(args.before, "src/ultrafastbert/fff/layer.py",
                             "ultrafastbert.fff._layer_before", Path(tmp))
        old_linear = load_old(args.before, "src/ultrafastbert/model/linear.py",
                              "ultrafastbert.model._linear_before", Path(tmp))
    new_fff = new_layer.FFF(768, n_trees=1, depth=11).eval()
    old_fff = old_layer.FFF(768, n_trees=1, depth=11).eval()
    old_fff.load_state_dict(new_fff.state_dict())
    for layer in (new_fff, old_fff):
        layer.set_runtime(args.kernel)
    new_lin = new_linear.InferenceLinear(768, 2304, bias=False).eval()
    old_lin = old_linear.InferenceLinear(768, 2304, bias=False).eval()
    old_lin.load_state_dict(new_lin.state_dict())
    x = torch.nn.functional.layer_norm(torch.randn(1, 768), (768,))
    result = {
        "fff_1x11_1_token": compare(old_fff, new_fff, x, args.rounds, args.calls),
        "inference_linear_768x2304_1_token": compare(old_lin, new_lin, x, args.rounds,
                                                     max(1, args.calls // 10)),
        "settings": {**vars(args), "json": str(args.json) if args.json else None,
                     "kernel_used": new_fff.kernel().name, "torch": torch.__version__,
                     "environment": environment("cpu", dtypes=["float32"])},
    }
    for name, r in result.items():
        if name != "settings":
            print(f"{name}: before {r['before_us']:.2f} us, after {r['after_us']:.2f} us "
                  f"(x{r['after_over_before']:.3f}; min {r['before_min_us']:.2f} / "
                  f"{r['after_min_us']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
