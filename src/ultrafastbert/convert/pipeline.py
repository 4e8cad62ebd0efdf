"""``ultrafastbert convert``: source -> FFF student -> init -> distil layer by layer -> end to end.

The run reads like its steps (:func:`run`): load the source and build the student (every tensor
but the feed-forward blocks copied), tokenize the corpus, initialise each FFF from its dense
block (:mod:`.init`), then two phases of the project's one training loop
(:class:`~ultrafastbert.train.loop.Trainer`): each FFF against its dense block on its own inputs,
then the whole student against the teacher. ``budget_s`` is wall-clock for all of it; each phase
checkpoints atomically under ``OUT/distill/<phase>/`` and ``resume=True`` continues after a
kill. The model files land in ``OUT`` at the end (``config.json`` last), with the source's
tokenizer and ``conversion.json`` (settings, fit at every step, times).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.packing import LengthBucketedStream
from ..errors import InputError
from ..model.converted import (
    FAMILIES,
    FFFBlock,
    base_model_of,
    dense_ffns,
    fff_blocks,
    post_norms,
)
from ..model.soft_routing import set_soft_routing
from ..train.distributed import DistContext, init_distributed, main_first, shutdown
from ..train.loop import LoopConfig, Trainer, TrainState
from ..train.metrics import METRICS_FILE, read_metrics
from ..train.recipe import WarmupCosineSchedule
from ..utils.io import atomic_path, atomic_write_json
from ..utils.machine import run_facts
from ..utils.options import format_duration, option, parse_duration, positive_int
from .budget import MEASURE_TOKENS, is_auto, parse_auto
from .budget import plan as budget_plan
from .data import (
    TeacherBatches,
    block_inputs,
    cut_batch,
    ffn_io,
    load_segments,
    teacher_layers,
    teacher_outputs,
)
from .init import init_block, relative_error
from .objectives import (
    E2E_LAYERS,
    LAYERWISE_SPACES,
    EndToEndObjective,
    LayerwiseObjective,
    frozen_norm,
)
from .routing import ROUTING_SCHEDULES, RoutingSchedule, SoftToHard, phase_span
from .source import SourceModel, active_fraction, load_source, make_student, parse_structure
from .st_dir import write_sentence_transformers_files

log = logging.getLogger(__name__)

WORK_DIR = "distill"
REPORT_FILE = "conversion.json"
INIT_FILE = "init.safetensors"
ALLOCATION_FILE = "allocation.json"
PHASES = ("layerwise", "end-to-end")
INIT_INPUTS = ("teacher", "student")
HELDOUT_ROWS = 256
#: Below this share of the way from the FFN-removed model to the dense one (held-out pooled
#: cosine, :func:`cosine_kept`), the end of the run warns. Measured on all-MiniLM-L6-v2 8x7
#: (docs/convert.md, "How close to the dense model"; removed: 0.555 on GLUE-train text): the
#: init alone 0.39 (12% of the FFNs' STS-B gain), the demo corpus 0.43 (41%, on STS-B text),
#: 12 minutes on GLUE text 0.64-0.65 (61%), 60 minutes 0.74-0.76 (67-84%).
POOR_COSINE_KEPT = 0.6
NO_CORPUS = (
    "convert needs --corpus: the distillation text decides the quality of the result more than "
    "any other setting. Give unlabeled text like the text the model will embed (a text file "
    "with one document per line, JSONL with a 'text' field, Parquet, or a folder of them; e.g. "
    "`python benchmarks/glue_text_corpus.py --glue-dir GLUE --out text.jsonl` writes the GLUE "
    "train sentences). `--corpus demo` uses the built-in demo corpus (the KJV Bible, "
    "Shakespeare, WordNet glosses: archaic English) knowingly: all-MiniLM-L6-v2 8x7 distilled "
    "on it for 10 minutes kept 41% of the FFNs' STS-B gain, against 61% from GLUE-train text in 12 minutes.")


@dataclass(frozen=True)
class ConvertSettings:
    """Everything a conversion run depends on (written to ``conversion.json``).

    Attributes:
        source: the source model directory (see :func:`~.source.load_source`).
        out: the output model directory.
        fff: ``KxD`` for every layer, a comma list of one per layer, or ``none`` (the ablation);
            each ``KxD`` may add ``+s<N>`` shared neurons and ``+r<N>`` a rank-N linear term
            (:mod:`~ultrafastbert.model.ffn_structures`).
        budget_s: wall-clock seconds for init and both phases together (20 minutes).
        corpus: unlabeled text (a path the pretraining readers take, or ``demo`` for the
            built-in archaic-English corpus, asked for by name); required: the text decides the
            quality (see :data:`NO_CORPUS`).
        layerwise_share: share of the time after init given to the layer-by-layer phase.
        layerwise_space: where that phase compares a block with its dense block: ``output``
            (the block's output) or ``post-norm`` (the layer's output after the residual sum and
            its LayerNorm; see :class:`~.objectives.LayerwiseObjective`).
        batch_size: sequences per step; max_len: tokens per sequence at most.
        max_documents: use at most this many documents of the corpus.
        init_tokens: tokens per layer the init fits on; init_split: ``median`` or ``neuron``.
        init_inputs: ``teacher``: fit each block to its dense block on the teacher's inputs;
            ``student``: fit the blocks in layer order on the student's own inputs (earlier
            blocks converted), to the output that restores the teacher's residual sum.
        lr_layerwise, lr_fff: learning rates of the FFF blocks in the two phases.
        lr_rest: learning rate of everything else end to end (0: frozen, bit-identical).
        cos_weight: weight of ``1 - cos`` of the pooled embeddings end to end.
        similarity_weight: weight of the batch's pairwise-cosine error end to end (see
            :func:`~.objectives.similarity_error`; 0: off).
        e2e_layers: end-to-end hidden-state terms on the ``last`` layer or on ``all`` layers.
        teacher_cache_gb: memory for the teacher's end-to-end targets, kept so later epochs
            skip its forward pass (``e2e_layers="last"`` only; 0: off).
        seed: data order; save_every_s: checkpoint period; resume: continue ``out``.
        max_steps: optimizer steps per phase instead of the time left after init (reproducible
            runs; None: the budget decides).
        routing_schedule: ``hard`` (routing as the model runs, throughout) or ``soft-to-hard``
            (soft routing annealed to hard over both phases, see :mod:`.routing`);
            soft_temperature: its starting temperature (in units of each node's RMS logit);
            hard_from: the overall progress from which routing is hard again.
    """

    source: Path = option(flags="source", parse=Path, help="local model directory (config.json "
                          "+ weights + tokenizer.json)")
    out: Path = option(parse=Path, help="output model directory")
    fff: str = option("8x7", metavar="KxD[bB][+sN][+rN][,...]|auto:N[%][@D]",
                      help="trees x depth for every layer, one per layer, or 'none' (the "
                           "ablation: feed-forward blocks removed); bB makes every node a block "
                           "of B neurons (e.g. 4x7b2); +sN adds N always-on (shared) neurons, +rN "
                           "a rank-N linear term beside the trees, each costing per token what N "
                           "neurons do, e.g. 6x7+s16; auto:64 or auto:4.2%% spends that mean "
                           "budget per layer (neurons a token, or %% of the dense FFN) in trees of "
                           "depth D (@D, default 7), more where the measured error is largest")
    budget_s: float = option(1200.0, flags="--budget", parse=parse_duration, show=format_duration,
                             metavar="DURATION", help="wall-clock time for init and "
                                                      "distillation, e.g. 10m, 1h")
    corpus: str | None = option(
        None, metavar="PATH|demo",
        help="required: unlabeled text like the text the model will embed (a text/JSONL/Parquet "
             "file or folder); it decides the quality more than any other setting. 'demo' "
             "picks the built-in archaic-English demo corpus (KJV, Shakespeare, WordNet) "
             "knowingly: measured on all-MiniLM-L6-v2 it keeps far less of the FFNs' gain than "
             "modern text")
    layerwise_share: float = option(0.4, metavar="F", help="share of the time after init for "
                                                           "the layer-by-layer phase")
    layerwise_space: str = option("output", flags="--layerwise-loss", choices=LAYERWISE_SPACES,
                                  help="layer-by-layer phase: match each block's output, or the "
                                       "layer's output after the residual sum and LayerNorm "
                                       "(post-norm)")
    batch_size: int = option(32, parse=positive_int, help="texts per step")
    max_len: int = option(128, parse=positive_int, help="tokens per text at most")
    max_documents: int | None = option(None, parse=positive_int,
                                       help="read at most this many documents of the corpus")
    init_tokens: int = option(16384, parse=positive_int,
                              help="tokens per layer the init fits on")
    init_split: str = option("neuron", choices=("neuron", "median"),
                             help="node splits where its dense neuron fires (neuron) or at its "
                                  "median")
    init_inputs: str = option("teacher", choices=INIT_INPUTS,
                              help="fit each block's init on the dense model's inputs (teacher) "
                                   "or, layer by layer, on the student's own (student: later "
                                   "blocks also correct earlier blocks' errors)")
    lr_layerwise: float = option(1e-3, help="FFF learning rate layer by layer")
    lr_fff: float = option(3e-4, help="FFF learning rate end to end")
    lr_rest: float = option(0.0, help="learning rate of the non-FFN weights end to end (0: "
                                      "frozen, bit-identical to the source; >0 also tunes "
                                      "attention/norms/embeddings)")
    cos_weight: float = option(10.0, metavar="W", help="end to end, the weight of 1 - cos of the "
                                                       "pooled embeddings beside the hidden states' "
                                                       "relative squared error (weight 1 a layer)")
    similarity_weight: float = option(
        0.0, metavar="W", help="end to end, also match the pairwise cosine similarities of each "
                               "batch's pooled embeddings to the dense model's, with weight W "
                               "(relative squared error; 0: off)")
    e2e_layers: str = option("last", flags="--end-to-end-layers", choices=E2E_LAYERS,
                             help="end-to-end phase: hidden-state loss on the last layer or on "
                                  "every layer's output (plus the pooled-embedding cosine)")
    teacher_cache_gb: float = option(
        4.0, flags="--teacher-cache", metavar="GB",
        help="memory for the dense model's end-to-end targets, kept so later epochs over the "
             "corpus skip its forward pass (--end-to-end-layers last only; 0: off)")
    seed: int = option(0, help="data order")
    save_every_s: float = option(300.0, flags="--save-every", parse=parse_duration,
                                 show=format_duration, metavar="DURATION",
                                 help="checkpoint period")
    resume: bool = option(False, help="continue an interrupted run in OUT")
    progress: bool = option(True, flags="--no-progress", help="no progress bars")
    max_steps: int | None = option(None, flags="--steps", parse=positive_int, metavar="N",
                                   help="optimizer steps per phase instead of the time left "
                                        "after init (reproducible runs; default: the budget "
                                        "decides)")
    routing_schedule: str = option(
        "hard", choices=("hard", "soft-to-hard"),
        help="routing while distilling: hard throughout, or soft (every node weighted by the "
             "chance of reaching it) annealed to hard; the saved model is hard-routed either way")
    soft_temperature: float = option(
        0.25, metavar="T", help="soft-to-hard: starting temperature, in units of each node's RMS "
                                "logit, falling linearly to 0 at --hard-from")
    hard_from: float = option(
        0.8, metavar="F", help="soft-to-hard: share of the distillation (both phases) after which "
                               "routing is hard")
    device: str = option("auto", help="where the two distillation phases run: auto (cuda if "
                                      "available), cpu, cuda or cuda:N (under torchrun cuda is "
                                      "each process's cuda:LOCAL_RANK); loading, the init and "
                                      "the held-out fit run on the CPU")

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        if not self.corpus:
            raise InputError(NO_CORPUS)
        if not self.budget_s > 0:
            raise InputError(f"--budget must be > 0 seconds, got {self.budget_s}")
        if self.layerwise_space not in LAYERWISE_SPACES:
            raise InputError(f"layerwise space must be one of {LAYERWISE_SPACES}, got "
                             f"{self.layerwise_space!r}")
        if self.init_inputs not in INIT_INPUTS:
            raise InputError(f"init inputs must be one of {INIT_INPUTS}, got "
                             f"{self.init_inputs!r}")
        if self.e2e_layers not in E2E_LAYERS:
            raise InputError(f"end-to-end layers must be one of {E2E_LAYERS}, got "
                             f"{self.e2e_layers!r}")
        if not 0.0 <= self.layerwise_share <= 1.0:
            raise InputError(f"layerwise share must be in [0, 1], got {self.layerwise_share}")
        if self.routing_schedule not in ROUTING_SCHEDULES:
            raise InputError(f"routing schedule must be one of {ROUTING_SCHEDULES}, got "
                             f"{self.routing_schedule!r}")
        SoftToHard(self.soft_temperature, self.hard_from)  # validates both
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.max_steps}")
        for name in ("batch_size", "max_len", "init_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.similarity_weight < 0 or self.cos_weight < 0:
            raise InputError("cos and similarity weights must be >= 0")
        if self.teacher_cache_gb < 0:
            raise InputError(f"teacher cache must be >= 0 GB, got {self.teacher_cache_gb}")
        if self.lr_rest < 0 or self.lr_fff <= 0 or self.lr_layerwise <= 0:
            raise InputError("learning rates must be > 0 (lr_rest >= 0)")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class ConvertReport:
    """What the run measured; written to ``OUT/conversion.json``."""

    settings: dict[str, Any]
    fff_layers: list
    active_fraction: float
    ffn_extras: list = field(default_factory=list)
    fff_allocation: dict[str, Any] | None = None
    init_s: float = 0.0
    init_error: list[float] = field(default_factory=list)
    init_heldout: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    quality_warning: str | None = None
    world_size: int = 1
    device: str = "cpu"
    environment: dict[str, Any] = field(default_factory=run_facts)


# ------------------------------------------------------------------------------ the run
def run(settings: ConvertSettings) -> ConvertReport:
    """Convert ``settings.source`` into ``settings.out`` (see the module docstring).

    Under ``torchrun`` every process trains its share of each global batch (DDP, gloo on the
    CPU, NCCL on CUDA devices); rank 0 claims ``out``, fits the init (the others load it),
    writes the checkpoints and the model. Every rank returns the same report."""
    ctx = init_distributed(settings.device)
    try:
        report = _run(settings, ctx)
    except BaseException:
        shutdown(ctx, wait=False)  # no barrier: the other ranks may never reach it
        raise
    shutdown(ctx)
    return report


def _run(settings: ConvertSettings, ctx: DistContext) -> ConvertReport:
    started = time.monotonic()
    if settings.batch_size % ctx.world_size:
        raise InputError(f"--batch-size {settings.batch_size} must be a multiple of the number "
                         f"of processes ({ctx.world_size}): it is the global batch")
    main_first(ctx, lambda: claim_output_dir(settings.out, settings.resume), others=False)
    source = load_source(settings.source)
    pad_id = int(source.model.config.pad_token_id or 0)
    rows = load_segments(settings.corpus, source.tokenizer_dir, max_len=min(
        settings.max_len, source.max_seq_len), max_documents=settings.max_documents, pad_id=pad_id)
    train_idx, heldout_idx = split_rows(len(rows), settings.seed)
    work = settings.out / WORK_DIR
    allocation = main_first(ctx, lambda: auto_allocation(source, rows[train_idx], settings,
                                                         pad_id, work))
    spec = settings.fff if allocation is None else ",".join(
        f"{k}x{d}" for k, d in allocation["fff_layers"])
    fff_layers, extras = parse_structure(spec, source.n_layers)
    student: Any = make_student(source, fff_layers, extras)
    report = ConvertReport(settings.to_json(), fff_layers, active_fraction(
        fff_layers, student.config.ffn_width, extras), ffn_extras=extras,
        fff_allocation=allocation)
    # Rank 0 fits and saves the init; the others then find it saved and load it.
    init = main_first(ctx, lambda: initialise(student, source, rows[train_idx], settings, pad_id,
                                              work, setup_s=time.monotonic() - started))
    assert init is not None  # main_first runs it on every rank
    report.init_s, report.init_error = init["seconds"], init["error"]
    held = heldout_set(source, rows[heldout_idx], pad_id)
    removed = removed_pooled_cosine(student, held)
    report.init_heldout = heldout_fit(student, held, removed)
    place(ctx.device, source.model, student)
    for phase, budget_s in init["phase_budgets"].items():
        if budget_s > 0 and trains_anything(phase, student, settings):
            report.phases[phase] = distil(phase, student, source, rows, train_idx, settings,
                                          pad_id, work, budget_s, ctx)
    place(torch.device("cpu"), source.model, student)
    report.heldout = heldout_fit(student, held, removed)
    report.quality_warning = quality_warning(report.heldout)
    report.world_size, report.device = ctx.world_size, str(ctx.device)
    if ctx.is_main:
        if report.quality_warning:
            log.warning("%s", report.quality_warning)
        save_model(student, source, settings.out, report)
        shutil.rmtree(work)
        log.info("converted model written to %s", settings.out)
    return report


def place(device: torch.device, *models: nn.Module) -> None:
    """Move ``models`` to ``device`` (the phases run on the run's device; loading, the init and
    the held-out fit on the CPU). A no-op on the CPU."""
    for model in models:
        if next(model.parameters()).device != device:
            model.to(device)


def claim_output_dir(out: Path, resume: bool) -> None:
    """Refuse to write into a folder holding other files, unless resuming our own run."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the converted model")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / WORK_DIR).is_dir()
        if not resume:
            hint = " (it holds an unfinished conversion: add --resume)" if ours else ""
            raise InputError(f"--out {out} already holds files{hint}; choose an empty or new "
                             "directory")
        if not ours:
            raise InputError(f"--resume: {out} holds no conversion run ({WORK_DIR}/ missing)")
    out.mkdir(parents=True, exist_ok=True)


