"""Pretraining with the crammed recipe: corpus -> tokenizer/packing -> MLM training -> model.

:func:`run` reads as the table of contents::

    claim the output folder (new run, or the same settings when resuming)
    prepare the data (tokenizer + packed corpus; rank 0 first, the others find the cache)
    build the model (dropout off while pretraining), the recipe and the training loop
    train (resuming from the latest checkpoint with ``resume``)
    save a model directory in OUT (config.json, model.safetensors, tokenizer.json)
    draw the loss curve, evaluate held-out MLM loss/accuracy against the unigram baseline

``OUT`` then holds: ``run.json`` (the settings), ``metrics.jsonl``, ``checkpoints/``, the model
files (``from_pretrained(OUT)`` loads them; its ``config.json`` keeps the fine-tuning dropout
rates), ``loss_curve.png`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import (
    MlmMasker,
    PreparedData,
    SequenceStream,
    open_corpus,
    prepare_data,
    special_token_ids,
    split_indices,
)
from ..data.corpus import TextUnit
from ..errors import InputError, NotFoundError, OutputExistsError
from ..model import ModelConfig, UltraFastBertForMaskedLM
from ..utils.io import atomic_write_json
from ..utils.lock import LOCK_FILE, DirectoryLock
from ..utils.options import nested, option, parse_duration, positive_int
from ..utils.oserrors import writing
from .distributed import DistContext, init_distributed, main_first, shutdown
from .loop import LoopConfig, Trainer, TrainResult
from .metrics import METRICS_FILE, plot_loss_curve, read_metrics
from .mlm import MlmBatches, MlmEvaluation, evaluate_mlm, evaluate_unigram, unigram_log_probs
from .recipe import CrammedRecipe

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
#: Model files moved into OUT, the config last (its presence marks a complete model).
MODEL_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")
#: Settings that may change between a run and its resumption (they do not change results).
RUNTIME_FIELDS = ("out_dir", "tokenizer", "cache_dir", "save_every_steps", "save_every_s",
                  "keep_checkpoints", "resume", "device", "compile", "progress_bar",
                  "prepare_only")


def default_cache_dir() -> Path:
    """``$ULTRAFASTBERT_CACHE/packed``, else ``~/.cache/ultrafastbert/packed``."""
    root = os.environ.get("ULTRAFASTBERT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ultrafastbert") / "packed"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything a pretraining run needs. Exactly one of ``max_steps`` / ``budget_s``.

    ``model`` is the architecture as exported (dropout rates for later fine-tuning); training
    runs with every dropout at 0. Its ``vocab_size`` is also the size of a newly trained
    tokenizer. ``precision`` ``auto`` is bf16 on CUDA, fp32 elsewhere.
    """

    model: ModelConfig  # the command line's --preset NAME or --config FILE
    out_dir: Path = option(flags="--out", parse=Path, metavar="DIR",
                           help="output directory (new, or the run to --resume)")
    model_name: str = "custom"
    corpus: str | None = option(None, metavar="PATH|demo", group="data", show="demo",
                                help="text file/folder, .jsonl, .parquet, saved HF dataset")
    text_field: str = option("text", metavar="NAME", group="data",
                             help="JSON field / column holding the text")
    split: str = option("train", group="data", help="split of a saved DatasetDict")
    text_unit: TextUnit = option("line", choices=("line", "paragraph"), group="data",
                                 help="what a document is in plain-text files")
    encoding_errors: str = option("strict", choices=("strict", "replace"), group="data",
                                  help="non-UTF-8 bytes: an error (strict) or U+FFFD (replace)")
    tokenizer: Path | None = option(
        None, parse=Path, metavar="PATH", group="data",
        help="an existing tokenizer.json (default: reuse OUT/tokenizer.json, else the shipped "
             "demo tokenizer for the demo corpus at vocab 32768, else train one)")
    seq_len: int = option(128, parse=positive_int, metavar="N", group="data",
                          help="tokens per packed sequence")
    cache_dir: Path | None = option(
        None, parse=Path, metavar="DIR", group="data",
        help="packed-corpus cache (default: $ULTRAFASTBERT_CACHE/packed or "
             "~/.cache/ultrafastbert/packed)")
    recipe: CrammedRecipe = nested(CrammedRecipe, group="training")
    max_steps: int | None = option(None, parse=positive_int, metavar="N", group="training",
                                   exclusive="length",
                                   help="train for N optimizer steps; the schedule follows "
                                        "step / N, so runs are reproducible")
    budget_s: float | None = option(None, flags="--budget", parse=parse_duration,
                                    metavar="DURATION", group="training", exclusive="length",
                                    help="train for this wall-clock time, e.g. 5m or 24h (the "
                                         "paper); the schedule follows elapsed time / budget")
    seed: int = option(0, group="training", help="model init, data order, masks")
    heldout_rows: int = option(256, metavar="N", group="data",
                               help="sequences held out for the final MLM evaluation")
    precision: str = option("auto", choices=("auto", "fp32", "bf16"), group="training",
                            help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")
    save_every_steps: int | None = None  # both from the command line's --save-every
    save_every_s: float | None = 1800.0
    keep_checkpoints: int = option(1, parse=positive_int, metavar="N", group="training",
                                   help="checkpoints kept (the newest)")
    resume: bool = option(False, group="training",
                          help="continue the run in --out from its latest checkpoint")
    device: str = option("auto", group="training",
                         help="auto (cuda if available), cpu, cuda or cuda:N")
    compile: bool = option(False, group="training", help="torch.compile the model")
    progress_bar: bool = option(True, flags="--no-progress", group="training",
                                help="no progress bar")
    prepare_only: bool = option(False, group="training",
                                help="tokenize and pack the corpus, then stop (continue later "
                                     "with --resume)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if (self.max_steps is None) == (self.budget_s is None):
            raise InputError("give exactly one of --budget (progress = elapsed time / budget, "
                             "as in the paper) and --max-steps (progress = step / max-steps, "
                             "reproducible)")
        if self.seq_len > self.model.max_seq_len:
            raise InputError(f"seq_len {self.seq_len} exceeds the model's max_seq_len "
                             f"{self.model.max_seq_len}; lower --seq-len")
        if self.heldout_rows < 0:
            raise InputError(f"heldout_rows must be >= 0, got {self.heldout_rows}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (``run.json``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(model=self.model.to_dict(), recipe=self.recipe.to_dict())
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the result (compared when resuming)."""
        return {k: v for k, v in self.to_json().items() if k not in RUNTIME_FIELDS}


@dataclass(frozen=True)
class PretrainResult:
    """What a run produced (``heldout``/``unigram`` None without held-out rows)."""

    out_dir: Path
    train: TrainResult | None
    heldout: MlmEvaluation | None
    unigram: MlmEvaluation | None
    n_parameters: int
    summary: dict[str, Any]


# ------------------------------------------------------------------------------- pipeline
def run(settings: PretrainSettings) -> PretrainResult:
    """Pretrain as the module docstring describes; under ``torchrun`` on every rank.

    Rank 0 holds a lock on ``out_dir`` for the whole run (:class:`DirectoryLock`): a second run
    on the same directory is refused before it reads or writes anything there.
    """
    ctx = init_distributed(settings.device)
    lock = DirectoryLock(settings.out_dir, "pretrain")
    try:
        result = _run(settings, ctx, lock)
    except BaseException:
        shutdown(ctx, wait=False)  # no barrier: the other ranks may never reach it
        raise
    finally:
        lock.release()
    shutdown(ctx)
    return result


def _run(s: PretrainSettings, ctx: DistContext, lock: DirectoryLock) -> PretrainResult:
    fresh = main_first(ctx, lambda: claim_output_dir(s, lock), others=False)
    try:
        data = main_first(ctx, lambda: prepare(s))
    except BaseException:
        if fresh:
            release_output_dir(s.out_dir)
        raise
    assert data is not None  # main_first runs prepare() on every rank
    if s.prepare_only:
        return PretrainResult(s.out_dir, None, None, None, 0,
                              {"packed": str(data.packed.data_path),
                               "sequences": data.packed.n_sequences})
    train_rows, heldout_rows = split_rows(data, s.heldout_rows)
    model = build_model(s, data, ctx.device)
    trainer = build_trainer(s, model, data, train_rows, ctx)
    if s.resume:
        trainer.restore()
    result = trainer.fit()
    if not ctx.is_main:
        return PretrainResult(s.out_dir, result, None, None, 0, {})
    with writing(s.out_dir, "the model into", note=_resume_note(result)):
        export_model(model, s, data)
        records = read_metrics(s.out_dir / METRICS_FILE)
        plot_loss_curve(records, s.out_dir / LOSS_CURVE_FILE,
                        title=f"pretraining {s.model_name}")
        heldout, unigram = evaluate(model, data, heldout_rows, ctx.device)
        return summarize(s, model, result, records, heldout, unigram)


def _resume_note(result: TrainResult) -> str:
    where = f" {result.checkpoint.path}" if result.checkpoint is not None else ""
    return (f"Training finished and its final checkpoint{where} is intact: free some space "
            "and run the same command with --resume to write the model files.")


# ------------------------------------------------------------------------- output folder
def claim_output_dir(s: PretrainSettings, lock: DirectoryLock | None = None) -> bool:
    """Start a new run in an empty ``out_dir`` (True), or check that ``resume`` continues the
    run there with the same settings (False). Never overwrites another run.

    ``lock`` (taken first, which creates ``out_dir``) keeps other runs out until released.
    """
    out, run_file = s.out_dir, s.out_dir / RUN_FILE
    if lock is not None:
        lock.acquire()
    if s.resume:
        if not run_file.is_file():
            raise NotFoundError(f"{out} holds no run to resume (no {RUN_FILE}); drop "
                                "--resume to start a new run there")
        _check_same_settings(out, _read_json(run_file)["settings"], s.result_settings())
        return False
    if out.exists() and (not out.is_dir() or _holds_files(out)):
        what = "another run" if run_file.is_file() else "files"
        raise OutputExistsError(f"output directory {out} already holds {what}; pass --resume to "
                                "continue that run, or choose a new --out")
    with writing(run_file, "the run record", note="Choose a --out on a writable disk."):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, {"command": "pretrain", "format": 1, "settings":
                                     s.result_settings(), "runtime": s.to_json(),
                                     "created_unix": int(time.time())})
    return True


def _holds_files(out: Path) -> bool:
    """Whether ``out`` holds anything but its lock file."""
    return any(p.name != LOCK_FILE for p in out.iterdir())


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _check_same_settings(out: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise InputError(f"{out} was started with other settings ({'; '.join(changed)}). "
                         "Resume with the original settings, or start a new run in a new --out")


def release_output_dir(out: Path) -> None:
    """Undo :func:`claim_output_dir` after a failed start (bad corpus...): remove the files it
    and data preparation wrote, so the same ``--out`` can be used again."""
    for name in (RUN_FILE, "tokenizer.json"):
        (out / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ data
def prepare(s: PretrainSettings) -> PreparedData:
    """Open the corpus, get the tokenizer (saved as ``OUT/tokenizer.json``), pack and cache."""
    corpus = open_corpus(s.corpus, text_field=s.text_field, split=s.split,
                         text_unit=s.text_unit, encoding_errors=s.encoding_errors)
    data = prepare_data(corpus, s.out_dir, s.cache_dir or default_cache_dir(),
                        tokenizer_path=s.tokenizer, vocab_size=s.model.vocab_size,
                        seq_len=s.seq_len)
    n_vocab = data.tokenizer.get_vocab_size()
    if n_vocab > s.model.vocab_size:
        raise InputError(f"the tokenizer has {n_vocab} entries but the model's vocab_size is "
                         f"{s.model.vocab_size}; pass --vocab-size {n_vocab} or a smaller "
                         "tokenizer")
    return data


def split_rows(data: PreparedData, heldout_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row indices; at most a tenth of the rows are held out."""
    n = data.packed.n_sequences
    n_holdout = min(heldout_rows, n // 10)
    if n_holdout < heldout_rows:
        log.warning("holding out %d rows instead of %d: the corpus has only %d", n_holdout,
                    heldout_rows, n)
    return split_indices(n, n_holdout)


def masker_for(data: PreparedData) -> MlmMasker:
    """25% masking, 80/10/10, random replacements among the tokenizer's non-special tokens."""
    special = special_token_ids(data.tokenizer)
    return MlmMasker(special.mask, data.tokenizer.get_vocab_size(), special.all())


# ------------------------------------------------------------------------ model and loop
def export_config(s: PretrainSettings, data: PreparedData) -> ModelConfig:
    """The saved architecture: ``s.model`` with the tokenizer's padding id."""
    return s.model.replace(pad_token_id=special_token_ids(data.tokenizer).pad)


def build_model(s: PretrainSettings, data: PreparedData, device: torch.device,
                ) -> UltraFastBertForMaskedLM:
    """The MLM model, seeded, with dropout off (crammed pretraining), on ``device``."""
    config = export_config(s, data).replace(embedding_dropout=0.0, attention_dropout=0.0,
                                            hidden_dropout=0.0)
    torch.manual_seed(s.seed)
    return UltraFastBertForMaskedLM(config).to(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``fp32``."""
    if precision != "auto":
        return precision
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 else "fp32"


def build_trainer(s: PretrainSettings, model: UltraFastBertForMaskedLM, data: PreparedData,
                  train_rows: np.ndarray, ctx: DistContext) -> Trainer:
    """The shared loop with the crammed recipe and masked batches of the training rows."""
    if s.recipe.micro_batch % ctx.world_size:
        raise InputError(f"--micro-batch {s.recipe.micro_batch} must be a multiple of the "
                         f"number of processes ({ctx.world_size})")
    stream = SequenceStream(data.packed, seed=s.seed, indices=train_rows)
    source = MlmBatches(stream, masker_for(data), torch.Generator().manual_seed(s.seed),
                        s.recipe.micro_batch)
    loop = LoopConfig(max_steps=s.max_steps, budget_s=s.budget_s, grad_clip=s.recipe.grad_clip,
                      precision=resolve_precision(s.precision, ctx.device), compile=s.compile,
                      save_every_steps=s.save_every_steps, save_every_s=s.save_every_s,
                      keep_checkpoints=s.keep_checkpoints, progress_bar=s.progress_bar,
                      out_dir=s.out_dir, description=f"pretrain {s.model_name}")
    return Trainer(model, s.recipe.optimizer(model), s.recipe.schedule(), source, loop, ctx)


# ---------------------------------------------------------------------------------- output
def export_model(model: UltraFastBertForMaskedLM, s: PretrainSettings,
                 data: PreparedData) -> Path:
    """Save a ``from_pretrained``-loadable model into ``OUT`` (beside the run's other files).

    ``save_pretrained`` writes into a fresh folder; each file is then moved into ``OUT`` with
    ``os.replace``, ``config.json`` last.
    """
    exported = UltraFastBertForMaskedLM(export_config(s, data))
    exported.load_state_dict(model.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=".model-export.", suffix=".tmp", dir=s.out_dir))
    try:
        exported.save_pretrained(staging / "model", tokenizer_file=data.tokenizer_path)
        for name in MODEL_FILES:
            if (staging / "model" / name).is_file():
                os.replace(staging / "model" / name, s.out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved the pretrained model to %s", s.out_dir)
    return s.out_dir


def evaluate(model: UltraFastBertForMaskedLM, data: PreparedData, heldout_rows: np.ndarray,
             device: torch.device) -> tuple[MlmEvaluation | None, MlmEvaluation | None]:
    """Held-out MLM loss/accuracy of the model and of the unigram baseline (same masks)."""
    if len(heldout_rows) == 0:
        return None, None
    rows = data.packed.array()
    heldout = np.asarray(rows[heldout_rows])
    train_mask = np.ones(len(rows), dtype=bool)
    train_mask[heldout_rows] = False
    masker = masker_for(data)
    log_probs = unigram_log_probs(rows[np.flatnonzero(train_mask)], model.config.vocab_size,
                                  special_token_ids(data.tokenizer).all())
    return (evaluate_mlm(model, heldout, masker, device=device),
            evaluate_unigram(log_probs, heldout, masker))


def summarize(s: PretrainSettings, model: UltraFastBertForMaskedLM, result: TrainResult,
              records: list[dict[str, Any]], heldout: MlmEvaluation | None,
              unigram: MlmEvaluation | None) -> PretrainResult:
    """Write ``summary.json`` and return the result.

    ``tokens_per_s`` is this session's throughput (the whole run's when this session trained
    no step, e.g. resuming a finished run).
    """
    state = result.state
    tokens_per_s = result.tokens_per_s if result.history else state.tokens / max(
        state.elapsed_s, 1e-9)
    summary = {
        "model": s.model_name, "parameters": model.num_parameters(), "steps": state.step,
        "tokens": state.tokens, "train_seconds": state.elapsed_s, "tokens_per_s": tokens_per_s,
        "final_train_loss": records[-1]["loss"] if records else None,
        "heldout": heldout.to_dict() if heldout else None,
        "unigram_baseline": unigram.to_dict() if unigram else None,
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(s.out_dir / SUMMARY_FILE, summary)
    return PretrainResult(s.out_dir, result, heldout, unigram, model.num_parameters(), summary)
