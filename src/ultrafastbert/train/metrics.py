"""``metrics.jsonl``: one JSON object per optimizer step, append-only and flushed; loss curves.

A resumed run first cuts the file back to the steps its checkpoint covers (rewritten
atomically), so a killed-and-resumed run ends with the same lines as an uninterrupted one. A
line torn by ``kill -9`` is dropped at that point.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, OutputExistsError
from ..utils.io import atomic_path, atomic_write_text
from ..utils.oserrors import writing

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file in order; unparseable (torn) lines are skipped."""
    records: list[dict[str, Any]] = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("skipping a torn line in %s", path)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """Appends one JSON line per record to ``path``, flushing after each.

    Args:
        path: the ``metrics.jsonl`` file.
        keep_until_step: when resuming, records with ``step`` above this are dropped first;
            ``None`` starts a new file (an existing one is an error).
    """

    def __init__(self, path: str | os.PathLike, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        if keep_until_step is None and self.path.exists():
            raise OutputExistsError(f"{self.path} already exists; resume the run or use a new "
                                    "output directory")
        if keep_until_step is not None:
            self._truncate(keep_until_step)
        with writing(self.path, "the metrics log"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _truncate(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        with writing(self.path, "the metrics log"):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the OS."""
        if self._file is None:
            raise InputError(f"{self.path} is closed")
        with writing(self.path, "the metrics log"):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_loss_curve(records: list[dict[str, Any]], png: str | os.PathLike,
                    title: str = "training loss") -> Path | None:
    """Write loss vs step (raw and smoothed) and the learning rate to ``png``.

    Returns the path, or ``None`` when matplotlib is missing or there is nothing to plot.
    """
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], alpha=0.35, label="loss")
    ax.plot(steps, smooth([r["loss"] for r in records]), label="loss (EMA)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    lr_ax.legend(handles=handles, loc="upper center")  # the top axes: drawn over both lines
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(png)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, ema = [], 0.0
    for i, v in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * v
        out.append(ema / (1 - weight**i))
    return out
