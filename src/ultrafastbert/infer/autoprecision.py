"""``precision="auto"``: the fastest precision whose embeddings pass the accuracy rule, measured.

For a model, this CPU and its thread count, every precision that can run here
(:func:`~.precision.unavailable`) is

1. checked: pooled embeddings of held-out text (:func:`held_out_texts`: sentences of the
   package's public-domain demo corpus, never training data of a converted model) must keep a
   mean cosine >= :data:`MIN_COSINE` to the float32 path's;
2. timed on two workloads, ``short`` (batches of 32 of those sentences, median ~20 tokens)
   and ``long`` (32 texts of 128 tokens): the median of :data:`REPEATS` calls, candidates
   interleaved so that load drifts hit them alike.

Per workload the fastest that passes is chosen (float32 when none is faster). The choice, the
timings and the cosines are cached per CPU like the native kernel's knobs
(``fff.native.tuning.cached``: ``<cache>/tuning/knobs-<cpu>.json``, entry ``encoder-precision``),
so a process measures once per model shape and thread count; ``ultrafastbert kernels
--model DIR`` prints the entry. With ``ULTRAFASTBERT_AUTOTUNE=0`` nothing is measured and
``auto`` is float32. The STS-B part of the accuracy rule (within 0.3 points of float32) needs
GLUE data the package does not ship: ``bench model`` measures it for each precision.
"""

from __future__ import annotations

import importlib.resources
import logging
import lzma
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .packing import Packing
from .precision import PRECISIONS, unavailable

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99
REPEATS = 5
WORKLOADS = ("short", "long")
LONG_TOKENS = 128
#: Mean tokens per text from which a batch counts as ``long``.
LONG_FROM = 64
#: The cache entry's name; its version goes up whenever the packed path's speed changes (v3: the
#: float32 matmul attention at sentence widths; v4: int8 FFF weights at precision int8 and the
#: native packed attention), so choices timed on the old path are not reused.
CACHE_KEY = "encoder-precision-v4"

#: ``encode(texts) -> (ids (T,), packing)``.
Encode = Callable[[list[str]], tuple[torch.Tensor, Packing]]
#: ``pooled(precision, ids, packing) -> (N, d)``.
Pooled = Callable[[str, torch.Tensor, Packing], torch.Tensor]


@dataclass(frozen=True)
class Choice:
    """The precision ``auto`` runs per workload, with the measurements behind it."""

    chosen: dict[str, str]
    reasons: dict[str, str]
    cosine: dict[str, float] = field(default_factory=dict)
    ms: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def for_tokens(self, n_texts: int, n_tokens: int) -> str:
        """The precision for a batch of ``n_texts`` texts holding ``n_tokens`` tokens."""
        long = n_texts and n_tokens / n_texts >= LONG_FROM
        return self.chosen["long" if long else "short"]

    def to_json(self) -> dict[str, Any]:  # noqa: D102
        return {"chosen": self.chosen, "reasons": self.reasons, "cosine": self.cosine,
                "ms": self.ms, "refused": self.refused}

    @classmethod
    def from_json(cls, entry: Any) -> Choice | None:
        """The choice in a cache entry, None when malformed."""
        try:
            chosen = {w: str(entry["chosen"][w]) for w in WORKLOADS}
            if any(p not in PRECISIONS for p in chosen.values()):
                return None
            return cls(chosen, dict(entry["reasons"]), dict(entry["cosine"]), dict(entry["ms"]),
                       dict(entry.get("refused", {})))
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        """Lines for ``ultrafastbert kernels``."""
        lines = [f"  {w}: {self.chosen[w]} -- {self.reasons[w]}" for w in WORKLOADS]
        lines += [f"  {p}: not offered -- {why}" for p, why in self.refused.items()]
        return "\n".join(lines)


