"""The GLUE pipeline: fine-tune a model directory on each task and seed, evaluate, report.

:func:`run` reads as the table of contents::

    resolve the tasks (default: every GLUE task in the folder) and the model's tokenizer
    read every task's files (fail before any training); claim the output folder
    for each task: tokenise; for each seed: load the encoder -> fine-tune -> evaluate -> save
        summarise the task (medians over seeds, trivial baseline), keep the chosen models,
        rewrite results.json (so a long run shows its progress and keeps finished tasks)
    write results.json (complete) and results.md (a table laid out like the paper's Table 1)

``OUT/results.json`` holds every task, every seed, every metric, the medians, the trivial
baseline, and the averages with and without CoLA; ``OUT/models/TASK/seed-N`` the fine-tuned
models kept (``--save-models``), loadable by ``from_pretrained`` and ``ultrafastbert predict``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, Interrupted, NotFoundError, OutputExistsError
from ..model.checkpoint import TOKENIZER_NAME, read_config, tokenizer_file
from ..utils.device import require_device
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.lock import LOCK_FILE, DirectoryLock
from ..utils.machine import run_facts
from ..utils.options import comma_list, nested, option
from . import transformers_models
from .data import (
    EncodedSplit,
    GlueTaskData,
    available_tasks,
    encode_split,
    load_task,
    missing_files,
)
from .finetune import (
    FinetuneRuntime,
    GlueProtocol,
    evaluate,
    finetune,
    load_classifier,
    save_finetuned,
)
from .metrics import (
    SplitMetrics,
    compute_metrics,
    headline_score,
    median_metrics,
    trivial_baseline_name,
    trivial_predictions,
)
from .tasks import TASKS, GlueTask, parse_tasks, table_order

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
MODELS_DIR = "models"
RESULTS_FORMAT = 1
SAVE_MODELS = ("all", "median", "none")


@dataclass(frozen=True)
class GlueRunSettings:
    """One ``ultrafastbert glue`` run.

    Attributes:
        model_dir: the model directory to start from (with ``tokenizer.json``).
        glue_dir: the GLUE folder (TSV layout or saved Hugging Face datasets, per task).
        out_dir: where ``results.json``, ``results.md`` and ``models/`` go (new or empty).
        tasks: task names; None runs every GLUE task found in ``glue_dir``.
        protocol: what is computed (GLUE-sane defaults).
        runtime: device, precision, eval batch size, progress bar.
        save_models: keep ``all`` fine-tuned models, the ``median`` seed's per task, or ``none``.
        model_name: the model's row label in ``results.md`` (default: the folder name).
    """

    model_dir: Path = option(flags="--model", parse=Path, metavar="DIR",
                             help="model directory (config.json, weights, tokenizer.json)")
    glue_dir: Path = option(parse=Path, metavar="DIR",
                            help="GLUE folder: TASK/train.tsv + TASK/dev.tsv "
                                 "(download_glue_data.py layout) or datasets saved with "
                                 "save_to_disk, one folder per task")
    out_dir: Path = option(flags="--out", parse=Path, metavar="DIR",
                           help="output directory (new or empty)")
    tasks: tuple[str, ...] | None = option(
        None, parse=comma_list(str), metavar="LIST",
        help="comma-separated tasks, e.g. RTE,STS-B (default: every task in --glue-dir); "
             "CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI")
    protocol: GlueProtocol = nested(GlueProtocol, group="protocol (defaults: GLUE-sane)")
    runtime: FinetuneRuntime = nested(FinetuneRuntime, group="runtime")
    save_models: str = option("median", choices=SAVE_MODELS, group="runtime",
                              help="fine-tuned models to keep: all, the median seed's per "
                                   "task, none")
    model_name: str | None = option(None, flags="--name", group="runtime",
                                    help="the model's name in results.md (default: the "
                                         "model directory's name)")

    def __post_init__(self) -> None:
        for name in ("model_dir", "glue_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.save_models not in SAVE_MODELS:
            raise ConfigError(f"save_models must be one of {SAVE_MODELS}, got "
                              f"{self.save_models!r}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(t.name for t in parse_tasks(self.tasks)))

    @property
    def name(self) -> str:
        """The row label of the model."""
        return self.model_name or self.model_dir.resolve().name


# ---------------------------------------------------------------------------- pipeline
def run(settings: GlueRunSettings) -> dict[str, Any]:
    """Fine-tune and evaluate as the module docstring describes; returns ``results.json``."""
    tasks = resolve_tasks(settings)
    hf = transformers_models.model_type_of(settings.model_dir) is not None
    tokenizer_file = (settings.model_dir / TOKENIZER_NAME if hf
                      else model_tokenizer(settings.model_dir))
    results = new_results(settings, tasks)
    check_settings_fit(settings, results["model"])
    data = {t.name: load_task_data(settings, t) for t in tasks}
    tokenizer = (transformers_models.load_tokenizer(settings.model_dir) if hf else
                 load_checked_tokenizer(tokenizer_file, results["model"]["vocab_size"]))
    with DirectoryLock(settings.out_dir, "glue"):  # no second run writes into OUT meanwhile
        claim_output_dir(settings.out_dir)
        try:
            run_tasks(settings, tasks, data, tokenizer, tokenizer_file, results)
        except Interrupted:
            raise Interrupted(interrupted_message(settings, tasks, results)) from None
        results["complete"] = True
        atomic_write_json(settings.out_dir / RESULTS_JSON, results)
        atomic_write_text(settings.out_dir / RESULTS_MD, results_markdown(results))
    return results


def run_tasks(settings: GlueRunSettings, tasks: Sequence[GlueTask],
              data: dict[str, GlueTaskData], tokenizer: Any, tokenizer_file: Path,
              results: dict[str, Any]) -> None:
    """Every task in turn; ``results.json`` is rewritten after each (finished tasks kept)."""
    n_runs = len(tasks) * len(settings.protocol.seeds)
    with _progress(n_runs, settings.runtime.progress_bar) as tick:
        for task in tasks:
            results["tasks"][task.name] = run_task(settings, data[task.name], tokenizer,
                                                   tokenizer_file, tick)
            results["average"] = averages(task_scores(results["tasks"], "score"))
            results["baseline_average"] = averages(task_scores(results["tasks"], "baseline"))
            atomic_write_json(settings.out_dir / RESULTS_JSON, results)


def interrupted_message(settings: GlueRunSettings, tasks: Sequence[GlueTask],
                        results: dict[str, Any]) -> str:
    """What a Ctrl-C kept (the finished tasks in ``results.json``) and how to finish."""
    finished = list(results["tasks"])
    left = [t.name for t in tasks if t.name not in finished]
    kept = (f"{settings.out_dir / RESULTS_JSON} keeps the finished task(s) "
            f"{', '.join(finished)}" if finished else "no task had finished")
    return (f"interrupted during {left[0]} (fine-tuning runs are not checkpointed); {kept}. "
            f"To finish, run the same command with --tasks {','.join(left)} and a new --out")


def run_task(settings: GlueRunSettings, data: GlueTaskData, tokenizer: Any,
             tokenizer_file: Path, tick: Callable[[str], None]) -> dict[str, Any]:
    """Every seed of one task, then its summary (and the models kept)."""
    task, protocol = data.task, settings.protocol
    train = encode_split(data.train, tokenizer, protocol.max_length)
    evals = {name: encode_split(split, tokenizer, protocol.max_length)
             for name, split in data.evals.items()}
    runs = []
    for seed in protocol.seeds:
        runs.append(run_seed(settings, task, train, evals, seed, tokenizer_file))
        tick(f"{task.name} seed {seed}: {runs[-1]['score']:.1f}")
    summary = summarize_task(task, data, runs)
    summary["model_dir"] = keep_models(settings, task, runs, summary["score"])
    return summary


def run_seed(settings: GlueRunSettings, task: GlueTask, train: EncodedSplit,
             evals: dict[str, EncodedSplit], seed: int, tokenizer_file: Path
             ) -> dict[str, Any]:
    """Load the encoder -> fine-tune -> evaluate -> save, for one seed."""
    protocol, runtime = settings.protocol, settings.runtime
    load = (transformers_models.load_classifier
            if transformers_models.model_type_of(settings.model_dir) else load_classifier)
    model = load(settings.model_dir, task, protocol, seed, runtime.device)
    trained = finetune(model, train, protocol, seed, runtime, f"{task.name} seed {seed}")
    started = time.monotonic()
    metrics = evaluate(model, task, evals, runtime.eval_batch_size)
    eval_seconds = time.monotonic() - started
    model_dir = None
    if settings.save_models != "none":
        model_dir = Path(MODELS_DIR) / task.name / f"seed-{seed}"
        save_finetuned(model, settings.out_dir / model_dir, tokenizer_file)
    log.info("%s seed %d: %s", task.name, seed, metrics)
    return {"seed": seed, "metrics": metrics, "score": headline_score(task, metrics),
            "train_loss": trained.train_loss, "steps": trained.steps,
            "train_seconds": trained.train_seconds, "eval_seconds": eval_seconds,
            "model_dir": None if model_dir is None else str(model_dir)}


# ------------------------------------------------------------------------------ inputs
def resolve_tasks(settings: GlueRunSettings) -> tuple[GlueTask, ...]:
    """The tasks asked for, or every task with all its files in the GLUE folder (the others
    are skipped with a warning)."""
    if settings.tasks is not None:
        return parse_tasks(settings.tasks)
    if not settings.glue_dir.is_dir():
        raise NotFoundError(f"GLUE folder {settings.glue_dir} does not exist; pass "
                            "--glue-dir DIR with one sub-folder per task")
    present = available_tasks(settings.glue_dir)
    complete = [n for n in present if not missing_files(settings.glue_dir, TASKS[n])]
    for name in sorted(set(present) - set(complete), key=present.index):
        log.warning("skipping %s: %s lacks %s", name, settings.glue_dir,
                    ", ".join(missing_files(settings.glue_dir, TASKS[name])))
    if not complete:
        raise NotFoundError(f"{settings.glue_dir} holds no complete GLUE task folder "
                            f"(expected e.g. RTE/train.tsv and RTE/dev.tsv; known tasks: "
                            f"{', '.join(TASKS)})")
    log.info("tasks found in %s: %s", settings.glue_dir, ", ".join(complete))
    return parse_tasks(complete)


def check_settings_fit(settings: GlueRunSettings, model: dict[str, Any]) -> None:
    """Checks that would otherwise fail only once training starts: the device exists, the
    protocol's ``max_length`` fits the model."""
    require_device(settings.runtime.device)
    max_length, max_seq_len = settings.protocol.max_length, model["max_seq_len"]
    if max_length > max_seq_len:
        raise InputError(f"--max-length {max_length} exceeds the model's max_seq_len "
                         f"{max_seq_len} ({settings.model_dir}/config.json); pass --max-length "
                         f"{max_seq_len} or less")


