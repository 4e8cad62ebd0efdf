"""``ultrafastbert bench model --texts GLUE_DIR``: sentence embeddings from text, as a user pays.

Every embedder takes a list of texts and returns L2-normalised mean-pooled embeddings,
tokenization included (the same Rust ``tokenizers`` batch encoding for all). In one process:

- ours: a converted model through :class:`~ultrafastbert.infer.Predictor` (packed tokens) at
  each ``--precision``; its dense source through the same path (the ablation: what packing and
  precision give without FFF);
- the dense source as a CPU user would run it: PyTorch fp32 and bf16 (padded batches), ONNX
  Runtime fp32 and dynamic int8 with per-channel scales (:mod:`.baselines`), and OpenVINO
  (PyPI ``openvino``, reading the same ONNX file) where it is installed.

Two workloads: the STS-B dev sentences (``sentence1``, ``sentence2`` of each row, in file order)
in batches of 32, and 32 texts of 128 tokens. Each embedder's output is checked before timing
(cosine to the dense fp32 model and STS-B dev Spearman of the cosine similarity); timings are
interleaved rounds (one pass of each embedder per round), medians reported.
"""

from __future__ import annotations

import csv
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import baselines, common

logger = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], torch.Tensor]
BATCH = 32
#: ``--precision`` name of precision int8 with the FFF blocks' weights kept in float32 (the
#: int8 FFF kernel's comparison; ``ULTRAFASTBERT_FFF_INT8=0`` while its encoder is built).
INT8_FP32_FFF = "int8-fff32"
LONG_TOKENS = 128


# ------------------------------------------------------------------------------------ data
def stsb_dev(glue_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """STS-B dev: texts ``[s1_0, s2_0, s1_1, ...]`` in file order and the gold scores."""
    path = Path(glue_dir) / "STS-B" / "dev.tsv"
    if not path.is_file():
        path = Path(glue_dir) / "dev.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    a, b, s = head.index("sentence1"), head.index("sentence2"), head.index("score")
    texts = [t for row in rows[1:] for t in (row[a], row[b])]
    return texts, np.array([float(row[s]) for row in rows[1:]])


def long_texts(tokenizer: Any, texts: Sequence[str], n: int = BATCH,
               tokens: int = LONG_TOKENS) -> list[str]:
    """``n`` texts of about ``tokens`` tokens each (consecutive sentences joined, cut)."""
    out, current = [], ""
    for text in texts:
        current = f"{current} {text}".strip()
        ids = tokenizer.encode(current).ids
        if len(ids) >= tokens:
            out.append(tokenizer.decode(ids[1:tokens - 1]))
            current = ""
            if len(out) == n:
                break
    return out


# ------------------------------------------------------------------------------- embedders
def padded_tokenizer(directory: Path, max_length: int) -> Any:
    """The model's ``tokenizer.json`` padding to the longest text, truncating at ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    pad_id = tok.token_to_id("[PAD]") or 0
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    tok.enable_truncation(max_length)
    return tok


def _ids(tok: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encodings = tok.encode_batch(list(texts))
    ids = torch.tensor(np.array([e.ids for e in encodings], dtype=np.int64))
    mask = torch.tensor(np.array([e.attention_mask for e in encodings], dtype=np.int64))
    return ids, mask


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask[..., None].to(hidden.dtype)
    pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def torch_embedder(model: Any, tok: Any) -> Embedder:
    """A ``transformers`` encoder on padded batches (its dtype as loaded)."""
    def embed(texts: Sequence[str]) -> torch.Tensor:
        ids, mask = _ids(tok, texts)
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask,
                           token_type_ids=torch.zeros_like(ids)).last_hidden_state
        return _pool(hidden, mask)
    return embed


def onnx_embedder(encoder: Any, tok: Any) -> Embedder:
    """An :class:`~.baselines.OnnxEncoder` (or OpenVINO model) on padded batches."""
    def embed(texts: Sequence[str]) -> torch.Tensor:
        ids, mask = _ids(tok, texts)
        return _pool(encoder(ids, attention_mask=mask).last_hidden_state, mask)
    return embed


class OpenVinoEncoder:
    """The dense model's ONNX export compiled by OpenVINO for the CPU (``hint``: its
    ``INFERENCE_PRECISION_HINT``, ``f32`` or ``bf16``), with torch's thread count."""

    def __init__(self, onnx_path: Path, hint: str):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.version = ov.__version__

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.request.infer({"input_ids": ids.numpy(), "attention_mask":
                                  attention_mask.numpy(),
                                  "token_type_ids": np.zeros_like(ids.numpy())})
        return _Hidden(torch.from_numpy(np.asarray(out[self.compiled.output(0)])))


