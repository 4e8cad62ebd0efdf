"""``ultrafastbert bench model``: whole-encoder throughput and latency, outputs checked first.

In one process and with the same inputs: UltraFastBERT-1x11 against crammedBERT-4095 and -3072
(the same encoder code with a dense GELU FF) and Hugging Face ``BertModel`` (bert-base config,
random weights, its default attention), as shipped and with its ``nn.Linear`` layers on the same
prepacked oneDNN GEMMs our encoder uses (``model.linear``), so the speedup over it is not a
matter of GEMM libraries; in bfloat16 also ``BertModel`` under ``torch.autocast`` (fp32
weights, bf16 GEMMs). A model directory (``--models DIR``) is timed as it loads; for a
converted one, its dense source (``conversion.json``, or ``--dense-source``) comes with the
baselines a CPU user would pick instead (:mod:`.baselines`): the torch model in fp32, bf16 and
autocast, sentence-transformers, and ONNX Runtime in fp32 and dynamic int8. Every FFF model is
reported against the fastest dense model of the same dtype and of any dtype.
Before timing, each of our models is compared step by
step with the float64 reference encoder (``model.reference``); ``BertModel``'s default attention
is compared with its eager attention. Then the models are timed in interleaved rounds (one call
of each per round, so a change in machine load hits all of them alike): median latency,
tokens/s, speedups, and a per-part profile (embedding / attention / FF / norms / rest, plus the
MLM head) of where the time goes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, RunError
from ..model import ModelConfig, UltraFastBertModel
from ..model.linear import packed_linear_unavailable, use_packed_linears
from ..model.pretrained import fff_compute_dtype
from ..model.reference import compare_layerwise
from ..utils.options import comma_list, option, positive_int
from . import baselines, common
from .baselines import Skipped

logger = logging.getLogger(__name__)

FFF_MODEL = "ultrafastbert-1x11"
HF_MODEL = "hf-bert-base"
HF_PACKED = "hf-bert-base-onednn"
HF_AUTOCAST = "hf-bert-base-autocast"
HF_MODELS = (HF_MODEL, HF_PACKED)
MODELS = (FFF_MODEL, "crammedbert-4095", "crammedbert-3072", *HF_MODELS, HF_AUTOCAST)
BATCHES = (1, 8, 32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Step-wise relative error allowed against the float64 reference, and the logit margin under
#: which a row's route may legitimately differ (excluded and counted).
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 6e-2}
CHECK_MARGIN = {"float32": 1e-4, "bfloat16": 1e-2}
#: ``BertModel`` is compared end to end (12 layers of rounding in bf16), not step by step.
#: In bf16 its error over the RMS is no measure (outlier channels): see ``baselines.BF16_RULE``.
HF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": baselines.BF16_RULE}
#: The FFF blocks of a transformers model against the float64 reference: largest error on the
#: tokens routed alike, over the reference output's RMS. Trained BERT FFN outputs have outlier
#: channels 30-160x their RMS (all-MiniLM-L6-v2 converted to 8x7), so fp32 rounding, ~1e-7 of
#: the largest output, reaches ~1e-4 of the RMS; a wrong kernel is off by far more than 1e-3.
FFF_VALUE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}
CHECK_SHAPE = (2, 128)
TABLE_COLUMNS = ("model", "dtype", "runtime", "batch", "seq_len", "latency_ms", "tokens_per_s",
                 "fff_model_speedup", "speedup_vs_fastest_dense",
                 "speedup_vs_fastest_dense_any_dtype")
FASTEST_COLUMNS = ("dtype", "batch", "model", "runtime", "latency_ms")
PROFILE_COLUMNS = ("model", "dtype", "batch", "part", "ms", "min_ms", "share")


@dataclass(frozen=True)
class ModelBenchSettings:
    """What to run; everything recorded with the results. :func:`resolve` checks the names and
    adds a converted model's dense baselines."""

    models: tuple[str, ...] = option(
        MODELS, parse=comma_list(str), show="all of these",
        help=f"comma-separated subset of {','.join(MODELS)}, any preset name, or model "
             "directories (a converted model brings its dense source's baselines); a directory "
             "may carry a prefix: autocast:DIR (bf16 autocast), st:DIR (sentence-transformers), "
             "onnx:DIR, onnx-int8:DIR (ONNX Runtime fp32 / dynamic int8)")
    batches: tuple[int, ...] = option(BATCHES, parse=comma_list(positive_int),
                                      help="batch sizes")
    seq_len: int = option(128, parse=positive_int, help="tokens per sequence")
    dtypes: tuple[str, ...] = option(tuple(DTYPES), parse=comma_list(str),
                                     help="float32 and/or bfloat16")
    device: str = option("cpu", help="cpu or cuda (cuda times with CUDA events)")
    warmup: int = option(1, help="untimed calls first")
    repeats: int = option(5, help="timed samples, median reported")
    max_seconds: float = option(20.0, help="stop sampling after about this long per model (at "
                                           "least 3 rounds)")
    profile_batch: int | None = option(8, help="batch of the per-part profile (0: no profile)")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.profile_batch:  # 0 and None alike: no profile
            object.__setattr__(self, "profile_batch", None)