def model_tokenizer(model_dir: Path) -> Path:
    """``model_dir/tokenizer.json``, or an error that says how to provide one."""
    read_config(model_dir)  # a clear error for a missing or broken model directory
    path = tokenizer_file(model_dir) or model_dir / TOKENIZER_NAME
    if not path.is_file():
        raise NotFoundError(f"model directory {model_dir} has no {TOKENIZER_NAME}; copy the "
                            "tokenizer the model was pretrained with into it (pretraining "
                            "writes OUT/tokenizer.json)")
    return path


def load_checked_tokenizer(path: Path, vocab_size: int) -> Any:
    """The tokenizer, checked to fit the model's vocabulary."""
    from ..data import load_tokenizer

    tokenizer = load_tokenizer(path)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ConfigError(f"{path} has {tokenizer.get_vocab_size()} entries but the model's "
                          f"vocabulary is {vocab_size}: it is not this model's tokenizer")
    return tokenizer


def load_task_data(settings: GlueRunSettings, task: GlueTask) -> GlueTaskData:
    """A task's splits, subsampled as the protocol says."""
    p = settings.protocol
    return load_task(settings.glue_dir, task, max_train=p.max_train_examples,
                     max_eval=p.max_eval_examples, subset_seed=p.subset_seed)


def claim_output_dir(out: Path) -> None:
    """Use a new or empty ``out``; never mix two runs' results."""
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        what = "GLUE results" if (out / RESULTS_JSON).exists() else "files"
        raise OutputExistsError(f"output directory {out} already holds {what}; choose a new "
                                "--out or remove it")
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- results
def new_results(settings: GlueRunSettings, tasks: Sequence[GlueTask]) -> dict[str, Any]:
    """The skeleton of ``results.json``: settings, model, environment; no task yet."""
    return {"format": RESULTS_FORMAT, "command": "glue", "complete": False,
            "model": describe_model(settings), "glue_dir": str(settings.glue_dir),
            "task_names": [t.name for t in tasks], "protocol": settings.protocol.to_dict(),
            "runtime": settings.runtime.to_dict(), "save_models": settings.save_models,
            "environment": environment(), "tasks": {}, "average": averages({}),
            "baseline_average": averages({})}


