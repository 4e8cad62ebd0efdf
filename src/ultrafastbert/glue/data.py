"""GLUE data: read a task from a GLUE folder, tokenise it, serve training batches to the loop.

Two on-disk sources, found per task under ``--glue-dir``:

- the standard GLUE TSV layout (``download_glue_data.py``): ``DIR/RTE/train.tsv``,
  ``DIR/RTE/dev.tsv``; MNLI has ``dev_matched.tsv`` and ``dev_mismatched.tsv``. Files are read
  with ``csv`` (tab-separated, *no* quote handling: some RTE/QNLI fields start with an unbalanced
  ``"``) as ``utf-8-sig`` (MRPC's header starts with a byte-order mark); CoLA has no header row.
- a Hugging Face ``glue`` dataset saved with ``DatasetDict.save_to_disk``: ``DIR/rte/`` (or
  ``DIR/RTE/``) holding ``dataset_dict.json``; needs the optional package ``datasets``.

Text is tokenised with the model directory's ``tokenizer.json`` (``$A <sep>`` for one text,
``<cls> $A <sep> $B <sep>`` for a pair), truncated to the protocol's maximum length (longest
text first). Batches are padded to their longest row, not to the maximum length: padding is a
runtime choice (padded keys are masked) and costs time on a CPU.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, NotFoundError
from ..train.loop import MicroBatch
from .tasks import GlueTask

log = logging.getLogger(__name__)

TRAIN_TSV = "train.tsv"
HF_MARKER = "dataset_dict.json"


class GlueDataError(DataError):
    """A GLUE file or dataset is malformed; the message names it and says what to do."""


# ------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class GlueExample:
    """One example: one or two texts and a label (class index, or a float for STS-B)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueSplit:
    """The examples of one split of one task, and where they came from."""

    task: str
    name: str
    examples: tuple[GlueExample, ...]
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class indices, or float64 scores."""
        values = [e.label for e in self.examples]
        is_float = any(isinstance(v, float) for v in values)
        return np.asarray(values, dtype=np.float64 if is_float else np.int64)

    def subset(self, n: int | None, seed: int) -> GlueSplit:
        """At most ``n`` examples, drawn without replacement by ``seed``, in file order.

        A random subset, not the first ``n``: several GLUE files are sorted (STS-B by genre,
        CoLA by source), so their first rows are not representative.
        """
        if n is None or n >= len(self.examples):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.examples), n, replace=False))
        return GlueSplit(self.task, self.name, tuple(self.examples[i] for i in keep),
                         self.source)


@dataclass(frozen=True)
class GlueTaskData:
    """A task's training split and its evaluation splits (by ``EvalSplit.name``)."""

    task: GlueTask
    train: GlueSplit
    evals: dict[str, GlueSplit]


# ---------------------------------------------------------------------------- locating
def task_candidates(glue_dir: Path, task: GlueTask) -> list[Path]:
    """Folders that may hold ``task``: ``DIR/STS-B``, ``DIR/stsb``, ``DIR/sts-b``."""
    names = dict.fromkeys((task.name, task.hf_name, task.name.lower()))
    return [glue_dir / name for name in names]


def find_task_dir(glue_dir: str | os.PathLike, task: GlueTask) -> Path:
    """The folder of ``task`` under ``glue_dir``.

    Raises:
        FileNotFoundError: ``glue_dir`` or the task's folder is missing (the message lists the
            tasks that are there).
    """
    root = Path(glue_dir)
    if not root.is_dir():
        raise NotFoundError(f"GLUE folder {root} does not exist; pass --glue-dir DIR with "
                            "one sub-folder per task (RTE/train.tsv, RTE/dev.tsv, ...)")
    for folder in task_candidates(root, task):
        if folder.is_dir():
            return folder
    present = available_tasks(root) or ["none"]
    looked = ", ".join(str(p) for p in task_candidates(root, task))
    raise NotFoundError(f"task {task.name} is not in the GLUE folder {root} (looked for "
                        f"{looked}); tasks there: {', '.join(present)}. Add its files "
                        f"(download_glue_data.py layout) or drop {task.name} from --tasks")


def available_tasks(glue_dir: str | os.PathLike) -> list[str]:
    """Names of the tasks that have a folder under ``glue_dir``, in GLUE order."""
    from .tasks import TASKS

    root = Path(glue_dir)
    return [t.name for t in TASKS.values() if any(p.is_dir() for p in task_candidates(root, t))]


def missing_files(glue_dir: str | os.PathLike, task: GlueTask) -> list[str]:
    """Files ``task`` needs that its folder lacks (all of them when there is no folder; none
    for a saved Hugging Face dataset, whose splits are checked on loading)."""
    folders = [p for p in task_candidates(Path(glue_dir), task) if p.is_dir()]
    if folders and is_hf_dataset(folders[0]):
        return []
    want = [TRAIN_TSV, *(e.tsv_file for e in task.eval_splits)]
    return [name for name in want if not folders or not (folders[0] / name).is_file()]


def is_hf_dataset(folder: Path) -> bool:
    """Whether ``folder`` is a ``DatasetDict`` saved with ``save_to_disk``."""
    return (folder / HF_MARKER).is_file()