def resolve(s: ModelBenchSettings, dense_source: str | None = None,
            dense_baselines: bool = True) -> ModelBenchSettings:
    """``s`` checked (known dtypes and models, positive sizes, the extras the models need) with
    each converted model directory's dense baselines added (:func:`with_dense_baselines`)."""
    bad = [d for d in s.dtypes if d not in DTYPES]
    if bad:
        raise InputError(f"--dtypes must be among {list(DTYPES)}, got {bad}")
    known = set(MODELS) | _presets()
    unknown = [m for m in s.models if m not in known and not _is_model_dir(
        baselines.split_name(m)[1])]
    if unknown:
        raise InputError(f"unknown models {unknown}; choose from {sorted(known)}, a model "
                         f"directory, or a directory with a prefix {sorted(baselines.PREFIXES)}")
    if min(s.batches, default=0) < 1 or s.seq_len < 1:
        raise InputError("--batches and --seq-len must be positive")
    models = with_dense_baselines(tuple(s.models), dense_source, dense_baselines)
    hf = [m for m in models if _needs_transformers(m)]
    if hf and importlib.util.find_spec("transformers") is None:
        raise InputError(f"the {hf[0]} baseline needs transformers: pip install "
                         f"'ultrafastbert[hf]', or leave it out of --models")
    return dataclasses.replace(s, models=models)


def text_models(models: Sequence[str], dense_source: str | None) -> tuple[Path, Path]:
    """``bench model --texts``: the one converted model directory among ``models`` and its
    dense source (``dense_source``, else the one its ``conversion.json`` names)."""
    dirs = [m for m in models if _is_model_dir(m)]
    if len(dirs) != 1:
        raise InputError("--texts needs exactly one converted model directory in --models")
    converted = Path(dirs[0])
    dense = Path(dense_source) if dense_source else baselines.source_of(converted)
    if dense is None:
        raise InputError(f"{converted} names no dense source; pass --dense-source DIR")
    return converted, dense


def _needs_transformers(name: str) -> bool:
    return name in (*HF_MODELS, HF_AUTOCAST) or _is_model_dir(baselines.split_name(name)[1])


def with_dense_baselines(models: tuple[str, ...], dense_source: str | None,
                         add: bool = True) -> tuple[str, ...]:
    """``models`` plus, after each converted model directory, the baselines of its dense source
    (:func:`baselines.dense_baselines`; ``dense_source`` overrides the one its
    ``conversion.json`` names) that are not listed yet. Unchanged when ``add`` is False."""
    if not add:
        return models
    out = list(models)
    for name in models:
        if baselines.split_name(name)[0] is not None or not _is_model_dir(name):
            continue
        source = Path(dense_source) if dense_source else baselines.source_of(Path(name))
        if source is None:
            continue
        if not _is_dense_dir(source):
            raise InputError(f"dense source {source} is not a dense model directory (a "
                             "BERT-family transformers or sentence-transformers folder); pass "
                             "the model the conversion started from with --dense-source")
        out += [b for b in baselines.dense_baselines(source) if b not in out]
    return tuple(out)


