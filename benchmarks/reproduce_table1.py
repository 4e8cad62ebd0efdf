"""Small-scale reproduction of the UltraFastBERT paper's Table 1 (GLUE dev scores by FF shape).

The paper pretrains crammedBERT-3072/4095 and UltraFastBERT K x D for one GPU-day each and
fine-tunes them on GLUE. This machine cannot; what it can show is the same comparison at small
scale, with one recipe and one clock for every model:

1. pretrain ``tiny-dense`` (4 layers, d 256, dense GELU FF of width 1,023) and FFF variants of
   the same width: ``tiny-fff`` (1x9 = 1,023 neurons), ``tiny-fff-8x6`` (1,016) and
   ``tiny-fff-32x4`` (992), with the crammed recipe and the same wall-clock budget each, on the
   built-in demo corpus (``ultrafastbert.train.pretrain``; one tokenizer, trained once on
   the demo corpus at the presets' 8,192 entries, shared by all);
2. fine-tune each on CoLA, SST-2, MRPC, STS-B and RTE from the GLUE folder with the GLUE-sane
   protocol (``ultrafastbert.glue``), several seeds, optionally on random subsets of the
   training/dev sets (the same subsets for every model) to fit the machine;
3. write ``OUT/results.json`` (everything) and ``OUT/table1.md``: per-task median scores, the
   averages with and without CoLA, each FFF variant's average as a percentage of the dense
   baseline's (the paper claims >= 96%) and the share of the dense model's gain over the trivial
   baseline it keeps, the trivial baseline (majority class / mean score), and the pretraining
   statistics (steps, tokens, held-out MLM loss against the unigram baseline).

Pretrained models and fine-tuning results go to ``--work-dir`` (default ``runs/table1``); a
rerun reuses finished pretraining runs and GLUE runs with the same settings, so changing only
the fine-tuning settings does not pretrain again.

Run from the repository root::

    .venv/bin/python benchmarks/reproduce_table1.py --jobs 2      # ~1.3 h on 2 CPU cores
    .venv/bin/python benchmarks/reproduce_table1.py --budget 20s --seeds 1 --epochs 1 \\
        --max-train-examples 32 --max-eval-examples 32 --out /tmp/t1 --work-dir /tmp/t1w  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ultrafastbert.cli.pretrain import parse_duration
from ultrafastbert.data import open_corpus, save_tokenizer, train_tokenizer
from ultrafastbert.glue import (
    SMALL_TASKS,
    FinetuneRuntime,
    GlueProtocol,
    GlueRunSettings,
    TableRow,
    averages,
    parse_tasks,
    table_markdown,
)
from ultrafastbert.glue.run import RESULTS_JSON, protocol_summary
from ultrafastbert.glue.run import run as run_glue
from ultrafastbert.model import PRESETS, FFFSpec, ModelConfig
from ultrafastbert.train.pretrain import RUN_FILE, SUMMARY_FILE, PretrainSettings
from ultrafastbert.train.pretrain import run as run_pretrain
from ultrafastbert.train.recipe import CrammedRecipe
from ultrafastbert.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("reproduce_table1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = REPO.parent / "shared" / "glue"
DENSE = "tiny-dense"
#: The dense baseline and FFF variants of (about) the same width, 1,023 neurons per layer.
VARIANTS: dict[str, ModelConfig] = {
    DENSE: PRESETS["tiny-dense"],
    "tiny-fff": PRESETS["tiny-fff"],                                   # 1x9: 1023 neurons
    "tiny-fff-8x6": PRESETS["tiny-fff"].replace(ff=FFFSpec(8, 6)),     # 8 x 127 = 1016
    "tiny-fff-32x4": PRESETS["tiny-fff"].replace(ff=FFFSpec(32, 4)),   # 32 x 31 = 992
}
PAPER_CLAIM = 96.0  # "retains at least 96.0% of the downstream predictive performance"
#: Points of average score (without CoLA) by which tiny-dense must beat the trivial baseline
#: before the FFF variants' percentages of it are judged against the paper's claim.
MIN_GAIN = 2.0


@dataclass(frozen=True)
class Settings:
    """Everything the reproduction needs (see ``--help`` for each field)."""

    out_dir: Path
    work_dir: Path
    glue_dir: Path
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    budget_s: float
    micro_batch: int
    batch_size: int
    pretrain_seed: int
    protocol: GlueProtocol
    threads: int

    def pretrain_dir(self, name: str) -> Path:
        """Where model ``name`` is pretrained."""
        return self.work_dir / "pretrain" / name

    def glue_out(self, name: str) -> Path:
        """Where model ``name`` is fine-tuned: one folder per fine-tuning protocol, so a rerun
        with other fine-tuning settings keeps the earlier results."""
        text = json.dumps(self.protocol.to_dict(), sort_keys=True)
        return self.work_dir / "glue" / hashlib.sha1(text.encode()).hexdigest()[:8] / name


# ------------------------------------------------------------------------------ pipeline
def main(argv: list[str] | None = None) -> int:
    """Pretrain, fine-tune, tabulate (the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    s = settings_from_args(args)
    torch.set_num_threads(s.threads)
    started = time.monotonic()
    shared_tokenizer(s)
    if args.jobs > 1:
        run_in_parallel(s, args.jobs, sys.argv[1:] if argv is None else argv)
    pretrained = {name: pretrain(s, name) for name in s.models}
    glue = {name: finetune(s, name) for name in s.models}
    report = build_report(s, pretrained, glue, time.monotonic() - started)
    atomic_write_json(s.out_dir / "results.json", report)
    atomic_write_text(s.out_dir / "table1.md", table1_markdown(report))
    print(table1_markdown(report))
    print(f"wrote {s.out_dir / 'results.json'} and {s.out_dir / 'table1.md'}")
    return 0


def model_groups(models: tuple[str, ...], jobs: int) -> list[tuple[str, ...]]:
    """``models`` cut into at most ``jobs`` consecutive groups of (nearly) equal size."""
    size = -(-len(models) // max(jobs, 1))
    return [models[i:i + size] for i in range(0, len(models), size)]


def run_in_parallel(s: Settings, jobs: int, argv: list[str]) -> None:
    """Pretrain and fine-tune the model groups in ``jobs`` child processes at once (each with
    ``--threads`` threads, one group after another inside a child), then return: the caller
    reuses their finished steps and writes the table. Exits if a child fails."""
    base = argv
    for name in ("--models", "--out", "--jobs"):
        base = _without_option(base, name)
    children = []
    for i, group in enumerate(model_groups(s.models, jobs)):
        log_path = s.work_dir / f"job-{i}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--models", ",".join(group),
               "--out", str(s.work_dir / f"job-{i}")]
        log.info("job %d (%s): log in %s", i, ",".join(group), log_path)
        with open(log_path, "w", encoding="utf-8") as out:
            children.append((group, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)))
    failed = [",".join(group) for group, child in children if child.wait() != 0]
    if failed:
        raise SystemExit(f"the job(s) for {failed} failed; see {s.work_dir}/job-*.log")


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def shared_tokenizer(s: Settings) -> Path:
    """``WORK/tokenizer.json``: one WordPiece tokenizer for every model, trained once on the
    demo corpus at the presets' vocabulary size (training is not bit-reproducible, so it is
    kept and reused rather than retrained per model)."""
    path = s.work_dir / "tokenizer.json"
    if not path.is_file():
        vocab = VARIANTS[s.models[0]].vocab_size
        log.info("training the shared %d-entry tokenizer on the demo corpus", vocab)
        save_tokenizer(train_tokenizer(open_corpus(None).batches(), vocab_size=vocab), path)
    return path