def describe_model(settings: GlueRunSettings) -> dict[str, Any]:
    """Name, folder and feed-forward shape of the starting model."""
    if transformers_models.model_type_of(settings.model_dir) is not None:
        return transformers_models.describe(settings.model_dir, settings.name)
    config, class_name, released = read_config(settings.model_dir)
    return {"name": settings.name, "dir": str(settings.model_dir), "class": class_name,
            "released_format": released, "ff": config.ff.to_dict(),
            "neurons": config.ff.neurons, "active_neurons": config.ff.active_neurons,
            "n_layers": config.n_layers, "d_model": config.d_model,
            "vocab_size": config.vocab_size, "max_seq_len": config.max_seq_len}


def environment() -> dict[str, Any]:
    """Versions, threads and the CPU (:func:`~ultrafastbert.utils.machine.run_facts`)."""
    return {**run_facts(), "started_unix": int(time.time())}


def summarize_task(task: GlueTask, data: GlueTaskData, runs: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Medians over seeds (every metric, and the headline score) and the trivial baseline."""
    median = median_metrics([r["metrics"] for r in runs])
    baseline = trivial_baseline(task, data)
    return {"task": task.name, "headline": task.headline_name,
            "labels": list(task.labels), "n_train": len(data.train),
            "n_eval": {name: len(split) for name, split in data.evals.items()},
            "sources": {"train": data.train.source,
                        **{name: split.source for name, split in data.evals.items()}},
            "seeds": runs, "median": median,
            "score": float(statistics.median(r["score"] for r in runs)),
            "baseline": baseline["score"], "baseline_detail": baseline,
            "in_average": task.in_average}


def trivial_baseline(task: GlueTask, data: GlueTaskData) -> dict[str, Any]:
    """Metrics of the majority class (mean score for STS-B) of the training labels."""
    train_labels = data.train.labels()
    metrics: SplitMetrics = {}
    for name, split in data.evals.items():
        predictions = trivial_predictions(task, train_labels, len(split))
        metrics[name] = compute_metrics(task, predictions, split.labels())
    return {"kind": trivial_baseline_name(task), "metrics": metrics,
            "score": headline_score(task, metrics)}


def keep_models(settings: GlueRunSettings, task: GlueTask, runs: list[dict[str, Any]],
                median_score: float) -> str | None:
    """Apply ``save_models``: with ``median``, keep only the seed whose score is closest to the
    median (the first such seed); returns the kept (or first) model's folder."""
    if settings.save_models == "none":
        return None
    if settings.save_models == "all":
        return runs[0]["model_dir"]
    kept = min(runs, key=lambda r: abs(r["score"] - median_score))
    for r in runs:
        if r is not kept:
            shutil.rmtree(settings.out_dir / r["model_dir"], ignore_errors=True)
            r["model_dir"] = None
    return kept["model_dir"]


def task_scores(tasks: dict[str, dict[str, Any]], key: str) -> dict[str, float]:
    """``{task: tasks[task][key]}`` (``score`` or ``baseline``)."""
    return {name: summary[key] for name, summary in tasks.items()}


def averages(scores: dict[str, float]) -> dict[str, Any]:
    """Means of the task scores, as the paper's two "Avg" columns: without CoLA (the tasks
    that count in averages; WNLI does not) and with CoLA (None when CoLA was not run)."""
    counted = [n for n in scores if TASKS[n].in_average]
    without = [n for n in counted if n != "CoLA"]

    def mean(names: list[str]) -> float | None:
        return float(statistics.fmean(scores[n] for n in names)) if names else None

    return {"without_cola": mean(without), "with_cola": mean(counted) if "CoLA" in counted
            else None, "tasks_without_cola": table_order(without),
            "tasks_with_cola": table_order(counted) if "CoLA" in counted else []}


# ---------------------------------------------------------------------------- markdown
@dataclass(frozen=True)
class TableRow:
    """One row of a Table-1-like table: a model (or baseline) and its task scores."""

    name: str
    scores: dict[str, float]
    neurons: int | None = None
    active_neurons: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_markdown(rows: Sequence[TableRow], tasks: Sequence[str]) -> str:
    """A Markdown table laid out like the paper's Table 1: model, N_T, N_I/N_T, the tasks
    that count in the average, Avg, CoLA, Avg with CoLA, then WNLI and any ``extra`` columns."""
    ordered = table_order(list(tasks))
    main = [t for t in ordered if t != "CoLA" and TASKS[t].in_average]
    tail = [t for t in ordered if not TASKS[t].in_average]
    extra = list(dict.fromkeys(k for r in rows for k in r.extra))
    head = ["Model", "N_T", "N_I/N_T", *main, "Avg"]
    head += ["CoLA", "Avg (w/ CoLA)"] if "CoLA" in ordered else []
    lines = ["| " + " | ".join(head + tail + extra) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) + len(tail) + len(extra) - 1)) + "|"]
    for row in rows:
        avg = averages({t: row.scores[t] for t in ordered if t in row.scores})
        share = (f"{100 * row.active_neurons / row.neurons:.1f}%" if row.neurons else "–")
        cells = [row.name, str(row.neurons or "–"), share,
                 *(_fmt(row.scores.get(t)) for t in main), _fmt(avg["without_cola"])]
        if "CoLA" in ordered:
            cells += [_fmt(row.scores.get("CoLA")), _fmt(avg["with_cola"])]
        cells += [_fmt(row.scores.get(t)) for t in tail] + [row.extra.get(k, "") for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the model's row and the trivial baseline's, with a legend."""
    tasks, model, protocol = results["tasks"], results["model"], results["protocol"]
    rows = [TableRow(model["name"], task_scores(tasks, "score"), model["neurons"],
                     model["active_neurons"]),
            TableRow("majority / mean baseline", task_scores(tasks, "baseline"))]
    legend = ", ".join(f"{name} {TASKS[name].headline[1]}" for name in table_order(list(tasks)))
    return (f"# GLUE dev results: {model['name']}\n\n"
            + table_markdown(rows, list(tasks))
            + f"\nScores x100, median over {len(protocol['seeds'])} seed(s) "
              f"{protocol['seeds']}. Metrics: {legend}. N_T: feed-forward neurons per layer; "
              "N_I/N_T: share a token evaluates. Avg leaves out CoLA (and WNLI).\n"
            + f"\nProtocol: {protocol_summary(protocol)}.\n")


def protocol_summary(protocol: dict[str, Any]) -> str:
    """One line describing the fine-tuning protocol."""
    p = protocol
    subset = []
    if p["max_train_examples"]:
        subset.append(f"at most {p['max_train_examples']} training examples")
    if p["max_eval_examples"]:
        subset.append(f"at most {p['max_eval_examples']} eval examples")
    text = (f"{p['epochs']} epochs, lr {p['lr']:g}, batch {p['batch_size']}, AdamW "
            f"{tuple(p['betas'])} eps {p['eps']:g} wd {p['weight_decay']:g}, cosine with "
            f"{p['warmup']:.0%} warm-up, max length {p['max_length']}, {p['pooler']}-token "
            f"pooling, dropout {p['dropout']:g}")
    return text + ("; " + ", ".join(subset) + f" (subset seed {p['subset_seed']})"
                   if subset else "")


# ------------------------------------------------------------------------ progress bar
@contextmanager
def _progress(total: int, enabled: bool):
    """A ``tick(message)`` callable advancing a tqdm bar over (task, seed) runs."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="GLUE", unit="run", dynamic_ncols=True)
        except ImportError:
            log.warning("tqdm is not installed: no progress bar (pip install tqdm)")

    def tick(message: str) -> None:
        if bar is not None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(1)

    try:
        yield tick
    finally:
        if bar is not None:
            bar.close()


def settings_to_json(settings: GlueRunSettings) -> dict[str, Any]:
    """JSON-ready settings (for scripts that record what they ran)."""
    out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    out.update(protocol=settings.protocol.to_dict(), runtime=settings.runtime.to_dict())
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
