"""The native kernel's CPU-dependent knobs, chosen by a short measurement on first use.

How a call is walked (tokens walked together, tree-major blocks, trees together, output-row
prefetch, bucketing, parallel grain) is chosen per weight shape and token class; **no knob ever
changes a result** (every (token, tree) pair sees the same operations in the same order; tested
bit for bit). The kernel takes the choice as a small int64 table, one row per token class
(:data:`COLUMNS`; the row with the largest ``min_tokens`` not above a call's token count
applies).

- **Defaults** (:func:`default_table`): what the untuned C++ ops use, measured best on AMD Zen 4.
- **Autotuning**: on the first pack of a shape (``K x D``, ``d``, weight format, thread count) the
  kernel times a few candidates per token class on the real packed weights (coordinate descent
  from the defaults; a candidate, timed alternately with the current choice, fastest sample of
  each, is kept only when :data:`MIN_GAIN` faster; 1-3 s per shape) and caches the table in ``<cache>/tuning/knobs-<cpu>.json`` (``<cache>`` as for the
  kernel build, see :func:`..build.cache_root`; one file per CPU model, entries keyed by shape and
  by the kernel's build key, so a changed kernel is retuned). Written atomically under a lock; a
  corrupt file is ignored with a warning, remeasured and rewritten.
- **A busy machine**: a measurement taken while other work kept the CPUs busy (load average
  minus this process's threads above :data:`BUSY_SHARE` of the CPUs, :func:`busy_reason`) is used
  by this process but not written to the cache, with a warning, so a later quiet process
  measures again (``precision=auto`` was seen caching a slower choice timed under load).
  ``ULTRAFASTBERT_TUNE_WHEN_BUSY=1`` caches it anyway (a machine that is never quiet).
- ``ULTRAFASTBERT_AUTOTUNE=0`` (or ``false``/``off``/``no``): fixed defaults, nothing measured,
  the cache neither read nor written. Read on each first pack of a shape.
- Clearing: :func:`clear` (``ultrafastbert kernels --clear-tuning``) or delete the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...utils.env import switched_off
from ...utils.io import atomic_write_json
from ...utils.machine import cpu_model
from . import build

logger = logging.getLogger(__name__)

#: Columns of a knobs table row, in the C++ kernel's order (fff_cpu.cpp, KnobColumn).
COLUMNS = ("min_tokens", "group", "trees_together", "prefetch", "bucket", "grain", "block",
           "sort", "split")
#: Token classes: a row's ``min_tokens`` and the token count it is measured at.
TOKEN_CLASSES = ((0, 1), (2, 16), (64, 256), (1024, 1024))
#: Values tried per knob (coordinate descent, in this order).
CANDIDATES: dict[str, tuple[int, ...]] = {
    "split": (0, 1),
    "block": (0, 32, 64, 256),
    "sort": (0, 1),
    "group": (4, 8),
    "trees_together": (0, 1),
    "prefetch": (0, 1),
    "bucket": (0, 8, 16),
    "grain": (1 << 16, 1 << 18, 1 << 20),
}
#: A candidate replaces the current choice only when this much faster (noise guard).
MIN_GAIN = 0.05
#: Seconds of calls per timing sample, and samples per candidate (the fastest is kept).
SAMPLE_S, SAMPLES = 0.002, 3
#: Bump when the file's layout or the knobs' meaning changes.
CACHE_VERSION = 1
ENV_SWITCH = "ULTRAFASTBERT_AUTOTUNE"

KnobRun = Callable[[torch.Tensor, torch.Tensor], object]
"""Runs the kernel on ``x`` ``(T, d)`` with a knobs table ``(R, len(COLUMNS))``."""


@dataclass(frozen=True)
class Shape:
    """What a knobs table is tuned for: tree shape, width, weight format and threads."""

    n_trees: int
    depth: int
    d_model: int
    weight_format: str
    threads: int

    @property
    def key(self) -> str:
        """The cache entry's name, e.g. ``32x5/d384/fp32/t2``."""
        return (f"{self.n_trees}x{self.depth}/d{self.d_model}/{self.weight_format}/"
                f"t{self.threads}")


