"""Compare converted models of different FFN structures at equal cost (STS-B, held-out fit,
distillation throughput).

For each converted model directory (``ultrafastbert convert ... --fff 8x7`` / ``6x7+s16`` /
``6x7+r16``): STS-B dev Spearman x100 of the cosine of pooled embeddings
(``convert.evaluate.sts_spearman``), with the dense model and the FFN-removed ablation scored
in the same process (FFN gain kept = (converted - removed) / (dense - removed)); the cost
(multiply-adds per token relative to the dense FFN), the held-out pooled cosine and its share
kept from ``conversion.json``; and each phase's distillation throughput (tokens/s). Checks
first: every model's blocks are the structure its report names.

    python benchmarks/convert_structures.py --models runs/s/8x7 runs/s/6x7_s16 runs/s/6x7_r16 \
        --glue-dir ../shared/glue --out benchmarks/results/convert_structures_short
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, nargs="+", required=True,
                   help="converted model directories")
    p.add_argument("--glue-dir", type=Path, default=Path("../shared/glue"))
    p.add_argument("--out", type=Path, required=True, help="result folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'under load')")
    return p.parse_args(argv)


def conversion_facts(directory: Path) -> dict[str, Any]:
    """What ``conversion.json`` says about the run: structure, cost, tokens, throughput."""
    report = json.loads((directory / "conversion.json").read_text(encoding="utf-8"))
    phases = report["phases"]
    held = report["heldout"]
    throughput = {name: round(p["tokens"] / p["seconds"], 1) for name, p in phases.items()
                  if p.get("seconds")}
    settings = report["settings"]
    allocation = report.get("fff_allocation")
    return {"fff": settings["fff"], "ffn_extras": report.get("ffn_extras"),
            "fff_layers": report["fff_layers"],
            "routing_schedule": settings.get("routing_schedule", "hard"),
            "steps": {name: p.get("steps", 0) for name, p in phases.items()},
            "phase_s": {name: round(p.get("seconds", 0.0), 1) for name, p in phases.items()},
            "auto_trees": allocation["trees"] if allocation else None,
            "cost_pct": round(100 * report["active_fraction"], 2),
            "budget_s": report["settings"]["budget_s"], "init_s": round(report["init_s"], 1),
            "tokens": {name: p.get("tokens", 0) for name, p in phases.items()},
            "tokens_per_s": throughput,
            "heldout_pooled_cos": round(held["pooled_cosine"], 4),
            "heldout_removed_cos": round(held.get("removed_pooled_cosine", float("nan")), 4),
            "heldout_cos_kept": round(held.get("pooled_cosine_kept", float("nan")), 3),
            "post_norm_error": [round(e, 3) for e in held["post_norm_error"]],
            "environment": {k: report["environment"].get(k) for k in
                            ("cpu", "torch_threads", "torch", "cpu_flags")}}


def check_structure(model: Any, facts: dict[str, Any]) -> None:
    """The loaded blocks are the structure the report names (a check, before any score):
    trees per layer, the parts beside them and the neurons per node."""
    from ultrafastbert.model.converted import fff_blocks
    from ultrafastbert.model.ffn_structures import Extras

    blocks = fff_blocks(model)
    extras = facts["ffn_extras"] or [None] * len(blocks)
    for block, extra, spec in zip(blocks, extras, facts["fff_layers"], strict=True):
        want = Extras.from_json(extra)
        fff = getattr(block, "fff", None)
        trees = None if fff is None else [fff.n_trees, fff.depth]
        neurons = getattr(block, "node_neurons", None)
        per_node = 1 if neurons is None else neurons.per_node + 1
        if (want.beside != (getattr(block, "extras", None) is not None)
                or want.block != per_node or trees != spec):
            raise SystemExit(f"{facts['fff']}: block {type(block).__name__} {trees} does not "
                             f"match the report's layer {spec} with extras {extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import ultrafastbert
    from ultrafastbert.bench.common import environment
    from ultrafastbert.convert.evaluate import sts_spearman
    from ultrafastbert.convert.source import load_source, make_student, parse_fff

    torch.set_num_threads(args.threads)
    source = load_source(_source_dir(args.models[0]))

    def score(model: Any) -> float:
        return float(sts_spearman(model, source.tokenizer_dir, args.glue_dir,
                                  pooling=source.pooling)["spearman"])

    started = time.time()
    dense = score(source.model)
    removed = score(make_student(source, parse_fff("none", source.n_layers)))
    if not dense > removed:
        print(f"note: dense {dense:.2f} is not above the ablation {removed:.2f}: the gain "
              "kept is not meaningful for this source")
    rows = []
    for directory in args.models:
        facts = conversion_facts(directory)
        model = ultrafastbert.from_pretrained(directory)
        check_structure(model, facts)
        sts = score(model)
        rows.append({"model": directory.name, **facts, "stsb": round(sts, 2),
                     "gain_kept_pct": round(100 * (sts - removed) / (dense - removed), 1)})
        print(f"{directory.name}: STS-B {sts:.2f}, gain kept {rows[-1]['gain_kept_pct']}%, "
              f"cost {facts['cost_pct']}%, held-out cos {facts['heldout_pooled_cos']}, "
              f"tokens/s {facts['tokens_per_s']}", flush=True)
    result = {"dense_stsb": round(dense, 2), "removed_stsb": round(removed, 2), "rows": rows,
              "eval_threads": args.threads, "eval_s": round(time.time() - started, 1),
              "note": args.note, "command": " ".join(sys.argv),
              "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1) + "\n"),
                       ("results.md", markdown(result))):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out / name)
    print(f"dense {dense:.2f}, removed {removed:.2f}; results in {args.out / 'results.json'}")
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table (what a person reads; results.json has everything)."""
    lines = [f"STS-B dev: dense {result['dense_stsb']}, FFN blocks removed "
             f"{result['removed_stsb']}. {result['note']}", "",
             "| model | --fff | trees per layer | routing | cost | steps (layer-wise + end "
             "to end) | seconds | tokens | held-out pooled cosine (kept) | STS-B | FFN gain "
             "kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        trees = "/".join(str(s[0]) if s else "-" for s in r["fff_layers"])
        steps = " + ".join(str(v) for v in r["steps"].values())
        seconds = " + ".join(f"{v:.0f}" for v in r["phase_s"].values())
        tokens = " + ".join(f"{v / 1000:.0f} k" for v in r["tokens"].values())
        lines.append(f"| {r['model']} | {r['fff']} | {trees} | {r['routing_schedule']} | "
                     f"{r['cost_pct']}% | {steps} | init {r['init_s']:.0f} + {seconds} | "
                     f"{tokens} | {r['heldout_pooled_cos']} ({r['heldout_cos_kept']}) | "
                     f"{r['stsb']} | {r['gain_kept_pct']}% |")
    return "\n".join(lines) + "\n"


def _source_dir(converted: Path) -> Path:
    """The source model a conversion names in its report."""
    report = json.loads((converted / "conversion.json").read_text(encoding="utf-8"))
    return Path(report["settings"]["source"])


if __name__ == "__main__":
    sys.exit(main())