def held_out_texts(n: int = 64) -> list[str]:
    """``n`` sentences of the demo corpus (Bible, Shakespeare, WordNet glosses), spread over it,
    each cut to its first sentence and at most 200 characters."""
    # (read directly: importing data.corpus would pull the training data stack in)
    resource = importlib.resources.files("ultrafastbert.data") / "demo_corpus" / \
        "demo_corpus.txt.xz"
    with resource.open("rb") as raw, lzma.open(raw, "rb") as f:
        docs = f.read().decode("utf-8").splitlines()
    step = max(len(docs) // n, 1)
    texts = []
    for doc in docs[step // 2::step][:n]:
        first = doc.split(". ")[0].strip()
        texts.append(first[:200])
    return texts


def fixed(precision: str, reason: str) -> Choice:
    """A choice made without measuring."""
    return Choice({w: precision for w in WORKLOADS}, {w: reason for w in WORKLOADS})


def measure(candidates: list[str], encode: Encode, pooled: Pooled, *,
            clock: Callable[[], float] = time.perf_counter, repeats: int = REPEATS,
            texts: list[str] | None = None, max_length: int = LONG_TOKENS) -> Choice:
    """Check and time ``candidates`` (float32 among them) and choose per workload (the long
    one at ``min(LONG_TOKENS, max_length)`` tokens a text)."""
    texts = texts or held_out_texts()
    short = [encode(texts[i:i + 32]) for i in range(0, len(texts), 32)]
    long_ids, long_pack = _long_batch(short, min(LONG_TOKENS, max_length))
    reference = torch.cat([pooled("float32", ids, p).float() for ids, p in short])
    cosine = {}
    for precision in candidates:
        out = torch.cat([pooled(precision, ids, p).float() for ids, p in short])
        cosine[precision] = round(float(torch.nn.functional.cosine_similarity(
            out, reference).mean()), 5)
    ms = {"short": _time(candidates, lambda p: [pooled(p, i, k) for i, k in short], clock,
                         repeats),
          "long": _time(candidates, lambda p: pooled(p, long_ids, long_pack), clock, repeats)}
    chosen, reasons = {}, {}
    for work in WORKLOADS:
        chosen[work], reasons[work] = _pick(ms[work], cosine)
    return Choice(chosen, reasons, cosine, ms)


def _long_batch(short: list[tuple[torch.Tensor, Packing]], length: int
                ) -> tuple[torch.Tensor, Packing]:
    """32 texts of ``length`` tokens cut from the held-out tokens (repeated)."""
    flat = torch.cat([ids for ids, _ in short])
    need = 32 * length
    ids = flat.repeat(need // max(flat.numel(), 1) + 1)[:need]
    return ids, Packing.from_lengths([length] * 32, device=ids.device)


def _time(candidates: list[str], run: Callable[[str], Any], clock: Callable[[], float],
          repeats: int) -> dict[str, float]:
    """Median ms per call of each candidate, interleaved, after one warm-up call each."""
    samples: dict[str, list[float]] = {p: [] for p in candidates}
    with torch.inference_mode():
        for p in candidates:
            run(p)
        for _ in range(repeats):
            for p in candidates:
                start = clock()
                run(p)
                samples[p].append((clock() - start) * 1e3)
    return {p: round(statistics.median(v), 3) for p, v in samples.items()}


def _pick(ms: dict[str, float], cosine: dict[str, float]) -> tuple[str, str]:
    """The fastest precision with cosine >= :data:`MIN_COSINE`, and why."""
    passing = [p for p in ms if p == "float32" or cosine.get(p, 0.0) >= MIN_COSINE]
    best = min(passing, key=lambda p: ms[p])
    failed = [f"{p} cosine {cosine[p]:.4f} < {MIN_COSINE}" for p in ms if p not in passing]
    speed = ", ".join(f"{p} {ms[p]:.1f} ms" for p in sorted(ms, key=ms.get))  # type: ignore[arg-type]
    why = f"fastest passing ({speed}; cosine to float32 {cosine.get(best, 1.0):.4f})"
    if failed:
        why += "; refused: " + ", ".join(failed)
    return best, why


def candidates(device: torch.device | str) -> tuple[list[str], dict[str, str]]:
    """Precisions that can run on ``device`` here, and why each other one cannot."""
    ok, refused = [], {}
    for p in PRECISIONS:
        why = unavailable(p, device)
        if why is None:
            ok.append(p)
        else:
            refused[p] = why
    return ok, refused


def choose(signature: str, device: torch.device | str, encode: Encode, pooled: Pooled, *,
           clock: Callable[[], float] = time.perf_counter, max_length: int = LONG_TOKENS
           ) -> Choice:
    """The cached or measured :class:`Choice` for a model of ``signature`` on this CPU."""
    from ..fff.native import tuning

    ok, refused = candidates(device)
    for p, why in refused.items():
        logger.info("precision auto: %s not offered: %s", p, why)
    if torch.device(device).type != "cpu":
        return fixed("float32", f"not measured on {device}")
    if tuning.disabled() is not None:
        return fixed("float32", f"autotuning is off ({tuning.ENV_SWITCH}="
                                f"{tuning.disabled()}): float32, nothing measured")
    if ok == ["float32"]:
        return Choice(fixed("float32", "no other precision runs here").chosen,
                      {w: "no other precision runs here" for w in WORKLOADS}, refused=refused)
    key = f"{signature}/t{torch.get_num_threads()}/{'+'.join(ok)}"

    def compute() -> dict[str, Any]:
        start = time.perf_counter()
        choice = measure(ok, encode, pooled, clock=clock, max_length=max_length)
        logger.info("precision auto measured in %.1f s: %s", time.perf_counter() - start,
                    choice.chosen)
        return {**choice.to_json(), "refused": refused}

    entry = tuning.cached(CACHE_KEY, key, compute, lambda e: Choice.from_json(e) is not None)
    choice = Choice.from_json(entry)
    assert choice is not None
    return choice


def cached_entries() -> dict[str, Any]:
    """This CPU's cached choices by model signature (for ``ultrafastbert kernels``)."""
    from ..fff.native import tuning

    return dict(tuning._read_entries(CACHE_KEY))
