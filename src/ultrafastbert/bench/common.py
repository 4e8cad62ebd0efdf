"""Shared benchmark machinery: environment record, timing, result files, charts."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import atomic_path, atomic_write_json, atomic_write_text
from ..utils.machine import cpu_facts


def speed_summary(env: dict[str, Any]) -> str:
    """One line naming the CPU, its speed flags that are present, cores and threads."""
    flags = [f for f, on in (env.get("cpu_flags") or {}).items() if on]
    dtypes = env.get("dtypes") or env.get("dtype")
    dtype_text = f", {','.join(dtypes) if isinstance(dtypes, list) else dtypes}" if dtypes else ""
    return (f"{env.get('cpu', 'unknown CPU')} ({' '.join(flags) or 'no AVX2/AVX-512/AMX flags'}; "
            f"{env.get('cpu_cores')} cores, {env.get('cpu_logical')} logical), "
            f"{env.get('torch_threads')} threads{dtype_text}, torch {env.get('torch')}, "
            f"oneDNN {env.get('onednn')}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str = "cpu", dtypes: Sequence[str] | None = None) -> dict[str, Any]:
    """What a reader needs to interpret the figures: versions, threads, hardware (CPU model,
    speed flags, cores: :func:`cpu_facts`), the dtypes measured, time."""
    env: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        **cpu_facts(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": _git_commit(),
        "device": device,
    }
    if dtypes is not None:
        env["dtypes"] = [str(d).replace("torch.", "") for d in dtypes]
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (how busy the machine was), or None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calls_per_sample(fn: Callable[[], Any], device: str, min_sample_s: float) -> int:
    """How many calls make one timed sample last at least ``min_sample_s`` (timer resolution)."""
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-9)
    return max(1, min(10_000, int(min_sample_s / once) + 1))


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 15,
              device: str = "cpu", min_sample_s: float = 0.002,
              max_total_s: float = 10.0) -> list[float]:
    """Seconds per call, one entry per sample, after ``warmup`` calls.

    Fast calls are looped within a sample so each sample lasts ``min_sample_s``; slow ones take
    fewer samples (at least 3) so the whole measurement stays near ``max_total_s``. On CUDA the
    samples are timed with CUDA events.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    number = _calls_per_sample(fn, device, min_sample_s)
    per_call = []
    budget_start = time.perf_counter()
    for i in range(repeats):
        per_call.append(_one_sample(fn, number, device))
        if i >= 2 and time.perf_counter() - budget_start > max_total_s:
            break
    return per_call


def time_round(fn: Callable[[Any], Any], x: Any, budget_s: float, clock: str = "wall") -> float:
    """Seconds per call over ~``budget_s`` of calls: the median call by the wall clock
    (at least 3 calls), or with ``clock="thread"`` this thread's CPU time over all of them (one
    torch thread: what the call itself costs, whatever else the machine runs)."""
    fn(x)
    if clock == "thread":
        calls, start = 0, time.thread_time()
        while calls < 3 or time.thread_time() - start < budget_s:
            fn(x)
            calls += 1
        return (time.thread_time() - start) / calls
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _one_sample(fn: Callable[[], Any], number: int, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / number
    start_t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start_t) / number


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def write_results(out_dir: str | os.PathLike, stem: str, rows: list[dict[str, Any]],
                  env: dict[str, Any], extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``stem.json`` (environment + rows, and ``extra``'s keys beside them) and
    ``stem.csv`` (the rows) atomically; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    atomic_write_json(json_path, {"environment": env, "rows": rows, **(extra or {})})
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, buf.getvalue())
    return [json_path, csv_path]


def write_report(out_dir: str | os.PathLike, stem: str, rows: list[dict[str, Any]],
                 env: dict[str, Any], markdown: str) -> None:
    """:func:`write_results` plus ``stem.md`` (``markdown``, written atomically), which is also
    printed: the end of a benchmark script's run."""
    write_results(out_dir, stem, rows, env)
    atomic_write_text(Path(out_dir) / f"{stem}.md", markdown)
    print(markdown)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` from ``rows`` (floats to 3 significant figures)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_lines(path: str | os.PathLike, series: dict[str, tuple[list[float], list[float]]], *,
               xlabel: str, ylabel: str, title: str, logx: bool = True,
               logy: bool = True) -> Path:
    """Save a line chart (one line per series) as PNG, atomically; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