def default_row(min_tokens: int, n_trees: int) -> dict[str, int]:
    """The fixed defaults for calls of ``min_tokens`` tokens and up (as in fff_cpu.cpp)."""
    many = n_trees > 1 and min_tokens > 1
    return {"min_tokens": min_tokens, "group": 8 if many else 4, "trees_together": 1,
            "prefetch": int(min_tokens >= 1024 and not many), "bucket": 8, "grain": 1 << 18,
            "block": 256 if many else 0, "sort": int(many), "split": 0}


def default_table(n_trees: int) -> torch.Tensor:
    """The defaults as a knobs table ``(len(TOKEN_CLASSES), len(COLUMNS))`` int64."""
    return to_table([default_row(lo, n_trees) for lo, _ in TOKEN_CLASSES])


def bf16_default_row(min_tokens: int, n_trees: int) -> dict[str, int]:
    """The bf16 ops' fixed defaults (fff_cpu_bf16.cpp, bf16_default_knobs): a lone token's
    trees side by side, more tokens a tree at a time in groups of 4 (no sorted blocks), output
    rows prefetched from 1,024 tokens."""
    return {"min_tokens": min_tokens, "group": 4, "trees_together": int(min_tokens <= 1),
            "prefetch": int(min_tokens >= 1024), "bucket": 8, "grain": 1 << 18, "block": 0,
            "sort": 0, "split": 0}


def bf16_default_table(n_trees: int) -> torch.Tensor:
    """The bf16 defaults as a knobs table (what the untuned bf16 ops use)."""
    return to_table([bf16_default_row(lo, n_trees) for lo, _ in TOKEN_CLASSES])


#: A kernel's fixed defaults for calls of ``min_tokens`` tokens and up of ``n_trees`` trees.
DefaultRow = Callable[[int, int], dict[str, int]]


def to_table(rows: Iterable[dict[str, int]]) -> torch.Tensor:
    """Rows of knob values -> the kernel's int64 table."""
    return torch.tensor([[int(r[c]) for c in COLUMNS] for r in rows], dtype=torch.long)


def from_table(table: torch.Tensor) -> list[dict[str, int]]:
    """The kernel's table -> rows of knob values."""
    return [dict(zip(COLUMNS, map(int, row), strict=True)) for row in table.tolist()]


def disabled() -> str | None:
    """The switch's value when ``ULTRAFASTBERT_AUTOTUNE`` turns tuning off, else None."""
    return switched_off(ENV_SWITCH)


def cache_path() -> Path:
    """``<cache>/tuning/knobs-<hash of CPU model and ISA>.json``."""
    tag = hashlib.sha256(f"{cpu_model()}\0{build.cpu_isa()}".encode()).hexdigest()[:12]
    return build.cache_root() / "tuning" / f"knobs-{tag}.json"


def clear() -> bool:
    """Delete this CPU's cached knobs (the next pack of each shape measures again) and forget
    this process's tables. Returns whether a file was deleted."""
    _MEMO.clear()
    try:
        cache_path().unlink()
        return True
    except FileNotFoundError:
        return False


_MEMO: dict[str, Any] = {}


#: Others' share of the CPUs (load average less this process's threads, over the CPU count) above
#: which a measurement is not cached.
BUSY_SHARE = 0.5
BUSY_ENV = "ULTRAFASTBERT_TUNE_WHEN_BUSY"


def busy_reason() -> str | None:
    """Why the machine is too busy for a measurement worth caching, or None.

    Other work is the 1-minute load average less this process's torch threads; it is too much
    above :data:`BUSY_SHARE` of the CPUs this process may run on."""
    if os.environ.get(BUSY_ENV, "").strip().lower() in ("1", "true", "on", "yes"):
        return None
    try:
        load = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    except OSError:  # no load average on this platform: nothing to judge by
        return None
    others = load - torch.get_num_threads()
    if others > BUSY_SHARE * cpus:
        return (f"load average {load:.2f} on {cpus} CPUs with {torch.get_num_threads()} threads "
                f"of ours: other work was running")
    return None