# ------------------------------------------------------------------------------- loading
def load_task(glue_dir: str | os.PathLike, task: GlueTask, *, max_train: int | None = None,
              max_eval: int | None = None, subset_seed: int = 0) -> GlueTaskData:
    """Read ``task``'s train and dev splits (TSV layout or saved HF dataset), optionally
    subsampled to ``max_train`` / ``max_eval`` examples per split (see :meth:`GlueSplit.subset`).
    """
    folder = find_task_dir(glue_dir, task)
    if is_hf_dataset(folder):
        train, evals = _load_hf(folder, task)
    else:
        train = read_tsv(folder / TRAIN_TSV, task, "train")
        evals = {e.name: read_tsv(folder / e.tsv_file, task, e.name) for e in task.eval_splits}
    train = train.subset(max_train, subset_seed)
    evals = {name: split.subset(max_eval, subset_seed) for name, split in evals.items()}
    log.info("%s: %d training examples, eval %s", task.name, len(train),
             {k: len(v) for k, v in evals.items()})
    return GlueTaskData(task, train, evals)


def read_tsv(path: Path, task: GlueTask, split: str) -> GlueSplit:
    """One GLUE TSV file as a :class:`GlueSplit` (rows too short for the fields are skipped
    with a warning, as the reference GLUE readers do)."""
    if not path.is_file():
        want = [TRAIN_TSV, *(e.tsv_file for e in task.eval_splits)]
        raise NotFoundError(f"{path} is missing; the GLUE layout needs {', '.join(want)} "
                            f"in {path.parent} for {task.name}")
    rows = _read_rows(path)
    columns = _column_indices(rows[0] if rows else [], task, path)
    body = rows[1:] if task.tsv.header else rows
    examples, skipped = [], 0
    for line, row in enumerate(body, start=2 if task.tsv.header else 1):
        if len(row) <= max(i for i in columns if i is not None):
            skipped += 1
            continue
        examples.append(_tsv_example(row, columns, task, path, line))
    if skipped:
        log.warning("%s: skipped %d rows with too few fields", path, skipped)
    if not examples:
        raise GlueDataError(f"{path} holds no examples; re-download {task.name}")
    return GlueSplit(task.name, split, tuple(examples), str(path))