def split_rows(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row indices (a seeded shuffle; at most 1/4 held out)."""
    order = np.random.default_rng([seed, 1]).permutation(n_rows)
    n_held = min(HELDOUT_ROWS, n_rows // 4)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


# ------------------------------------------------------------------------------ init
def trains_anything(phase: str, student: Any, settings: ConvertSettings) -> bool:
    """Whether ``phase`` has parameters to train (none for the ablation with ``lr_rest=0``)."""
    has_fff = any(isinstance(b, FFFBlock) for b in fff_blocks(student))
    return has_fff or (phase == "end-to-end" and settings.lr_rest > 0)


def initialise(student: Any, source: SourceModel, rows: np.ndarray,
               settings: ConvertSettings, pad_id: int, work: Path, setup_s: float
               ) -> dict[str, Any]:
    """Fit every FFF block from its dense block on ``init_tokens`` real inputs, or load the
    saved init when resuming. Returns ``{"seconds", "error"`` (relative, per layer),
    ``"phase_budgets"}``: what is left of the budget after setup and init, split between the
    phases once and for all, so a resumed run keeps each phase's schedule."""
    saved, info_file = work / INIT_FILE, work / "init.json"
    if saved.is_file() and info_file.is_file():
        from safetensors.torch import load_file

        student.load_state_dict(load_file(str(saved)), strict=True)
        log.info("init: loaded %s", saved)
        return dict(json.loads(info_file.read_text(encoding="utf-8")))
    started = time.monotonic()
    sample = init_sample(rows, settings.seed)
    xs = collect_inputs(source.model, sample, settings.init_tokens, pad_id, settings.batch_size)
    dense = dense_ffns(source.model, FAMILIES[source.family])
    errors = []
    for i, (block, ffn) in enumerate(zip(fff_blocks(student), dense, strict=True)):
        if not isinstance(block, FFFBlock):
            errors.append(1.0)
            continue
        if settings.init_inputs == "student":
            # The student's own input to this block (earlier blocks already converted), and the
            # output that brings its residual sum back to the teacher's: x_t + y_t - x_s. The
            # block then also corrects what the earlier blocks got wrong.
            x_s = collect_inputs(student, sample, settings.init_tokens, pad_id,
                                 settings.batch_size)[i]
            fit = init_block(block, ffn, x_s, split=settings.init_split,
                             target=xs[i] + ffn(xs[i]) - x_s)
        else:
            fit = init_block(block, ffn, xs[i], split=settings.init_split)
        errors.append(fit.refit)
        log.info("init layer %d: relative error %.3f", i, errors[-1])
    seconds = time.monotonic() - started
    left = max(settings.budget_s - setup_s - seconds, 2.0)
    info = {"seconds": seconds, "error": errors, "phase_budgets": {
        "layerwise": left * settings.layerwise_share,
        "end-to-end": left * (1.0 - settings.layerwise_share)}}
    write_state(student, saved)
    atomic_write_json(info_file, info)  # last: the init exists once its info does
    return info


def init_sample(rows: np.ndarray, seed: int) -> np.ndarray:
    """The training rows in the init's seeded order.

    A seeded random sample of the corpus, not its first documents: those are one text (the
    demo corpus starts with the Bible), and an init fitted there measured 48.2 on STS-B for
    MiniLM 8x7 against 69.5 from a random sample."""
    return rows[np.random.default_rng([seed, 2]).permutation(len(rows))]


def auto_allocation(source: SourceModel, rows: np.ndarray, settings: ConvertSettings,
                    pad_id: int, work: Path) -> dict[str, Any] | None:
    """For ``--fff auto:...`` the trees per layer (:mod:`.budget`), measured on the init's
    sample of the teacher's block inputs and saved under ``work`` (a resumed run, and the
    other processes, read it back); None for any other spec."""
    if not is_auto(settings.fff):
        return None
    saved = work / ALLOCATION_FILE
    if saved.is_file():
        return dict(json.loads(saved.read_text(encoding="utf-8")))
    dense = dense_ffns(source.model, FAMILIES[source.family])
    auto = parse_auto(settings.fff, int(dense[0].w1.shape[0]), source.n_layers)
    # the first tokens of the init's own sample (budget.plan reads at most MEASURE_TOKENS)
    xs = collect_inputs(source.model, init_sample(rows, settings.seed),
                        min(settings.init_tokens, MEASURE_TOKENS), pad_id, settings.batch_size)
    norms = [frozen_norm(n) for n in post_norms(source.model)]
    allocation = budget_plan(auto, list(xs), dense, norms, int(dense[0].w1.shape[0]),
                             max_tokens=MEASURE_TOKENS)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, allocation)
    return allocation