def cached(kernel_key: str, entry_key: str, compute: Callable[[], dict[str, Any]],
           valid: Callable[[Any], bool]) -> dict[str, Any]:
    """A measured entry (JSON-ready dict): this process's memo, else the cache file's entry when
    ``valid``, else ``compute()`` now, written to the file unless :func:`busy_reason` says the
    machine was busy (then kept for this process only). Tuning off: ``compute()`` each call,
    nothing read or written (callers check :func:`disabled` first when off means "don't
    measure")."""
    if disabled() is not None:
        return compute()
    memo_key = f"{kernel_key}/{entry_key}"
    if memo_key in _MEMO:
        return dict(_MEMO[memo_key])
    found = _read_entries(kernel_key).get(entry_key)
    if valid(found):
        entry: dict[str, Any] = found  # type: ignore[assignment]  # valid() checked it
    else:
        entry = compute()
        busy = busy_reason()
        if busy is None:
            _write_entry(kernel_key, entry_key, entry)
        else:
            logger.warning("%s %s: measured on a busy machine (%s), so used by this process but "
                           "not cached; a later process measures again (%s=1 caches it anyway)",
                           kernel_key, entry_key, busy, BUSY_ENV)
    _MEMO[memo_key] = entry
    return dict(entry)


def table_for(shape: Shape, run: KnobRun, kernel_key: str,
              defaults: DefaultRow = default_row) -> torch.Tensor:
    """The knobs table for ``shape``: defaults when tuning is off, else cached or measured now.

    Args:
        shape: what the table is for.
        run: the kernel on the packed weights of this shape, see :data:`KnobRun`.
        kernel_key: the kernel's build key (entries of another build are ignored).
        defaults: the kernel's fixed defaults (the descent starts there).
    """
    if disabled() is not None:
        return to_table([defaults(lo, shape.n_trees) for lo, _ in TOKEN_CLASSES])

    def measured() -> dict[str, Any]:
        table, report = measure(shape, run, defaults)
        return {"rows": from_table(table), "measured": report}

    def valid(entry: Any) -> bool:
        return (isinstance(entry, dict) and entry.get("rows") is not None
                and _valid_table(entry["rows"]) is not None)

    return to_table(cached(kernel_key, shape.key, measured, valid)["rows"])


def _valid_table(rows: Any) -> torch.Tensor | None:
    """``rows`` as a table when they are well-formed (else None, logged)."""
    try:
        table = to_table(rows)
    except (KeyError, TypeError, ValueError) as err:
        logger.warning("ignoring a malformed knobs entry in %s (%s); measuring again",
                       cache_path(), err)
        return None
    starts = table[:, 0].tolist()
    if not starts or starts[0] > 1 or any(b <= a for a, b in zip(starts[:-1], starts[1:], strict=True)):
        logger.warning("ignoring a knobs entry with bad token classes in %s", cache_path())
        return None
    return table


def _read_entries(kernel_key: str) -> dict[str, Any]:
    """This kernel build's entries from the cache file ({} when missing, stale or corrupt)."""
    path = cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("ignoring the corrupt knobs cache %s (%s); measuring again", path, err)
        return {}
    if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
            or not isinstance(data.get("kernels"), dict)):
        logger.warning("ignoring the knobs cache %s (unknown layout); measuring again", path)
        return {}
    entries = data["kernels"].get(kernel_key, {})
    return entries if isinstance(entries, dict) else {}


