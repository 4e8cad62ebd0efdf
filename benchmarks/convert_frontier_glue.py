"""SST-2 / MRPC fine-tuning of converted models against the dense model: one table.

Reads the ``results.json`` of ``ultrafastbert glue`` runs (one per model, the same protocol:
checked), and the STS-B rows of ``benchmarks/convert_structures.py`` results (``--stsb``);
writes ``OUT/results.json`` and ``OUT/results.md``: each model's structure, cost (share of the
dense FFN's multiply-adds a token), STS-B, and for every task the median over seeds, each
seed's score and the median as a share of the dense model's median. Copies each run's
``results.json`` / ``results.md`` to ``OUT/glue/NAME/``.

    python benchmarks/convert_frontier_glue.py --glue-runs dense=runs/glue10/dense,8x7=... \
        --stsb benchmarks/results/convert_frontier_wave3/seeds_*/results.json \
        --out benchmarks/results/convert_frontier_glue
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from ultrafastbert.bench import common
from ultrafastbert.utils.io import atomic_write_text

DENSE = "dense"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue-runs", required=True, metavar="NAME=DIR,...",
                   help="`ultrafastbert glue` output folders by model name; one is 'dense'")
    p.add_argument("--stsb", type=Path, nargs="*", default=[],
                   help="convert_structures.py results.json files (STS-B by model name)")
    p.add_argument("--out", type=Path, required=True, help="result folder")
    return p.parse_args(argv)


def load_runs(spec: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    """``NAME=DIR,...`` -> each run's folder and ``results.json``; refuses mixed protocols."""
    runs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for item in filter(None, spec.split(",")):
        if "=" not in item:
            raise SystemExit(f"--glue-runs: {item!r} is not NAME=DIR")
        name, directory = item.split("=", 1)
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--glue-runs: {path} is missing (run `ultrafastbert glue` first)")
        runs[name] = (Path(directory), json.loads(path.read_text(encoding="utf-8")))
    if DENSE not in runs:
        raise SystemExit("--glue-runs needs the dense model's run, named 'dense'")
    protocols = {json.dumps(r["protocol"], sort_keys=True) for _, r in runs.values()}
    if len(protocols) > 1:
        raise SystemExit("the GLUE runs used different protocols: not comparable")
    return runs


def load_stsb(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Model name -> its convert_structures row (``fff``, ``cost_pct``, ``stsb``, ...); the
    dense model as ``dense`` (cost 100%)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows[DENSE] = {"fff": "dense", "cost_pct": 100.0, "stsb": data["dense_stsb"]}
        rows.update({r["model"]: r for r in data["rows"]})
    return rows


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Task -> its median headline score, each seed's, and the headline's name."""
    return {task: {"median": float(s["score"]),
                   "seeds": {int(r["seed"]): float(r["score"]) for r in s["seeds"]},
                   "headline": s["headline"], "baseline": float(s["baseline"]),
                   "other": other_metrics(s)}
            for task, s in results["tasks"].items()}


def other_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The medians (x100) of the task's dev metrics other than the headline (MRPC accuracy)."""
    split, headline = summary["headline"].split("/")
    return {name: 100 * float(v) for name, v in summary["median"].get(split, {}).items()
            if name != headline}


def table_rows(runs: dict[str, tuple[Path, dict[str, Any]]],
               stsb: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, dense first; every task's median as a share of the dense median."""
    dense = task_scores(runs[DENSE][1])
    rows = []
    for name in sorted(runs, key=lambda n: (n != DENSE, stsb.get(n, {}).get("cost_pct", 0))):
        facts = stsb.get(name, {})
        row: dict[str, Any] = {"model": name, "fff": facts.get("fff"),
                               "cost_pct": facts.get("cost_pct"), "stsb": facts.get("stsb"),
                               "tasks": {}}
        for task, score in task_scores(runs[name][1]).items():
            pct = (100 * score["median"] / dense[task]["median"]) if task in dense else None
            other = {name: {"median": v, "pct_of_dense": 100 * v / dense[task]["other"][name]}
                     for name, v in score["other"].items() if name in dense[task]["other"]}
            row["tasks"][task] = {**score, "pct_of_dense": pct, "other": other}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """The results table: medians, seeds, % of dense."""
    head = ["model", "--fff", "cost % of dense FFN", "STS-B"]
    others = {task: sorted(rows[0]["tasks"].get(task, {}).get("other", {})) for task in tasks}
    for task in tasks:
        head += [f"{task} median", f"{task} seeds", f"{task} % of dense"]
        head += [f"{task} {name} median (% of dense)" for name in others[task]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["fff"] or "", _num(row["cost_pct"], 2), _num(row["stsb"], 2)]
        for task in tasks:
            t = row["tasks"].get(task)
            if t is None:
                cells += ["not run"] * (3 + len(others[task]))
                continue
            seeds = " / ".join(f"{t['seeds'][s]:.1f}" for s in sorted(t["seeds"]))
            cells += [f"{t['median']:.1f}", seeds, _num(t["pct_of_dense"], 1)]
            cells += [f"{t['other'][n]['median']:.1f} ({t['other'][n]['pct_of_dense']:.1f})"
                      if n in t["other"] else "" for n in others[task]]
        lines.append("| " + " | ".join(cells) + " |")
    base = rows[0]["tasks"]
    lines.append("| majority class of the training labels | | | | " + " | ".join(
        f"{base[t]['baseline']:.1f} | | {100 * base[t]['baseline'] / base[t]['median']:.1f}"
        + " |" * len(others[t]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.glue_runs)
    rows = table_rows(runs, load_stsb(args.stsb))
    dense = runs[DENSE][1]
    tasks = list(dense["tasks"])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (directory, _) in runs.items():
        target = args.out / "glue" / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ("results.json", "results.md"):
            if (directory / file).is_file():
                shutil.copyfile(directory / file, target / file)
    summary = {"protocol": dense["protocol"], "runtime": dense["runtime"],
               "environment": dense["environment"],  # the fine-tuning runs' machine
               "tabulated_on": common.environment(),
               "runs": {n: str(d) for n, (d, _) in runs.items()},
               "complete": {n: bool(r.get("complete")) for n, (_, r) in runs.items()},
               "seed_spread": {task: {r["model"]: _spread(r, task) for r in rows}
                               for task in tasks},
               "rows": rows}
    atomic_write_text(args.out / "results.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(args.out / "results.md", markdown(rows, tasks))
    print(markdown(rows, tasks))
    return 0


def _spread(row: dict[str, Any], task: str) -> float | None:
    seeds = list(row["tasks"].get(task, {}).get("seeds", {}).values())
    return round(statistics.pstdev(seeds), 2) if len(seeds) > 1 else None


if __name__ == "__main__":
    raise SystemExit(main())