def _read_rows(path: Path) -> list[list[str]]:
    """The tab-separated rows of ``path`` (UTF-8, a byte-order mark tolerated)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise GlueDataError(
            f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 ({err.reason}); "
            "GLUE files are UTF-8. Convert the file (e.g. `iconv -f latin1 -t utf-8 IN > OUT`) "
            "or download it again") from None
    rows = io.StringIO(text, newline="")  # split on \n, \r\n, \r only, as open(newline="")
    return list(csv.reader(rows, delimiter="\t", quoting=csv.QUOTE_NONE))


def _column_indices(header: list[str], task: GlueTask, path: Path) -> list[int | None]:
    """Indices of ``text_a``, ``text_b``, ``label`` (header names looked up)."""
    fields = (task.tsv.text_a, task.tsv.text_b, task.tsv.label)
    if not task.tsv.header:
        return [f if isinstance(f, int) or f is None else None for f in fields]
    missing = [f for f in fields if f is not None and f not in header]
    if missing:
        raise GlueDataError(f"{path}: header lacks columns {missing} (has {header[:12]}); "
                            f"is this the {task.name} file of the GLUE download?")
    return [None if f is None else header.index(f) for f in fields]


def _tsv_example(row: list[str], columns: list[int | None], task: GlueTask, path: Path,
                 line: int) -> GlueExample:
    a, b, label = columns
    return GlueExample(row[a], None if b is None else row[b],
                       parse_label(row[label], task, f"{path}, line {line}"))


def parse_label(value: str, task: GlueTask, where: str) -> int | float:
    """A TSV label: the class index of ``value``, or the float score for STS-B."""
    text = value.strip()
    if task.is_regression:
        try:
            return float(text)
        except ValueError:
            raise GlueDataError(f"{where}: score {value!r} is not a number") from None
    if text not in task.tsv_label_values:
        raise GlueDataError(f"{where}: label {value!r} is not one of "
                            f"{list(task.tsv_label_values)} ({task.name})")
    return task.tsv_label_values.index(text)


# --------------------------------------------------------------------- Hugging Face datasets
def _load_hf(folder: Path, task: GlueTask) -> tuple[GlueSplit, dict[str, GlueSplit]]:
    try:
        from datasets import load_from_disk
    except ImportError as err:
        raise ImportError(f"{folder} is a saved Hugging Face dataset; reading it needs the "
                          "optional package datasets: pip install datasets") from err
    dataset = load_from_disk(str(folder))
    if not hasattr(dataset, "keys"):
        raise GlueDataError(f"{folder} is a single split; save the whole DatasetDict "
                            "(load_dataset('glue', ...).save_to_disk(...))")
    train = hf_split(dataset, task, "train", "train", folder)
    evals = {e.name: hf_split(dataset, task, e.hf_split, e.name, folder)
             for e in task.eval_splits}
    return train, evals


def hf_split(dataset: Any, task: GlueTask, hf_name: str, name: str, folder: Path) -> GlueSplit:
    """One split of a Hugging Face ``glue`` dataset as a :class:`GlueSplit`."""
    if hf_name not in dataset:
        raise GlueDataError(f"{folder} has no split {hf_name!r} (has {sorted(dataset)}); "
                            f"{task.name} needs train and {[e.hf_split for e in task.eval_splits]}")
    data = dataset[hf_name]
    col_a, col_b = task.hf_text_columns
    missing = [c for c in (col_a, col_b, "label") if c is not None and c not in data.column_names]
    if missing:
        raise GlueDataError(f"{folder} split {hf_name}: no columns {missing} (has "
                            f"{data.column_names}); is it the glue/{task.hf_name} dataset?")
    _check_hf_label_names(data, task, folder)
    texts_b = data[col_b] if col_b else [None] * len(data)
    examples = tuple(GlueExample(a, b, _hf_label(label, task, folder, hf_name))
                     for a, b, label in zip(data[col_a], texts_b, data["label"], strict=True))
    return GlueSplit(task.name, name, examples, f"{folder}:{hf_name}")


def _check_hf_label_names(data: Any, task: GlueTask, folder: Path) -> None:
    names = getattr(data.features.get("label"), "names", None)
    if names is not None and tuple(names) != task.labels:
        raise GlueDataError(f"{folder}: label names {names} differ from GLUE {task.name}'s "
                            f"{list(task.labels)}; the class indices would not match")


def _hf_label(value: Any, task: GlueTask, folder: Path, split: str) -> int | float:
    if task.is_regression:
        return float(value)
    if not 0 <= int(value) < task.num_labels:
        raise GlueDataError(f"{folder} split {split}: label {value} is outside "
                            f"[0, {task.num_labels}) (test splits have no labels: -1)")
    return int(value)


# ---------------------------------------------------------------------------- tokenising
@dataclass(frozen=True)
class EncodedSplit:
    """Token ids of every example (unpadded, truncated) and the labels ``(N,)``."""

    ids: tuple[tuple[int, ...], ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode_split(split: GlueSplit, tokenizer: Any, max_length: int) -> EncodedSplit:
    """Tokenise ``split`` with a ``tokenizers.Tokenizer`` (its post-processor adds the special
    tokens), truncated to ``max_length`` tokens. The tokenizer is not modified."""
    if not split.examples:
        raise GlueDataError(f"{split.source}: the {split.name} split of {split.task} is empty")
    tok = tokenizer.__class__.from_str(tokenizer.to_str())  # private copy: settings below
    tok.no_padding()
    tok.enable_truncation(max_length)
    pairs = split.examples[0].text_b is not None
    inputs = [(e.text_a, e.text_b) if pairs else e.text_a for e in split.examples]
    ids = tuple(tuple(enc.ids) for enc in tok.encode_batch(inputs))
    labels = torch.from_numpy(split.labels())
    return EncodedSplit(ids, labels.float() if labels.is_floating_point() else labels.long())


def collate(rows: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(B, longest row)``, padded with ``pad_id``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def eval_batches(encoded: EncodedSplit, batch_size: int, pad_id: int):
    """``(indices, input_ids, attention_mask)`` over ``encoded`` in batches of similar length
    (sorted by length: less padding; the caller puts predictions back with ``indices``)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        ids, mask = collate([encoded.ids[i] for i in picked], pad_id)
        yield torch.tensor(picked, dtype=torch.long), ids, mask


# ------------------------------------------------------------------------ training batches
class ClassificationBatches:
    """The loop's :class:`~ultrafastbert.train.loop.BatchSource` for fine-tuning: epochs of
    ``batch_size`` examples in a fresh order per epoch (drawn from ``seed`` and the epoch
    number); the last batch of an epoch holds the remainder. State: ``(epoch, position)``.
    """

    def __init__(self, encoded: EncodedSplit, batch_size: int, seed: int, pad_id: int) -> None:
        if len(encoded) == 0:
            raise DataError("no training examples")
        self.encoded, self.batch_size, self.seed, self.pad_id = encoded, batch_size, seed, pad_id
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per pass over the data: ``ceil(N / batch_size)``."""
        return math.ceil(len(self.encoded) / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.encoded), generator=gen))
        return self._order[1]

    def next_batch(self, rank: int = 0, world_size: int = 1) -> MicroBatch:
        """The next batch: ``input_ids``, ``attention_mask`` ``(b, S)`` and ``labels`` ``(b,)``."""
        if world_size != 1:
            raise DataError("GLUE fine-tuning runs in one process; start it without torchrun")
        picked = self.order(self.epoch)[self.position:self.position + self.batch_size].tolist()
        self.position += len(picked)
        if self.position >= len(self.encoded):
            self.epoch, self.position = self.epoch + 1, 0
        ids, mask = collate([self.encoded.ids[i] for i in picked], self.pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": self.encoded.labels[picked]}
        return MicroBatch(inputs, n_targets=len(picked), n_tokens=int(mask.sum()))

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same data and seed)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