def pretrain(s: Settings, name: str) -> dict[str, Any]:
    """Pretrain ``name`` (or reuse a finished run with the same settings); its summary."""
    settings = pretrain_settings(s, name)
    if finished_pretraining(settings):
        log.info("%s: reusing the finished pretraining run in %s", name, settings.out_dir)
    else:
        if settings.out_dir.exists():
            log.info("%s: removing the unfinished or different run in %s", name,
                     settings.out_dir)
            shutil.rmtree(settings.out_dir)
        run_pretrain(settings)
    return json.loads((settings.out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))


def pretrain_settings(s: Settings, name: str) -> PretrainSettings:
    """The crammed recipe on the demo corpus for ``budget_s`` seconds, the shared tokenizer."""
    return PretrainSettings(
        out_dir=s.pretrain_dir(name), model=VARIANTS[name], model_name=name,
        tokenizer=s.work_dir / "tokenizer.json", recipe=CrammedRecipe(micro_batch=s.micro_batch,
                                                  target_batch=s.batch_size),
        budget_s=s.budget_s, seed=s.pretrain_seed, save_every_s=None, progress_bar=True)


def finished_pretraining(settings: PretrainSettings) -> bool:
    """Whether ``settings.out_dir`` holds a finished run with the same settings."""
    run_file, summary = settings.out_dir / RUN_FILE, settings.out_dir / SUMMARY_FILE
    if not (run_file.is_file() and summary.is_file()):
        return False
    saved = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
    return saved == json.loads(json.dumps(settings.result_settings()))


