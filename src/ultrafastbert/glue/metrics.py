"""The official GLUE metrics, computed by scikit-learn and scipy, and the trivial baselines.

Classification predictions and references are class indices; STS-B's are real numbers. Metric
values are fractions as the libraries return them (accuracy 0.62, Matthews 0.21); *scores*
(:func:`headline_score`) are those times 100, as in the papers' tables.

F1 is the F1 of class 1 (``equivalent`` for MRPC, ``duplicate`` for QQP), as GLUE defines it.
A correlation with a constant series is undefined; it is reported as 0.0 (no correlation), with
a warning, so that a collapsed model or the mean baseline still gets a number.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InputError
from .tasks import GlueTask

log = logging.getLogger(__name__)

#: Metric values by eval split, e.g. ``{"dev": {"f1": 0.81, "accuracy": 0.70}}``.
SplitMetrics = dict[str, dict[str, float]]


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Share of exact matches."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class (label 1)."""
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, pos_label=1, average="binary",
                          zero_division=0.0))


def matthews(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation coefficient (0 when either side is constant)."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def _correlation(kind: str, predictions: np.ndarray, references: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        log.warning("%s correlation of a constant series is undefined; reporting 0.0", kind)
        return 0.0
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(predictions, references)[0])


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    """Pearson correlation."""
    return _correlation("pearson", predictions, references)


def spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    """Spearman rank correlation."""
    return _correlation("spearman", predictions, references)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: GlueTask, predictions: Sequence[float] | np.ndarray,
                    references: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Every metric of ``task`` for one eval split.

    Args:
        predictions: ``(N,)`` class indices, or real values for STS-B.
        references: ``(N,)`` gold labels of the same kind.
    """
    pred, ref = np.asarray(predictions), np.asarray(references)
    if pred.shape != ref.shape or pred.ndim != 1 or len(pred) == 0:
        raise InputError(f"{task.name}: predictions {pred.shape} and references {ref.shape} "
                         "must be non-empty 1-D arrays of the same length")
    if not task.is_regression:
        pred, ref = pred.astype(np.int64), ref.astype(np.int64)
    return {name: METRICS[name](pred, ref) for name in task.metrics}


def headline_score(task: GlueTask, metrics: SplitMetrics) -> float:
    """The task's score for tables: its headline metric times 100."""
    split, name = task.headline
    return 100.0 * metrics[split][name]


def median_metrics(per_seed: Sequence[SplitMetrics]) -> SplitMetrics:
    """Per split and metric, the median over seeds (each metric's own median)."""
    if not per_seed:
        raise InputError("no runs to take the median of")
    return {split: {name: float(statistics.median(m[split][name] for m in per_seed))
                    for name in values}
            for split, values in per_seed[0].items()}


def trivial_predictions(task: GlueTask, train_labels: np.ndarray, n: int) -> np.ndarray:
    """What a model that ignores its input predicts: the most frequent training class (ties:
    the lowest index), or the mean training score for STS-B. ``(n,)``."""
    labels = np.asarray(train_labels)
    if len(labels) == 0:
        raise InputError(f"{task.name}: no training labels for the trivial baseline")
    if task.is_regression:
        return np.full(n, float(labels.mean()))
    counts = np.bincount(labels.astype(np.int64), minlength=task.num_labels)
    return np.full(n, int(counts.argmax()), dtype=np.int64)


def trivial_baseline_name(task: GlueTask) -> str:
    """``mean`` for regression, ``majority`` otherwise."""
    return "mean" if task.is_regression else "majority"
