"""The nine GLUE tasks as data: where their text and labels are, and how they are scored.

Each :class:`GlueTask` says how to read the task from the standard GLUE TSV folder layout (the
one ``download_glue_data.py`` writes: ``TASK/train.tsv`` and ``TASK/dev.tsv``, MNLI with
``dev_matched.tsv`` and ``dev_mismatched.tsv``) and from a Hugging Face ``glue`` dataset saved
with ``save_to_disk``; its labels (in the Hugging Face ``glue`` order, so both sources agree);
its metrics; and its *headline* score, the one number a results table shows.

Headline scores follow the BERT paper's convention, which crammedBERT and UltraFastBERT tables
use: Matthews correlation for CoLA, F1 for MRPC and QQP, Spearman correlation for STS-B, and
accuracy elsewhere (MNLI: the matched dev set). WNLI is scored but left out of averages, as in
BERT and the UltraFastBERT paper (its dev set is adversarial to the train set).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

#: Metric names computed by :mod:`ultrafastbert.glue.metrics`.
METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields are in its GLUE TSV files.

    Columns are header names, or 0-based column indices for files without a header (CoLA).
    """

    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation set of a task: its name in results, its TSV file and its HF split."""

    name: str
    tsv_file: str
    hf_split: str


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task.

    Attributes:
        name: canonical name and folder of the GLUE layout, e.g. ``STS-B``.
        hf_name: the Hugging Face ``glue`` configuration, e.g. ``stsb``.
        tsv: field positions in the TSV files.
        hf_text_columns: text columns of the Hugging Face dataset (second None: one text).
        labels: class names in index order; empty for regression (STS-B).
        tsv_label_values: how each class is spelt in the TSV files, in index order.
        eval_splits: the dev sets (one, or MNLI's matched and mismatched).
        metrics: metric names reported for every eval split.
        headline: ``(eval split, metric)`` of the task's score in results tables.
        in_average: whether the task counts in GLUE averages.
    """

    name: str
    hf_name: str
    tsv: TsvLayout
    hf_text_columns: tuple[str, str | None]
    labels: tuple[str, ...]
    tsv_label_values: tuple[str, ...]
    eval_splits: tuple[EvalSplit, ...]
    metrics: tuple[str, ...]
    headline: tuple[str, str]
    in_average: bool = True

    @property
    def is_regression(self) -> bool:
        """True for STS-B (one real-valued output, MSE loss)."""
        return not self.labels

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head (1 for regression)."""
        return len(self.labels) or 1

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return self.tsv.text_b is not None

    @property
    def headline_name(self) -> str:
        """``split/metric`` of the headline score, e.g. ``dev/matthews``."""
        return "/".join(self.headline)


_DEV = (EvalSplit("dev", "dev.tsv", "validation"),)
_BINARY = ("0", "1")


def _task(name: str, hf_name: str, tsv: TsvLayout, hf_text: tuple[str, str | None],
          labels: tuple[str, ...], values: tuple[str, ...], metrics: tuple[str, ...],
          headline: str, *, evals: tuple[EvalSplit, ...] = _DEV,
          in_average: bool = True) -> GlueTask:
    return GlueTask(name, hf_name, tsv, hf_text, labels, values, evals, metrics,
                    (evals[0].name, headline), in_average)


TASKS: dict[str, GlueTask] = {t.name: t for t in (
    _task("CoLA", "cola", TsvLayout(3, None, 1, header=False), ("sentence", None),
          ("unacceptable", "acceptable"), _BINARY, ("matthews", "accuracy"), "matthews"),
    _task("SST-2", "sst2", TsvLayout("sentence", None, "label"), ("sentence", None),
          ("negative", "positive"), _BINARY, ("accuracy",), "accuracy"),
    _task("MRPC", "mrpc", TsvLayout("#1 String", "#2 String", "Quality"),
          ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _BINARY,
          ("f1", "accuracy"), "f1"),
    _task("STS-B", "stsb", TsvLayout("sentence1", "sentence2", "score"),
          ("sentence1", "sentence2"), (), (), ("spearman", "pearson"), "spearman"),
    _task("QQP", "qqp", TsvLayout("question1", "question2", "is_duplicate"),
          ("question1", "question2"), ("not_duplicate", "duplicate"), _BINARY,
          ("f1", "accuracy"), "f1"),
    _task("MNLI", "mnli", TsvLayout("sentence1", "sentence2", "gold_label"),
          ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
          evals=(EvalSplit("matched", "dev_matched.tsv", "validation_matched"),
                 EvalSplit("mismatched", "dev_mismatched.tsv", "validation_mismatched"))),
    _task("QNLI", "qnli", TsvLayout("question", "sentence", "label"), ("question", "sentence"),
          ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",),
          "accuracy"),
    _task("RTE", "rte", TsvLayout("sentence1", "sentence2", "label"),
          ("sentence1", "sentence2"), ("entailment", "not_entailment"),
          ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    _task("WNLI", "wnli", TsvLayout("sentence1", "sentence2", "label"),
          ("sentence1", "sentence2"), ("not_entailment", "entailment"), _BINARY,
          ("accuracy",), "accuracy", in_average=False),
)}

#: Column order of the UltraFastBERT paper's Table 1 (CoLA after the first average).
TABLE_ORDER = ("RTE", "MRPC", "STS-B", "SST-2", "MNLI", "QNLI", "QQP", "CoLA", "WNLI")
#: Tasks small enough to fine-tune on a laptop CPU (all but MNLI, QNLI, QQP).
SMALL_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "RTE")


def _key(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


_ALIASES = {_key(t.name): t.name for t in TASKS.values()}
_ALIASES.update({_key(t.hf_name): t.name for t in TASKS.values()})
_ALIASES.update({"MNLIM": "MNLI", "MNLIMM": "MNLI", "MNLIMATCHED": "MNLI",
                 "MNLIMISMATCHED": "MNLI"})


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (any case; ``STS-B``, ``stsb`` and ``sts_b`` all work).

    Raises:
        ValueError: unknown name; the message lists the nine tasks.
    """
    canonical = _ALIASES.get(_key(name))
    if canonical is None:
        raise InputError(f"unknown GLUE task {name!r}; choose among {', '.join(TASKS)}")
    return TASKS[canonical]


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> tuple[GlueTask, ...]:
    """Tasks from ``"RTE,STS-B"`` or a list of names, duplicates dropped, in the given order."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError(f"no GLUE task given; choose among {', '.join(TASKS)}")
    tasks = [get_task(n) for n in names]
    return tuple(dict.fromkeys(tasks))


def table_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` sorted into the paper's Table 1 column order."""
    return sorted(names, key=TABLE_ORDER.index)