def finetune(s: Settings, name: str) -> dict[str, Any]:
    """GLUE results of ``name`` (reused when a finished run has the same protocol)."""
    out = s.glue_out(name)
    previous = out / RESULTS_JSON
    if previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        same = (old.get("complete") and old["protocol"] == s.protocol.to_dict()
                and old["task_names"] == list(s.tasks))
        if same:
            log.info("%s: reusing the GLUE results in %s", name, out)
            return old
    if out.exists():
        shutil.rmtree(out)
    return run_glue(GlueRunSettings(
        model_dir=s.pretrain_dir(name), glue_dir=s.glue_dir, out_dir=out, tasks=s.tasks,
        protocol=s.protocol, runtime=FinetuneRuntime(progress_bar=True), save_models="none",
        model_name=name))


# -------------------------------------------------------------------------------- report
def build_report(s: Settings, pretrained: dict[str, dict[str, Any]],
                 glue: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """``results.json``: settings, per-model pretraining and GLUE results, the table rows."""
    first = glue[s.models[0]]["tasks"]
    baseline = {task: summary["baseline"] for task, summary in first.items()}
    models = {name: model_entry(name, pretrained[name], glue[name], glue.get(DENSE), baseline)
              for name in s.models}
    return {"format": 1, "command": " ".join(["benchmarks/reproduce_table1.py", *sys.argv[1:]]),
            "settings": settings_json(s), "seconds": seconds,
            "compute_seconds": compute_seconds(pretrained, glue), "environment": environment(),
            "tasks": list(s.tasks), "baseline": {"scores": baseline,
                                                 "average": averages(baseline)},
            "models": models, "glue": glue, "pretraining": pretrained}


def compute_seconds(pretrained: dict[str, dict[str, Any]], glue: dict[str, dict[str, Any]]
                    ) -> dict[str, float]:
    """Seconds spent pretraining and fine-tuning + evaluating, over all models (including
    steps a rerun reused, which ``seconds`` does not count)."""
    fine = sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0)
               for g in glue.values() for summary in g["tasks"].values()
               for r in summary["seeds"])
    return {"pretraining": sum(p.get("train_seconds", 0.0) for p in pretrained.values()),
            "fine_tuning": fine}


def model_entry(name: str, pretrained: dict[str, Any], glue: dict[str, Any],
                dense: dict[str, Any] | None, baseline: dict[str, float]) -> dict[str, Any]:
    """One model's row: scores, spread over seeds, averages and comparisons with dense."""
    scores = {task: summary["score"] for task, summary in glue["tasks"].items()}
    spread = {task: [min(r["score"] for r in summary["seeds"]),
                     max(r["score"] for r in summary["seeds"])]
              for task, summary in glue["tasks"].items()}
    avg = averages(scores)
    entry = {"config": VARIANTS[name].to_dict(), "neurons": VARIANTS[name].ff.neurons,
             "active_neurons": VARIANTS[name].ff.active_neurons, "scores": scores,
             "seed_range": spread, "average": avg}
    if dense is not None:
        dense_avg = averages({t: v["score"] for t, v in dense["tasks"].items()})
        base_avg = averages(baseline)
        for key in ("without_cola", "with_cola"):
            entry[f"percent_of_dense_{key}"] = percent(avg[key], dense_avg[key])
            entry[f"gain_retained_{key}"] = gain_retained(avg[key], dense_avg[key],
                                                          base_avg[key])
    return entry