class _Hidden:
    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state


def predictor_embedder(predictor: Any) -> Embedder:
    """``Predictor.embed`` (packed tokens, its precision)."""
    def embed(texts: Sequence[str]) -> torch.Tensor:
        return predictor.embed(list(texts), normalize=True)
    return embed


def build_embedders(converted: Path, dense: Path, precisions: Sequence[str],
                    max_length: int) -> tuple[dict[str, Embedder], dict[str, Any], dict[str, str]]:
    """Every embedder of the comparison, the predictors (by name) and the skipped ones (why)."""
    from ..infer import Predictor
    from ..model.converted import load_transformers

    tok = padded_tokenizer(dense, max_length)
    embedders: dict[str, Embedder] = {}
    predictors: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    fp32 = load_transformers(dense).eval()
    embedders["dense torch fp32"] = torch_embedder(fp32, tok)
    bf16 = load_transformers(dense).eval().to(torch.bfloat16)
    embedders["dense torch bf16"] = torch_embedder(bf16, tok)
    onnx = _onnx(fp32, embedders, tok, skipped)
    if onnx is not None:
        _openvino(onnx, embedders, tok, skipped)
    for p in precisions:
        for label, directory in (("FFF", converted), ("dense", dense)):
            if label == "dense" and p in ("auto", INT8_FP32_FFF):
                continue  # the dense rows are the ablation at fixed precisions
            predictor = Predictor.from_pretrained(
                directory, precision="int8" if p == INT8_FP32_FFF else p, batch_size=BATCH)
            if p == INT8_FP32_FFF:
                _build_with_fp32_fff(predictor)
            chosen = predictor.precision_choice.chosen
            name = f"ours {label} {p}" + (f" ({chosen['short']}/{chosen['long']})"
                                          if p == "auto" else "")
            predictors[name] = predictor
            embedders[name] = predictor_embedder(predictor)
    return embedders, predictors, skipped


def _build_with_fp32_fff(predictor: Any) -> None:
    """Build ``predictor``'s int8 encoder with its FFF blocks' weights kept in float32."""
    import os

    from ..infer.precision import FFF_INT8_SWITCH

    before = os.environ.get(FFF_INT8_SWITCH)
    os.environ[FFF_INT8_SWITCH] = "0"
    try:
        predictor._encoder("int8")
    finally:
        if before is None:
            del os.environ[FFF_INT8_SWITCH]
        else:
            os.environ[FFF_INT8_SWITCH] = before


def _onnx(model: Any, embedders: dict[str, Embedder], tok: Any, skipped: dict[str, str]
          ) -> Path | None:
    missing = baselines.missing_extra("onnx")
    if missing:
        skipped["onnx"] = missing
        return None
    fp32 = baselines.OnnxEncoder(model, LONG_TOKENS)
    int8 = baselines.OnnxEncoder(model, LONG_TOKENS, int8=True)
    embedders["dense ORT fp32"] = onnx_embedder(fp32, tok)
    embedders["dense ORT int8 (dynamic, per-channel)"] = onnx_embedder(int8, tok)
    embedders["_keep"] = lambda texts: torch.empty(0)  # keeps the temp dirs alive
    embedders["_keep"].encoders = (fp32, int8)  # type: ignore[attr-defined]
    return Path(fp32._dir.name) / "model.onnx"