def _is_model_dir(name: str) -> bool:
    """A transformers model directory (converted or dense BERT-family)."""
    from ..model.layouts import transformers_model_type

    return Path(name).is_dir() and transformers_model_type(Path(name)) is not None


def _is_dense_dir(path: Path) -> bool:
    """A dense (not converted) transformers model directory."""
    from ..model.layouts import transformers_model_type

    kind = transformers_model_type(path) if path.is_dir() else None
    return kind is not None and not kind.startswith("ultrafastbert-")


def _presets() -> set[str]:
    from ..model.config import PRESETS

    return set(PRESETS)


# ------------------------------------------------------------------------------------- models
def build_model(name: str, dtype: torch.dtype, device: str, seq_len: int
                ) -> nn.Module | Skipped:
    """One of ours from its preset (eval mode), Hugging Face ``BertModel`` (bert-base;
    ``HF_PACKED``: its linear layers on prepacked oneDNN GEMMs, like ours; ``HF_AUTOCAST``: fp32
    under bf16 autocast), a model directory, or a prefixed baseline of one (:mod:`.baselines`:
    built around the fp32 torch model; :class:`Skipped` when its extra is missing)."""
    torch.manual_seed(0)
    prefix, target = baselines.split_name(name)
    if name == HF_AUTOCAST:
        prefix, target = "autocast", HF_MODEL
    if prefix is not None:
        reference = build_model(target, torch.float32, device, seq_len)
        assert not isinstance(reference, Skipped)
        return baselines.build(f"{prefix}:{target}", reference, seq_len)
    if _is_model_dir(name):
        from ..model.auto import from_pretrained
        from ..model.converted import base_model_of
        from ..model.pretrained import set_precision

        loaded = from_pretrained(name, device=device)
        set_precision(loaded, dtype, fff_compute_dtype(device, dtype))
        return base_model_of(loaded).eval()
    if name in HF_MODELS:
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig(max_position_embeddings=max(512, seq_len)),
                         add_pooling_layer=False)
        if name == HF_PACKED:
            use_packed_linears(bert)
        return bert.to(device=device, dtype=dtype).eval()
    config = ModelConfig.from_preset(name)
    if seq_len > config.max_seq_len:
        config = config.replace(max_seq_len=seq_len)
    model = UltraFastBertModel(config).to(device)
    return model.set_precision(dtype, fff_compute_dtype(device, dtype)).eval()


def is_fff_model(model: Any) -> bool:
    """Whether ``model`` has FFF blocks (the models the dense baselines are compared with)."""
    from ..fff import FFF

    return isinstance(model, nn.Module) and any(isinstance(m, FFF) for m in model.modules())


def vocab_size(model: nn.Module) -> int:
    """Vocabulary size of either kind of model."""
    return model.config.vocab_size