def _write_entry(kernel_key: str, shape_key: str, entry: dict[str, Any]) -> None:
    """Add one entry to the cache file, atomically, under a lock (merging other processes')."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with build._exclusive_lock(path.with_suffix(".lock")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                    raise ValueError("unknown layout")
            except (OSError, ValueError):
                data = {"version": CACHE_VERSION, "cpu": cpu_model(), "kernels": {}}
            kernels = data.setdefault("kernels", {})
            if not isinstance(kernels.get(kernel_key), dict):
                kernels[kernel_key] = {}
            kernels[kernel_key][shape_key] = entry
            atomic_write_json(path, data)
    except OSError as err:  # a read-only cache only costs remeasuring next process
        logger.warning("could not write the knobs cache %s: %s", path, err)


# ------------------------------------------------------------------------------ measuring

def measure(shape: Shape, run: KnobRun, defaults: DefaultRow = default_row
            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Choose every token class's knobs by coordinate descent from the defaults.

    Returns the table and a report (per class: tokens measured, µs per call of the default and
    of the choice). Random LayerNorm-ed inputs; the thread count is the current one.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    rows, report = [], {}
    with torch.no_grad():
        for lo, tokens in TOKEN_CLASSES:
            x = torch.nn.functional.layer_norm(torch.randn(tokens, shape.d_model, generator=gen),
                                               (shape.d_model,))
            row, base_s, best_s = _tune_class(defaults(lo, shape.n_trees), shape, x, run)
            rows.append(row)
            report[str(lo)] = {"tokens": tokens, "default_us": round(base_s * 1e6, 2),
                               "chosen_us": round(best_s * 1e6, 2)}
    logger.info("tuned the native FFF kernel's knobs for %s in %.1f s", shape.key,
                time.perf_counter() - start)
    return to_table(rows), report


def relevant(knob: str, shape: Shape, tokens: int, row: dict[str, int]) -> bool:
    """Whether ``knob`` can matter for calls of ``tokens`` tokens on ``shape`` with the other
    knobs as in ``row`` (the kernel's paths: fff_cpu_walk.h run_tokens)."""
    many_trees = shape.n_trees > 1
    if knob == "grain":
        return shape.threads > 1 and tokens >= 64
    if knob == "bucket":
        return not many_trees and shape.depth >= 5 and tokens >= 64
    if knob == "block":
        return many_trees and tokens > 1
    if knob == "sort":
        return many_trees and tokens > 1 and row["block"] > 0 and not row["split"]
    if knob == "split":
        return many_trees and tokens > 1
    if knob == "trees_together":
        return many_trees and (tokens == 1 or (row["block"] == 0 and not row["split"]))
    if knob == "group":
        return tokens > 1 and not (many_trees and (row["split"] or row["sort"]))
    return True  # prefetch


def _tune_class(row: dict[str, int], shape: Shape, x: torch.Tensor, run: KnobRun
                ) -> tuple[dict[str, int], float, float]:
    """Coordinate descent over :data:`CANDIDATES` for one token class: (row, default s, best s).

    Each candidate is timed alternately with the current choice and both keep their fastest
    sample: other processes only ever slow a sample down, so the minimum is the robust figure
    and a load spike cannot make a candidate look better than it is.
    """
    best = dict(row)
    base_s = best_s = _time(run, x, best)
    for knob, values in CANDIDATES.items():
        if not relevant(knob, shape, x.shape[0], best):
            continue
        for value in values:
            if value == best[knob]:
                continue
            trial = {**best, knob: value}
            current_s, trial_s = _time_pair(run, x, best, trial)
            best_s = min(best_s, current_s)
            if trial_s < best_s * (1 - MIN_GAIN):
                best, best_s = trial, trial_s
    return best, base_s, best_s


def _table(row: dict[str, int]) -> torch.Tensor:
    """A one-row knobs table applying ``row`` from 0 tokens."""
    return to_table([{**row, "min_tokens": 0}])


def _calls_per_sample(run: KnobRun, x: torch.Tensor, table: torch.Tensor) -> int:
    """How many calls fill :data:`SAMPLE_S` (after a warm-up call)."""
    run(x, table)
    once = time.perf_counter()
    run(x, table)
    return max(1, int(SAMPLE_S / max(time.perf_counter() - once, 1e-7)))


def _sample(run: KnobRun, x: torch.Tensor, table: torch.Tensor, calls: int) -> float:
    """Seconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        run(x, table)
    return (time.perf_counter() - start) / calls


def _time(run: KnobRun, x: torch.Tensor, row: dict[str, int]) -> float:
    """The fastest of :data:`SAMPLES` samples, seconds per call, with the knobs of ``row``."""
    table = _table(row)
    calls = _calls_per_sample(run, x, table)
    return min(_sample(run, x, table, calls) for _ in range(SAMPLES))


def _time_pair(run: KnobRun, x: torch.Tensor, a: dict[str, int], b: dict[str, int]
               ) -> tuple[float, float]:
    """Fastest samples of ``a`` and ``b``, timed alternately (seconds per call)."""
    ta, tb = _table(a), _table(b)
    calls = min(_calls_per_sample(run, x, ta), _calls_per_sample(run, x, tb))
    sa, sb = [], []
    for _ in range(SAMPLES):
        sa.append(_sample(run, x, ta, calls))
        sb.append(_sample(run, x, tb, calls))
    return min(sa), min(sb)