def _openvino(onnx_path: Path, embedders: dict[str, Embedder], tok: Any,
              skipped: dict[str, str]) -> None:
    try:
        for hint in ("f32", "bf16"):
            embedders[f"dense OpenVINO {hint}"] = onnx_embedder(OpenVinoEncoder(onnx_path, hint),
                                                                tok)
    except ImportError:
        skipped["openvino"] = "openvino is not installed: pip install 'ultrafastbert[openvino]'"
    except Exception as err:  # noqa: BLE001 - a baseline that fails to compile is reported
        skipped["openvino"] = f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------- measuring
def embed_all(embed: Embedder, texts: Sequence[str]) -> torch.Tensor:
    """Embeddings of ``texts`` in batches of :data:`BATCH` ``(N, d)``."""
    return torch.cat([embed(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)])


def quality(embeddings: torch.Tensor, reference: torch.Tensor, gold: np.ndarray
            ) -> dict[str, float]:
    """STS-B dev Spearman x100 of the pair cosines and the mean cosine to ``reference``."""
    from scipy.stats import spearmanr

    cos = torch.nn.functional.cosine_similarity(embeddings[0::2], embeddings[1::2]).numpy()
    return {"stsb_spearman": round(100 * float(spearmanr(cos, gold).statistic), 2),
            "cosine_to_dense_fp32": round(float(torch.nn.functional.cosine_similarity(
                embeddings, reference).mean()), 4)}


def time_rounds(embedders: dict[str, Embedder], batches: list[list[str]], rounds: int,
                ) -> dict[str, list[float]]:
    """Seconds per pass over ``batches`` of each embedder, ``rounds`` interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in embedders}
    for embed in embedders.values():  # warm-up
        embed(batches[0])
    for _ in range(rounds):
        for name, embed in embedders.items():
            start = time.perf_counter()
            for batch in batches:
                embed(batch)
            samples[name].append(time.perf_counter() - start)
    return samples


def route_change_rate(predictor: Any, reference: Any, texts: Sequence[str]) -> float | None:
    """Share of (token, tree, layer) FFF paths of ``predictor`` that differ from
    ``reference``'s (the same model at float32) on ``texts`` (None: no FFF layers)."""
    from ..fff import FFF

    def routes(p: Any) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        # The model's FFF modules and those its fast encoders run instead (int8 or bf16
        # weights: infer.precision.fff_at's copies); only the ones that run record routes, each
        # on its input as it got it.
        modules = [p.model, *getattr(p, "_fast", {}).values()]
        fffs = list({id(m): m for root in modules if root is not None
                     for m in root.modules() if isinstance(m, FFF)}.values())
        hooks = [m.register_forward_hook(lambda m, a, o: seen.append(
            m.forward_with_nodes(a[0].to(m.linear_in.weight.dtype).contiguous())[1]))
            for m in fffs]
        try:
            p.embed(list(texts))
        finally:
            for h in hooks:
                h.remove()
        return seen

    a, b = routes(predictor), routes(reference)
    if not a:
        return None
    differ = sum(int((x != y).any(-1).sum()) for x, y in zip(a, b, strict=True))
    total = sum(int(x.shape[0] * x.shape[1]) for x in a)
    return round(differ / total, 5)