@torch.no_grad()
def collect_inputs(model: Any, rows: np.ndarray, n_tokens: int, pad_id: int,
                   batch_size: int) -> torch.Tensor:
    """The feed-forward inputs ``(L, n, d)`` of the first ``n <= n_tokens`` real tokens of
    ``rows`` in ``model`` (the source or the student: the same tokens in the same order)."""
    parts, have = [], 0
    for start in range(0, len(rows), batch_size):
        x = block_inputs(model, cut_batch(torch.from_numpy(rows[start:start + batch_size]),
                                          pad_id))
        parts.append(x)
        have += x.shape[1]
        if have >= n_tokens:
            break
    return torch.cat(parts, 1)[:, :n_tokens]


def write_state(module: Any, path: Path) -> None:
    """``module``'s tensors to ``path`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


# ------------------------------------------------------------------------------ phases
def distil(phase: str, student: Any, source: SourceModel, rows: np.ndarray,
           train_idx: np.ndarray, settings: ConvertSettings, pad_id: int, work: Path,
           budget_s: float, ctx: DistContext | None = None) -> dict[str, Any]:
    """One phase through the training loop (data-parallel over ``ctx``'s processes); resumes
    from its checkpoints; returns its log."""
    objective, params = phase_objective(phase, student, source, rows[train_idx], settings,
                                        pad_id)
    objective.to(_device_of(student))  # its buffers (the layers' scales) beside the blocks
    stream = LengthBucketedStream(rows, seed=settings.seed, indices=train_idx,
                                  lengths=(rows != pad_id).sum(1),
                                  batch_size=settings.batch_size)
    data = TeacherBatches(source.model, stream, batch_size=settings.batch_size,
                          mode="layerwise" if phase == "layerwise" else "end-to-end",
                          pad_id=pad_id, pooling=source.pooling, layers=settings.e2e_layers,
                          cache_bytes=int(settings.teacher_cache_gb * 2**30))
    optimizer = torch.optim.AdamW(params, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    steps = settings.max_steps
    config = LoopConfig(budget_s=None if steps else budget_s, max_steps=steps, grad_clip=1.0,
                        save_every_s=settings.save_every_s, progress_bar=settings.progress,
                        out_dir=work / phase, description=phase)
    schedule = phase_schedule(phase, student, settings)
    trainer = Trainer(objective, optimizer, schedule, data, config, ctx)
    info = trainer.restore() if settings.resume else None
    if info is not None and info.final:
        log.info("%s: finished before (step %d), not rerun", phase, info.step)
        return {**phase_log(trainer.state, budget_s, _logged_losses(work / phase)),
                **routing_log(phase, settings), "resumed_final": True}
    try:
        result = trainer.fit()
    finally:
        set_soft_routing(fff_blocks(student), None)  # the model is the hard-routed FFF
    # A resumed phase's history holds this session's steps only; its metrics file holds all.
    losses = (_logged_losses(work / phase) if info is not None
              else [h.loss for h in result.history])
    return {**phase_log(result.state, budget_s, losses), **routing_log(phase, settings)}


def phase_log(state: TrainState, budget_s: float, losses: list[float]) -> dict[str, Any]:
    """A phase's entry in ``conversion.json``: its counters (``state``: the whole
    phase, earlier sessions of a resumed run included), budget and first / last losses."""
    return {"steps": state.step, "tokens": state.tokens, "seconds": state.elapsed_s,
            "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s > 0 else None,
            "budget_s": budget_s, "first_loss": losses[0] if losses else None,
            "last_loss": _tail_mean(losses)}


def _logged_losses(phase_dir: Path) -> list[float]:
    """Every step's loss in the phase's ``metrics.jsonl`` (all sessions of a resumed run)."""
    return [float(r["loss"]) for r in read_metrics(phase_dir / METRICS_FILE) if "loss" in r]


def phase_schedule(phase: str, student: Any, settings: ConvertSettings) -> Any:
    """The phase's learning-rate schedule (warm-up, cosine), wrapped to set the routing
    temperature at every step under ``soft-to-hard`` (:mod:`.routing`)."""
    schedule = WarmupCosineSchedule(warmup=0.05)
    if settings.routing_schedule == "hard":
        return schedule
    start, span = phase_span(phase, settings.layerwise_share)
    return RoutingSchedule(schedule, fff_blocks(student), SoftToHard(
        settings.soft_temperature, settings.hard_from), start, span)


def routing_log(phase: str, settings: ConvertSettings) -> dict[str, Any]:
    """The phase's routing temperatures at its first and last step (``conversion.json``)."""
    if settings.routing_schedule == "hard":
        return {}
    anneal = SoftToHard(settings.soft_temperature, settings.hard_from)
    start, span = phase_span(phase, settings.layerwise_share)
    return {"routing": {"first_temperature": anneal.at(start),
                        "last_temperature": anneal.at(start + span * (1 - 1e-9))}}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _tail_mean(values: list[float], share: float = 0.1) -> float | None:
    if not values:
        return None
    tail = values[-max(1, int(len(values) * share)):]
    return float(sum(tail) / len(tail))