def percent(value: float | None, reference: float | None) -> float | None:
    """``100 * value / reference`` (None when undefined or the reference is not positive)."""
    if value is None or reference is None or reference <= 0:
        return None
    return 100.0 * value / reference


def gain_retained(value: float | None, dense: float | None, base: float | None) -> float | None:
    """Share (%) of the dense model's improvement over the trivial baseline that ``value``
    keeps; None when the dense model does not beat the baseline (nothing to keep)."""
    if value is None or dense is None or base is None or dense <= base:
        return None
    return 100.0 * (value - base) / (dense - base)


def table1_markdown(report: dict[str, Any]) -> str:
    """``table1.md``: the Table-1-like table, pretraining statistics, protocol, caveats."""
    rows = [TableRow(name, m["scores"], m["neurons"], m["active_neurons"], extra_columns(m))
            for name, m in report["models"].items()]
    rows.append(TableRow("majority / mean baseline", report["baseline"]["scores"]))
    s = report["settings"]
    return "\n".join([
        "# Table 1 at small scale: GLUE dev scores of equal-width dense and FFF models", "",
        table_markdown(rows, report["tasks"]),
        f"Median over {len(s['protocol']['seeds'])} fine-tuning seed(s); scores x100 (CoLA "
        "Matthews, MRPC F1, STS-B Spearman, others accuracy). Avg leaves out CoLA. "
        "\"% dense\": the average as a percentage of tiny-dense's (the paper claims >= 96% "
        "for UltraFastBERT); \"gain kept\": the share of tiny-dense's improvement over the "
        "trivial baseline that the model keeps (– when tiny-dense does not beat the baseline).",
        "", pretraining_markdown(report), "", verdict(report), "",
        f"Fine-tuning: {protocol_summary(s['protocol'])}.", "",
        f"Pretraining: crammed recipe, {s['budget_s']:.0f} s of training per model on the demo "
        f"corpus, micro-batch {s['micro_batch']}, batch ramped to {s['batch_size']}, seed "
        f"{s['pretrain_seed']}; torch threads {s['threads']}.", "",
        f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min for this "
        f"invocation; {compute_note(report)}; {report['environment']['platform']}, torch "
        f"{report['environment']['torch']}).", ""])


def compute_note(report: dict[str, Any]) -> str:
    """Pretraining and fine-tuning time over all models (reused steps included)."""
    spent = report.get("compute_seconds") or {}
    return (f"pretraining {spent.get('pretraining', 0.0) / 60:.0f} min and fine-tuning "
            f"{spent.get('fine_tuning', 0.0) / 60:.0f} min of compute over all models")


def extra_columns(model: dict[str, Any]) -> dict[str, str]:
    """The comparison columns of one model."""
    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}%"

    return {"% dense": fmt(model.get("percent_of_dense_without_cola")),
            "% dense (w/ CoLA)": fmt(model.get("percent_of_dense_with_cola")),
            "gain kept": fmt(model.get("gain_retained_without_cola"))}