def profile_ops(embed: Embedder, batches: list[list[str]], top: int = 12
                ) -> list[dict[str, Any]]:
    """Self CPU time per op kind over one pass (torch.profiler), plus tokenization / Python."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            embed(batch)
    wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = [{"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / 1e6 / wall, 4), "calls": e.count}
            for e in events[:top]]
    rows.append({"op": "(outside torch ops: tokenization, Python)",
                 "ms": round((wall - total_ops) * 1e3, 2),
                 "share": round(max(wall - total_ops, 0) / wall, 4), "calls": len(batches)})
    return rows


def outside_model_share(predictor: Any, texts: Sequence[str], repeats: int = 20
                        ) -> dict[str, float]:
    """``Predictor.embed`` on ``texts`` against the same call with the tokens given: the share
    of the time spent outside the model (tokenization, packing, Python)."""
    from ..infer.packing import Packing

    rows = predictor.tokenize(list(texts))
    flat = torch.tensor([i for r in rows for i in r])
    packing = Packing.from_lengths([len(r) for r in rows])
    encoder = predictor.fast_encoder_for(packing.n_texts, packing.n_tokens)

    def model_only() -> None:
        with torch.inference_mode():
            packing.pooled(encoder.hidden(flat, packing), "mean")

    total = common.median(common.time_call(lambda: predictor.embed(list(texts)),
                                           repeats=repeats))
    model = common.median(common.time_call(model_only, repeats=repeats))
    return {"embed_ms": round(total * 1e3, 3), "model_ms": round(model * 1e3, 3),
            "outside_share": round(max(total - model, 0.0) / total, 4)}


def run_texts(converted: Path, dense: Path, glue_dir: Path, precisions: Sequence[str],
              rounds: int = 3, n_texts: int | None = None, quality_only: bool = False,
              quality_from: Path | None = None, quality_pairs: int | None = None
              ) -> dict[str, Any]:
    """The whole comparison; returns rows, quality, routes, profiles and the environment.

    ``quality_only``: only the quality columns and route-change rates (no timing: this part
    may run outside the benchmark lock); ``quality_from``: read them from such a run's JSON
    (the same embedders) instead of computing them again; ``quality_pairs``: only the first so
    many STS-B pairs for the quality columns."""
    env = common.environment("cpu", dtypes=["float32", "bfloat16", "int8"])
    texts, gold = stsb_dev(glue_dir)
    embedders, predictors, skipped = build_embedders(converted, dense, precisions, 256)
    keep = embedders.pop("_keep", None)
    if quality_from is not None:
        import json

        saved = json.loads(Path(quality_from).read_text(encoding="utf-8"))
        checks, routes = saved["quality"], saved["routes"]
        for name, predictor in predictors.items():  # auto: the rows of what it chose
            fixed = name.split(" (")[0].replace(" auto", " " + predictor.precision_choice
                                                .chosen["short"])
            if name not in checks and fixed in checks:
                checks[name], routes[name] = checks[fixed], routes.get(fixed)
    else:
        pairs = quality_pairs or len(gold)
        checks, routes = _quality(embedders, predictors, texts[:2 * pairs], gold[:pairs])
    if quality_only:
        return {"environment": env, "quality": checks, "routes": routes, "rows": []}
    return _timed(env, embedders, predictors, skipped, checks, routes, texts, dense, rounds,
                  n_texts, keep)


def _quality(embedders: dict[str, Embedder], predictors: dict[str, Any], texts: list[str],
             gold: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality columns of every embedder and route-change rates of ours."""
    logger.info("checking quality of %d embedders on %d texts", len(embedders), len(texts))
    reference = embed_all(embedders["dense torch fp32"], texts)
    checks = {}
    for name, embed in embedders.items():
        checks[name] = quality(embed_all(embed, texts), reference, gold)
        logger.info("%s: %s", name, checks[name])
    fp32_ours = next(p for n, p in predictors.items() if n.startswith("ours FFF float32"))
    routes = {n: route_change_rate(p, fp32_ours, texts[:256]) for n, p in predictors.items()
              if n.startswith("ours FFF")}
    logger.info("route change rates %s", routes)
    return checks, routes