def random_ids(model: nn.Module, batch: int, seq_len: int, device: str, seed: int
               ) -> torch.Tensor:
    """Distinct random token ids ``(batch, seq_len)`` avoiding the first 7 (special) ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab_size(model), (batch, seq_len), generator=gen)
    return ids.to(device)


def forward_fn(model: Any, ids: torch.Tensor) -> Callable[[], Any]:
    """A no-argument callable running the encoder on ``ids`` under ``inference_mode``."""
    def call() -> Any:
        with torch.inference_mode():
            return model(ids)
    return call


# ------------------------------------------------------------------------------------ checking
def check_model(name: str, model: nn.Module, dtype_name: str, s: ModelBenchSettings
                ) -> dict[str, Any]:
    """Compare the model's fast path with a reference before timing; raise if it disagrees."""
    ids = random_ids(model, CHECK_SHAPE[0], min(CHECK_SHAPE[1], s.seq_len), s.device, s.seed + 1)
    mask = torch.ones_like(ids)
    mask[-1, ids.shape[1] // 2:] = 0  # one padded row: exercises the masks and the FF row skip
    if name == HF_AUTOCAST or baselines.split_name(name)[0] is not None:
        report = baselines.check_baseline(name if name != HF_AUTOCAST else "autocast:",
                                          model, ids, mask)
        report.update(model=name, dtype=dtype_name)
        if not report["ok"]:
            raise RunError(f"output check failed for {name} / {dtype_name}: {report}")
        return report
    if name in HF_MODELS or _is_model_dir(name):
        report = _check_hf(model, ids, mask)
        report.update(_check_fff_blocks(model, ids, mask))
    else:
        rep = compare_layerwise(model, ids, mask, margin=CHECK_MARGIN[dtype_name])
        report = {"max_rel_error": rep.max_rel_error, "rows_compared": rep.rows_compared,
                  "rows_excluded_near_zero_logit": rep.rows_excluded,
                  "reference": "float64 reference encoder, step by step"}
    hf_like = name in HF_MODELS or _is_model_dir(name)
    tolerance = (HF_CHECK_TOLERANCE if hf_like else CHECK_TOLERANCE)[dtype_name]
    close = (baselines.bf16_ok(report) if isinstance(tolerance, dict)
             else report["max_rel_error"] <= tolerance)
    ok = (report["rows_compared"] > 0 and close
          and report.get("fff_route_agreement", 1.0) >= 0.999
          and report.get("fff_max_rel_error", 0.0) <= FFF_VALUE_TOLERANCE[dtype_name])
    report.update(model=name, dtype=dtype_name, tolerance=dict(tolerance) if isinstance(
        tolerance, dict) else tolerance, ok=ok)
    if "fff_max_rel_error" in report:
        report["fff_tolerance"] = FFF_VALUE_TOLERANCE[dtype_name]
    if not ok:
        raise RunError(f"output check failed for {name} / {dtype_name}: {report}")
    return report


def _check_hf(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """``BertModel`` with its default attention against its eager attention."""
    with torch.inference_mode():
        fast = model(ids, attention_mask=mask).last_hidden_state.double()
        default = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            ref = model(ids, attention_mask=mask).last_hidden_state.double()
        finally:
            model.set_attn_implementation(default)
    return {**baselines.compare_states(fast, ref, mask),
            "reference": f"same BertModel, eager attention (timed: {default})"}


def check_fff_layer(f: Any, x: torch.Tensor) -> tuple[float, float]:
    """One FFF layer's inference kernel against the float64 reference on inputs ``x``
    ``(T, d)``: routes first (the share of tokens on the same paths), then the largest error
    on the agreeing tokens relative to the reference output's RMS."""
    from ..fff import fff_reference

    with torch.inference_mode():
        y, nodes = f.forward_with_nodes(x)
    ref = fff_reference(x, f.linear_in.weight, f.linear_in.bias, f.linear_out.weight,
                        f.n_trees, f.depth)
    same = (nodes == ref.nodes).flatten(1).all(1)
    scale = float(ref.y.double().pow(2).mean().sqrt()) or 1.0
    err = (float((y[same].double() - ref.y[same].double()).abs().max()) / scale
           if bool(same.any()) else 0.0)
    return float(same.float().mean()), err


def _check_fff_blocks(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
                      ) -> dict[str, Any]:
    """Every FFF in ``model`` against the float64 reference on the inputs it really gets:
    routes first (share of tokens on the same paths), then values on the agreeing tokens."""
    from ..fff import FFF

    layers = [m for m in model.modules() if isinstance(m, FFF)]
    if not layers:
        return {}
    inputs: list[torch.Tensor] = []
    hooks = [f.register_forward_hook(lambda _m, args, _o: inputs.append(args[0]))
             for f in layers]
    try:
        with torch.inference_mode():
            model(ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    agree, err = 1.0, 0.0
    for f, x in zip(layers, inputs, strict=True):
        layer_agree, layer_err = check_fff_layer(f, x.reshape(-1, f.d_model))
        agree, err = min(agree, layer_agree), max(err, layer_err)
    return {"fff_layers_checked": len(layers), "fff_route_agreement": agree,
            "fff_max_rel_error": err}


# ------------------------------------------------------------------------------------- timing
def _seconds(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call (CUDA events on a GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    start_t = time.perf_counter()
    fn()
    return time.perf_counter() - start_t


def time_interleaved(fns: dict[str, Callable[[], Any]], s: ModelBenchSettings
                     ) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled in rounds (one call of each per round).

    Interleaving spreads any change in machine load over all candidates alike, so ratios stay
    fair on a shared machine. At least 3 rounds; stops after ``repeats`` rounds or once the
    rounds took ``max_seconds`` per function.
    """
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for done in range(1, max(s.repeats, 3) + 1):
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, s.device))
        if done >= 3 and time.perf_counter() - start > s.max_seconds * len(fns):
            break
    return samples


def bench_batch(models: dict[str, Any], dtype_name: str, batch: int,
                s: ModelBenchSettings) -> list[dict[str, Any]]:
    """One row per model for this batch size: median latency and tokens/s (interleaved)."""
    calls = {name: forward_fn(m, random_ids(m, batch, s.seq_len, s.device, s.seed))
             for name, m in models.items()}
    rows = []
    for name, samples in time_interleaved(calls, s).items():
        latency = common.median(samples)
        rows.append({"model": name, "dtype": dtype_name, "runtime": baselines.runtime_of(name)
                     if name != HF_AUTOCAST else "torch.autocast bfloat16",
                     "kind": "fff" if is_fff_model(models[name]) else "dense",
                     "batch": batch, "seq_len": s.seq_len,
                     "latency_ms": 1e3 * latency, "tokens_per_s": batch * s.seq_len / latency,
                     "min_ms": 1e3 * min(samples), "max_ms": 1e3 * max(samples),
                     "samples": len(samples)})
        logger.info("%s %s batch %d: %.1f ms", name, dtype_name, batch, 1e3 * latency)
    return rows


def skipped_rows(skipped: list[Skipped], dtype_name: str, s: ModelBenchSettings
                 ) -> list[dict[str, Any]]:
    """One row per baseline that cannot run here, with the reason instead of timings."""
    return [{"model": sk.name, "dtype": dtype_name, "runtime": baselines.runtime_of(sk.name),
             "kind": "dense", "batch": batch, "seq_len": s.seq_len, "skipped": sk.reason}
            for sk in skipped for batch in s.batches]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speedups, from the timed rows (skipped rows get none):

    - ``fff_model_speedup``: this row's latency / the reference FFF model's (UltraFastBERT-1x11
      when it was run, else the first FFF model), same dtype and batch;
    - on FFF rows, ``speedup_vs_fastest_dense``: the fastest dense model's latency in the same
      dtype and batch / this row's (``fastest_dense`` names it), and
      ``speedup_vs_fastest_dense_any_dtype``: the same over every dtype and runtime measured.
    """
    timed = [r for r in rows if "latency_ms" in r]
    fff_names = list(dict.fromkeys(r["model"] for r in timed if r["kind"] == "fff"))
    ref_name = FFF_MODEL if FFF_MODEL in fff_names else (fff_names[0] if fff_names else None)
    fff = {(r["dtype"], r["batch"]): r["latency_ms"] for r in timed if r["model"] == ref_name}
    best: dict[tuple[str, int], dict[str, Any]] = {}
    best_any: dict[int, dict[str, Any]] = {}
    for r in timed:
        if r["kind"] != "dense":
            continue
        key = (r["dtype"], r["batch"])
        if key not in best or r["latency_ms"] < best[key]["latency_ms"]:
            best[key] = r
        if r["batch"] not in best_any or r["latency_ms"] < best_any[r["batch"]]["latency_ms"]:
            best_any[r["batch"]] = r
    for r in timed:
        base = fff.get((r["dtype"], r["batch"]))
        r["fff_model_speedup"] = r["latency_ms"] / base if base else None
        if r["kind"] != "fff":
            continue
        same, anyd = best.get((r["dtype"], r["batch"])), best_any.get(r["batch"])
        r["speedup_vs_fastest_dense"] = same["latency_ms"] / r["latency_ms"] if same else None
        r["fastest_dense"] = same["model"] if same else None
        r["speedup_vs_fastest_dense_any_dtype"] = (anyd["latency_ms"] / r["latency_ms"]
                                                   if anyd else None)
        r["fastest_dense_any_dtype"] = f"{anyd['model']} ({anyd['dtype']})" if anyd else None


def fastest_dense(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest timed dense model per dtype and batch."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["dtype"], r["batch"])
        if r.get("kind") == "dense" and "latency_ms" in r and (
                key not in best or r["latency_ms"] < best[key]["latency_ms"]):
            best[key] = r
    return list(best.values())


# ------------------------------------------------------------------------------------ profile
def profile_parts(name: str, model: UltraFastBertModel, dtype_name: str, batch: int,
                  s: ModelBenchSettings) -> list[dict[str, Any]]:
    """Time each part in isolation on realistic activations (interleaved with the whole
    forward); per-layer parts are timed on layer 0 and multiplied by ``n_layers``.

    ``rest`` is the whole forward minus the parts (residual adds, reshapes, Python). ``head``
    (the tied MLM decoder on every position) is not part of the encoder and is shown apart.
    """
    ids = random_ids(model, batch, s.seq_len, s.device, s.seed)
    n_layers = len(model.layers)
    with torch.inference_mode():
        x = model.embedding(ids)
        layer = model.layers[0]
        h1 = layer.norm1(x)
        h2 = layer.norm2(x + layer.attn(h1, None))
    weight = model.embedding.word_embedding.weight
    counts = {"embedding": 1, "attention": n_layers, "feed-forward": n_layers,
              "norms": 2 * n_layers + 1, "total (encoder)": 1, "head": 1}
    fns = {"embedding": forward_fn(model.embedding, ids),
           "attention": _no_grad(lambda: layer.attn(h1, None)),
           "feed-forward": _no_grad(lambda: layer._feed_forward(h2)),
           "norms": _no_grad(lambda: layer.norm1(x)),
           "total (encoder)": forward_fn(model, ids),
           "head": _no_grad(lambda: torch.nn.functional.linear(x, weight))}
    samples = time_interleaved(fns, s)
    times = {part: common.median(v) * counts[part] for part, v in samples.items()}
    best = {part: min(v) * counts[part] for part, v in samples.items()}
    total, head = times.pop("total (encoder)"), times.pop("head")
    times["rest"] = max(total - sum(times.values()), 0.0)
    times["total (encoder)"] = total
    times["head (MLM decoder, all positions; not in total)"] = head
    best["head (MLM decoder, all positions; not in total)"] = best.pop("head")
    return [{"model": name, "dtype": dtype_name, "batch": batch, "part": part, "ms": 1e3 * t,
             "min_ms": 1e3 * best[part] if part in best else None, "share": t / total}
            for part, t in times.items()]


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return fn()
    return call


# ---------------------------------------------------------------------------------------- run
def run_bench(s: ModelBenchSettings) -> dict[str, Any]:
    """Check, time and profile every model and dtype; returns rows, checks and the env."""
    env = common.environment(s.device, dtypes=list(s.dtypes))
    env.update(seq_len=s.seq_len, loadavg_before=_loadavg(), settings=s.__dict__.copy(),
               **_runtime_versions())
    rows, checks, profile = [], [], []
    for dtype_name in s.dtypes:
        built = {name: build_model(name, DTYPES[dtype_name], s.device, s.seq_len)
                 for name in s.models if baselines.applies(name, dtype_name)
                 and (name != HF_AUTOCAST or dtype_name == "bfloat16")}
        models = {n: m for n, m in built.items() if not isinstance(m, Skipped)}
        skipped = [m for m in built.values() if isinstance(m, Skipped)]
        checks += [check_model(name, m, dtype_name, s) for name, m in models.items()]
        checks += [{"model": sk.name, "dtype": dtype_name, "ok": None, "skipped": sk.reason}
                   for sk in skipped]
        rows += skipped_rows(skipped, dtype_name, s)
        for batch in s.batches:
            rows += bench_batch(models, dtype_name, batch, s)
        if s.profile_batch:
            profile += [r for name, m in models.items() if isinstance(m, UltraFastBertModel)
                        for r in profile_parts(name, m, dtype_name, s.profile_batch, s)]
        del models
    add_speedups(rows)
    env["loadavg_after"] = _loadavg()
    env["fff_kernel"] = _fff_kernels(s)
    env["linear_layers"] = _linear_kind(s)
    return {"environment": env, "rows": rows, "checks": checks, "profile": profile}


def _loadavg() -> list[float] | None:
    return common.loadavg()


def _runtime_versions() -> dict[str, str | None]:
    """Versions of the runtimes the baselines may use (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for package in ("transformers", "sentence-transformers", "onnxruntime", "onnx"):
        try:
            out[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[f"{package}_version"] = None
    return out


def _fff_kernels(s: ModelBenchSettings) -> dict[str, str]:
    """Per model dtype: the FFF blocks' precision and the kernel the dispatcher picks for it."""
    from ..fff import dispatch

    out = {}
    for name in s.dtypes:
        fff_dtype = fff_compute_dtype(s.device, DTYPES[name])
        kernel = dispatch.select("auto", s.device, fff_dtype).name
        out[name] = f"{kernel} ({str(fff_dtype).replace('torch.', '')})"
    return out


def _linear_kind(s: ModelBenchSettings) -> dict[str, str]:
    """Per model dtype: the GEMM our attention / dense FF layers (and ``HF_PACKED``) use."""
    out = {}
    for name in s.dtypes:
        reason = packed_linear_unavailable(torch.device(s.device), DTYPES[name])
        out[name] = "oneDNN, prepacked" if reason is None else f"plain nn.Linear ({reason})"
    return out


def write(out_dir: str | Path, result: dict[str, Any]) -> list[Path]:
    """CSV/JSON of the timings, checks and profile, and a PNG chart."""
    env = result["environment"]
    files = common.write_results(out_dir, "bench_model", result["rows"], env)
    files += common.write_results(out_dir, "bench_model_checks", result["checks"], env)
    if result["profile"]:
        files += common.write_results(out_dir, "bench_model_profile", result["profile"], env)
    try:
        files.append(plot_throughput(Path(out_dir) / "bench_model.png", result["rows"], env))
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install ultrafastbert[bench])")
    return files


def plot_throughput(path: Path, rows: list[dict[str, Any]], env: dict[str, Any]) -> Path:
    """Grouped bars of tokens/s: one panel per dtype, one group per batch, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_path

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    rows = [r for r in rows if "latency_ms" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), dpi=120,
                             squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for i, model in enumerate(models):
            tps = {r["batch"]: r["tokens_per_s"] for r in rows
                   if r["dtype"] == dtype and r["model"] == model}
            ax.bar([b + (i - len(models) / 2 + 0.5) * width for b in range(len(batches))],
                   [tps.get(b, 0.0) for b in batches], width, label=model)
        ax.set_xticks(range(len(batches)), [f"{b}x{rows[0]['seq_len']}" for b in batches])
        ax.set(title=f"{dtype}, {env['torch_threads']} threads", xlabel="batch",
               ylabel="tokens / s (higher is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Whole encoder, same process (bench model)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