def pretraining_markdown(report: dict[str, Any]) -> str:
    """Per model: parameters, steps, tokens, throughput, held-out MLM loss vs unigram."""
    lines = ["| Model | params | steps | tokens | tokens/s | MLM loss | MLM acc | unigram loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in report["pretraining"].items():
        held, uni = p.get("heldout") or {}, p.get("unigram_baseline") or {}
        lines.append(f"| {name} | {p['parameters'] / 1e6:.2f} M | {p['steps']:,} | "
                     f"{p['tokens'] / 1e6:.2f} M | {p['tokens_per_s']:,.0f} | "
                     f"{held.get('loss', float('nan')):.3f} | "
                     f"{100 * held.get('accuracy', float('nan')):.1f}% | "
                     f"{uni.get('loss', float('nan')):.3f} |")
    return "\n".join(lines)


def verdict(report: dict[str, Any]) -> str:
    """One sentence per FFF variant: does it keep >= 96% of the dense average? Preceded by a
    warning when the dense model does not beat the trivial baseline (then the percentages
    compare noise, not learned ability)."""
    out = []
    dense = report["models"].get(DENSE, {}).get("average", {}).get("without_cola")
    base = report["baseline"]["average"]["without_cola"]
    learned = dense is not None and base is not None and dense - base >= MIN_GAIN
    if dense is not None and base is not None and not learned:
        out.append(f"Caution: tiny-dense does not beat the trivial baseline by {MIN_GAIN:.0f} "
                   f"points on average ({dense:.1f} vs {base:.1f}), so the percentages below compare "
                   "noise, not learned ability, and are not judged against the paper's claim; "
                   "pretrain longer (--budget) or fine-tune on more examples.")
    for name, m in report["models"].items():
        share = m.get("percent_of_dense_without_cola")
        if name == DENSE or share is None:
            continue
        line = f"- {name}: {share:.1f}% of tiny-dense's average without CoLA"
        if learned:
            holds = "meets" if share >= PAPER_CLAIM else "does not meet"
            line += f"; {holds} the paper's >= {PAPER_CLAIM:.0f}%"
        out.append(line + ".")
    return "\n".join(out) if out else "(no FFF variant or no tiny-dense to compare with)"


def settings_json(s: Settings) -> dict[str, Any]:
    """JSON-ready settings."""
    out = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    out["protocol"] = s.protocol.to_dict()
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def environment() -> dict[str, Any]:
    """Versions and machine (CPU model, speed flags, cores: ``bench.common.environment``),
    for the record."""
    from ultrafastbert.bench.common import environment as base

    return {**base("cpu", dtypes=["float32"]), "processor": platform.processor(),
            "finished_unix": int(time.time())}


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (defaults: the measured table in docs/glue.md; about 1.3 hours on two
    CPU cores with ``--jobs 2``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "table1",
                   help="where results.json and table1.md go")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "table1",
                   help="pretrained models and GLUE runs (reused by reruns)")
    p.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help="GLUE TSV folder")
    p.add_argument("--models", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--tasks", default=",".join(SMALL_TASKS), help="comma-separated GLUE tasks")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("20m"),
                   help="pretraining wall-clock budget per model (e.g. 90s, 6m, 1h)")
    p.add_argument("--micro-batch", type=int, default=16, help="pretraining micro-batch")
    p.add_argument("--batch-size", type=int, default=64,
                   help="pretraining batch at the end of the ramp")
    p.add_argument("--pretrain-seed", type=int, default=0, help="pretraining seed")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per task")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (protocol: 5)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="fine-tuning peak learning rate (default 1e-3; the protocol's 4e-5 is "
                        "tuned for BERT-base, and these 5 M-parameter models learn nothing "
                        "measurable with it in 3 epochs)")
    p.add_argument("--max-train-examples", type=int, default=1000,
                   help="random training subset per task (0: all)")
    p.add_argument("--max-eval-examples", type=int, default=500,
                   help="random dev subset per task (0: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="model groups run at once in child processes, each with --threads "
                        "threads (2 on a 2-core machine: tiny-dense and tiny-fff in one, the "
                        "others in the other); the budget is then shared wall-clock time")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for these tiny models on a shared machine)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated :class:`Settings`."""
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in VARIANTS]
    if unknown or not models:
        raise SystemExit(f"unknown model variant(s) {unknown}; choose among {list(VARIANTS)}")
    if not args.glue_dir.is_dir():
        raise SystemExit(f"GLUE folder {args.glue_dir} does not exist; pass --glue-dir")
    protocol = GlueProtocol(epochs=args.epochs, lr=args.lr, seeds=tuple(range(args.seeds)),
                            max_train_examples=args.max_train_examples or None,
                            max_eval_examples=args.max_eval_examples or None)
    return Settings(out_dir=args.out, work_dir=args.work_dir, glue_dir=args.glue_dir,
                    models=models, tasks=tuple(t.name for t in parse_tasks(args.tasks)),
                    budget_s=args.budget, micro_batch=args.micro_batch,
                    batch_size=args.batch_size, pretrain_seed=args.pretrain_seed,
                    protocol=protocol, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