def _timed(env: dict[str, Any], embedders: dict[str, Embedder], predictors: dict[str, Any],
           skipped: dict[str, str], checks: dict[str, Any], routes: dict[str, Any],
           texts: list[str], dense: Path, rounds: int, n_texts: int | None, keep: Any
           ) -> dict[str, Any]:
    """Timing rounds, time outside the model and the profiles."""
    fp32_ours = next(p for n, p in predictors.items() if n.startswith("ours FFF float32"))
    tok = padded_tokenizer(dense, LONG_TOKENS)
    timed = texts[:n_texts] if n_texts else texts
    short = [timed[i:i + BATCH] for i in range(0, len(timed), BATCH)]
    long = [long_texts(tok, texts)]
    rows = []
    for work, batches in (("stsb-dev-batches-of-32", short), ("32x128", long)):
        samples = time_rounds(embedders, batches, rounds)
        logger.info("timed %s", work)
        n = sum(len(b) for b in batches)
        for name, s in samples.items():
            rows.append({"workload": work, "embedder": name, "texts": n,
                         "seconds": round(statistics.median(s), 4),
                         "texts_per_s": round(n / statistics.median(s), 1),
                         "min_s": round(min(s), 4), "rounds": len(s),
                         **checks.get(name, {}), "fff_route_change_rate": routes.get(name)})
    _ratios(rows)
    del keep
    short_texts = texts[:BATCH]
    outside = {n: outside_model_share(p, short_texts, repeats=10)
               for n, p in predictors.items()
               if n.startswith("ours FFF")}
    best = max((r for r in rows if r["workload"] == "stsb-dev-batches-of-32"
                and r["embedder"].startswith("ours FFF")), key=lambda r: r["texts_per_s"])
    profiles = {"after: " + best["embedder"]: profile_ops(embedders[best["embedder"]],
                                                          short[:8])}
    before = _padded_fp32(fp32_ours)
    profiles["before: FFF float32 padded (the model's own forward)"] = profile_ops(before,
                                                                                   short[:8])
    env.update(loadavg_after=common.loadavg(), skipped=skipped,
               auto_choice={n: p.precision_choice.to_json() for n, p in predictors.items()
                            if "auto" in n}, **_versions())
    return {"environment": env, "rows": rows, "outside_model": outside, "profiles": profiles}


def _padded_fp32(predictor: Any) -> Embedder:
    """The model's own padded forward (the path before packing) with the same tokenization."""
    def embed(texts: Sequence[str]) -> torch.Tensor:
        ids, mask = predictor.encode(list(texts))
        with torch.inference_mode():
            pooled = predictor.view.pooled(ids, mask, "mean").float()
        return torch.nn.functional.normalize(pooled, dim=-1)
    return embed


def _ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_ort_int8`` and ``vs_dense_torch_fp32`` per workload."""
    for work in {r["workload"] for r in rows}:
        mine = [r for r in rows if r["workload"] == work]
        base = {r["embedder"]: r["texts_per_s"] for r in mine}
        int8 = base.get("dense ORT int8 (dynamic, per-channel)")
        for r in mine:
            r["vs_ort_int8"] = round(r["texts_per_s"] / int8, 3) if int8 else None
            r["vs_dense_torch_fp32"] = round(r["texts_per_s"] / base["dense torch fp32"], 3)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for package in ("transformers", "onnxruntime", "openvino", "tokenizers"):
        try:
            out[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[f"{package}_version"] = None
    return out


COLUMNS = ("workload", "embedder", "texts_per_s", "vs_ort_int8", "vs_dense_torch_fp32",
           "stsb_spearman", "cosine_to_dense_fp32", "fff_route_change_rate")


def report(result: dict[str, Any]) -> str:
    """The tables as text."""
    parts = [common.speed_summary(result["environment"]),
             common.format_table(result["rows"], COLUMNS),
             "time outside the model in Predictor.embed (32 texts):",
             common.format_table([{"embedder": k, **v} for k, v in
                                  result["outside_model"].items()],
                                 ("embedder", "embed_ms", "model_ms", "outside_share"))]
    for name, rows in result["profiles"].items():
        parts += [f"profile, {name}:", common.format_table(rows, ("op", "ms", "share", "calls"))]
    return "\n\n".join(parts)


def write(out_dir: str | Path, result: dict[str, Any]) -> list[Path]:
    """JSON, CSV and the text report."""
    from ..utils.io import atomic_write_text

    paths = common.write_results(out_dir, "bench_texts", result["rows"], result["environment"],
                                 {k: v for k, v in result.items()
                                  if k not in ("rows", "environment")})
    path = Path(out_dir) / "report.txt"
    atomic_write_text(path, report(result) + "\n")
    return [*paths, path]