def phase_objective(phase: str, student: Any, source: SourceModel, rows: np.ndarray,
                    settings: ConvertSettings, pad_id: int
                    ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The phase's objective module and its optimizer parameter groups."""
    blocks = fff_blocks(student)
    fff_params = [p for b in blocks for p in b.parameters()]
    sample = cut_batch(torch.from_numpy(rows[:64]), pad_id).to(_device_of(source.model))
    if phase == "layerwise":
        return layerwise_objective(blocks, source, sample, settings.layerwise_space), [
            {"params": fff_params, "lr": settings.lr_layerwise}]
    hidden, _ = teacher_layers(source.model, sample, source.pooling)
    real = hidden[:, sample.attention_mask.bool()]
    scales = 1.0 / (real - real.mean(1, keepdim=True)).pow(2).sum(-1).mean(1).clamp_min(1e-12)
    ids = {id(p) for p in fff_params}
    # What the loss reads: the encoder without its pooler (heads and pooler get no gradient,
    # and DDP needs every trained parameter to get one).
    encoder = {id(p) for name, p in base_model_of(student).named_parameters()
               if not name.startswith("pooler.")}
    for p in student.parameters():
        if id(p) not in ids:
            p.requires_grad_(False)
    rest = [p for p in student.parameters() if id(p) in encoder and id(p) not in ids]
    for p in rest:
        p.requires_grad_(settings.lr_rest > 0)
    groups = [{"params": fff_params, "lr": settings.lr_fff}]
    if settings.lr_rest > 0:
        groups.append({"params": rest, "lr": settings.lr_rest})
    objective = EndToEndObjective(student, pooling=source.pooling, hidden_scales=scales,
                                  layers=settings.e2e_layers, cos_weight=settings.cos_weight,
                                  similarity_weight=settings.similarity_weight)
    return objective, groups


@torch.no_grad()
def layerwise_objective(blocks: list[Any], source: SourceModel, sample: Any, space: str
                        ) -> LayerwiseObjective:
    """The layer-by-layer objective in ``space``, each layer's term scaled by the spread of its
    dense target on ``sample`` (so every term is a relative error)."""
    norms = post_norms(source.model) if space == "post-norm" else None
    objective = LayerwiseObjective(blocks, torch.ones(len(blocks)), norms=norms)
    xs, ys = ffn_io(source.model, sample)
    targets = torch.stack([objective.view(i, x, y)
                           for i, (x, y) in enumerate(zip(xs, ys, strict=True))])
    spread = (targets - targets.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)
    scales: Any = objective.scales
    scales.copy_(1.0 / spread.clamp_min(1e-12))
    return objective


@dataclass(frozen=True)
class HeldoutSet:
    """Held-out text and what the teacher makes of it, computed once per run: the blocks'
    inputs and dense outputs ``(L, T, d)`` on the real tokens, which of those are ordinary
    (``ordinary`` ``(T,)``: neither a row's first nor its last token, i.e. not [CLS]/[SEP]),
    each layer's frozen post-block norm, and the pooled embeddings ``(B, d)``."""

    text: Any
    xs: torch.Tensor
    ys: torch.Tensor
    ordinary: torch.Tensor
    norms: list[Any]
    pooled: torch.Tensor
    pooling: str


@torch.no_grad()
def heldout_set(source: SourceModel, rows: np.ndarray, pad_id: int) -> HeldoutSet:
    """The teacher's side of :func:`heldout_fit` on ``rows``."""
    text = cut_batch(torch.from_numpy(rows), pad_id)
    xs, ys = ffn_io(source.model, text)
    _, pooled = teacher_outputs(source.model, text, source.pooling)
    mask = text.attention_mask.bool()
    position = torch.arange(mask.shape[1]).expand_as(mask)
    last = mask.sum(1, keepdim=True) - 1
    ordinary = ((position > 0) & (position < last))[mask]
    norms = [frozen_norm(n) for n in post_norms(source.model)]
    return HeldoutSet(text, xs, ys, ordinary, norms, pooled, source.pooling)


@torch.no_grad()
def removed_pooled_cosine(student: Any, held: HeldoutSet) -> float:
    """The ablation's mean pooled cosine to the dense model on the held-out text: ``student``
    with every feed-forward block's output set to zero (the rest as it is now: the source's
    tensors before any ``lr_rest`` tuning), for the scale of :func:`heldout_fit`'s cosine."""
    hooks = [block.register_forward_hook(lambda _m, _args, out: torch.zeros_like(out))
             for block in fff_blocks(student)]
    try:
        _, pooled = teacher_outputs(student, held.text, held.pooling)
    finally:
        for hook in hooks:
            hook.remove()
    return float(torch.nn.functional.cosine_similarity(pooled, held.pooled, dim=-1).mean())


def cosine_kept(cosine: float, removed: float) -> float:
    """How far ``cosine`` (the converted model's mean pooled cosine to the dense one) has come
    from the FFN-removed model's ``removed`` towards 1: ``(cosine - removed) / (1 - removed)``
    (1: as the dense model, 0: no better than removing the blocks; < 0: worse)."""
    return (cosine - removed) / max(1.0 - removed, 1e-9)


def quality_warning(heldout: dict[str, Any], threshold: float = POOR_COSINE_KEPT) -> str | None:
    """The end-of-run warning when the held-out pooled cosine kept (:func:`cosine_kept`) is
    under ``threshold``, naming what to change; None otherwise."""
    kept = heldout.get("pooled_cosine_kept")
    if kept is None or kept >= threshold:
        return None
    return (f"the converted model is far from the dense one on held-out text: pooled-embedding "
            f"cosine {heldout['pooled_cosine']:.3f} (FFN blocks removed: "
            f"{heldout['removed_pooled_cosine']:.3f}), {kept:.0%} of the way from removed to "
            f"dense (warned below {threshold:.0%}). Distil on more text like the text the "
            "model will embed (--corpus), for longer (--budget), or with more trees (--fff).")


@torch.no_grad()
def heldout_fit(student: Any, held: HeldoutSet, removed: float | None = None
                ) -> dict[str, Any]:
    """On held-out text: each block's relative error (all tokens), its post-norm error on the
    ordinary tokens (:func:`post_norm_error`) and the pooled embeddings' cosine; with the
    ablation's cosine ``removed`` (:func:`removed_pooled_cosine`), also that and
    :func:`cosine_kept`."""
    outs = [b(x) for b, x in zip(fff_blocks(student), held.xs, strict=True)]
    errors = [relative_error(out, y) for out, y in zip(outs, held.ys, strict=True)]
    ordinary = held.ordinary
    post = [post_norm_error(out[ordinary], x[ordinary], y[ordinary], norm)
            for out, x, y, norm in zip(outs, held.xs, held.ys, held.norms, strict=True)]
    _, pooled_s = teacher_outputs(student, held.text, held.pooling)
    cos = torch.nn.functional.cosine_similarity(pooled_s, held.pooled, dim=-1)
    fit: dict[str, Any] = {"rows": int(held.text.input_ids.shape[0]),
                           "block_error": errors, "post_norm_error": post,
                           "pooled_cosine": float(cos.mean())}
    if removed is not None:
        fit["removed_pooled_cosine"] = removed
        fit["pooled_cosine_kept"] = cosine_kept(fit["pooled_cosine"], removed)
    return fit


def post_norm_error(pred: torch.Tensor, x: torch.Tensor, y: torch.Tensor, norm: Any) -> float:
    """How far a block's output ``pred`` leaves the layer's output from the dense one, relative to
    removing the block: ``|N(x + pred) - N(x + y)|^2 / |N(x) - N(x + y)|^2`` over ``(T, d)``
    inputs ``x`` and dense outputs ``y``, ``N`` the layer's norm after the residual sum (0: the
    dense block's effect kept, 1: as if removed). In all-MiniLM-L6-v2 the [CLS] token carries
    73-99% of the block output's energy in layers 0-3, so the all-token relative error mostly
    measures [CLS]; this one is read on the ordinary tokens."""
    full = norm(x + y)
    return float((norm(x + pred) - full).pow(2).sum()
                 / (norm(x) - full).pow(2).sum().clamp_min(1e-30))


# ------------------------------------------------------------------------------ output
def save_model(student: Any, source: SourceModel, out: Path, report: ConvertReport
               ) -> None:
    """Write the model, the source's tokenizer and the report into ``out``; every file goes to a
    temporary folder first and is moved in, ``config.json`` last (a model dir exists once its
    config does)."""
    from transformers import AutoTokenizer

    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    for p in student.parameters():
        p.requires_grad_(True)
    student.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source.tokenizer_dir, local_files_only=True).save_pretrained(
        staging)
    atomic_write_json(staging / REPORT_FILE, asdict(report))
    write_sentence_transformers_files(report.settings["source"], staging)  # a no-op for non-ST
    names = sorted(p.name for p in staging.iterdir() if p.name != "config.json")
    for name in [*names, "config.json"]:
        (staging / name).replace(out / name)
    staging.rmdir()
