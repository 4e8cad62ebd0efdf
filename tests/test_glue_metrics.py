"""GLUE task table and metrics: hand-computed values, negative controls, medians, averages."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from ultrafastbert.glue import TASKS, averages, compute_metrics, get_task, parse_tasks
from ultrafastbert.glue.metrics import (
    accuracy,
    f1,
    headline_score,
    matthews,
    median_metrics,
    pearson,
    spearman,
    trivial_predictions,
)
from ultrafastbert.glue.tasks import TABLE_ORDER, table_order

# Hand-counted confusion: TP=2 (0, 4), FP=1 (1), FN=1 (3), TN=1 (2).
PRED = np.array([1, 1, 0, 0, 1])
REF = np.array([1, 0, 0, 1, 1])


# ------------------------------------------------------------------------------- tasks
def test_nine_tasks_with_glue_labels_and_headlines():
    assert list(TASKS) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE",
                           "WNLI"]
    assert TASKS["MNLI"].labels == ("entailment", "neutral", "contradiction")
    assert [e.tsv_file for e in TASKS["MNLI"].eval_splits] == ["dev_matched.tsv",
                                                               "dev_mismatched.tsv"]
    assert TASKS["STS-B"].is_regression and TASKS["STS-B"].num_labels == 1
    assert not TASKS["CoLA"].tsv.header and TASKS["CoLA"].tsv.text_b is None
    headlines = {n: t.headline[1] for n, t in TASKS.items()}
    assert headlines == {"CoLA": "matthews", "SST-2": "accuracy", "MRPC": "f1",
                         "STS-B": "spearman", "QQP": "f1", "MNLI": "accuracy",
                         "QNLI": "accuracy", "RTE": "accuracy", "WNLI": "accuracy"}
    assert TASKS["MNLI"].headline == ("matched", "accuracy")
    assert [n for n, t in TASKS.items() if not t.in_average] == ["WNLI"]


def test_task_names_are_forgiving_and_unknown_names_are_refused():
    assert get_task("sts-b").name == get_task("stsb").name == get_task("STS_B").name == "STS-B"
    assert get_task("sst2").name == "SST-2" and get_task("MNLI-m").name == "MNLI"
    assert [t.name for t in parse_tasks("rte, STS-B,rte")] == ["RTE", "STS-B"]
    with pytest.raises(ValueError, match="unknown GLUE task 'SQuAD'.*CoLA, SST-2"):
        get_task("SQuAD")
    with pytest.raises(ValueError, match="no GLUE task"):
        parse_tasks(" , ")


def test_table_order_is_the_papers():
    assert TABLE_ORDER[:8] == ("RTE", "MRPC", "STS-B", "SST-2", "MNLI", "QNLI", "QQP", "CoLA")
    assert table_order(["CoLA", "SST-2", "RTE"]) == ["RTE", "SST-2", "CoLA"]


# ----------------------------------------------------------------------------- metrics
def test_classification_metrics_match_hand_computation():
    assert accuracy(PRED, REF) == pytest.approx(3 / 5)
    assert f1(PRED, REF) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews(PRED, REF) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))


def test_f1_is_of_class_one_negative_control():
    # F1 of class 0 would be 2*1 / (2*1 + 1 + 1) = 0.5: the metric must not be that one.
    assert f1(PRED, REF) != pytest.approx(0.5)
    assert f1(1 - PRED, 1 - REF) == pytest.approx(0.5)


def test_matthews_extremes():
    assert matthews(REF, REF) == pytest.approx(1.0)
    assert matthews(1 - REF, REF) == pytest.approx(-1.0)
    assert matthews(np.ones(5, dtype=int), REF) == 0.0


def test_correlations_match_hand_computation():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5): covariance 3, variances 5.
    assert pearson(x, y) == pytest.approx(3 / 5)
    assert spearman(x, y) == pytest.approx(3 / 5)
    outlier = np.array([1.0, 2.0, 3.0, 100.0])
    assert spearman(outlier, x) == pytest.approx(1.0)
    assert pearson(outlier, x) < 0.9  # negative control: Pearson is not rank-based


def test_constant_predictions_correlate_zero_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert pearson(np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    assert "undefined" in caplog.text


def test_compute_metrics_per_task():
    cola = compute_metrics(TASKS["CoLA"], PRED, REF)
    assert set(cola) == {"matthews", "accuracy"}
    mrpc = compute_metrics(TASKS["MRPC"], PRED, REF)
    assert mrpc == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6)}
    stsb = compute_metrics(TASKS["STS-B"], [0.5, 1.5, 3.0], [0.0, 2.0, 5.0])
    assert set(stsb) == {"spearman", "pearson"} and stsb["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        compute_metrics(TASKS["RTE"], [0, 1], [0])


def test_headline_score_is_the_headline_metric_times_100():
    metrics = {"dev": {"f1": 0.875, "accuracy": 0.8}}
    assert headline_score(TASKS["MRPC"], metrics) == pytest.approx(87.5)
    mnli = {"matched": {"accuracy": 0.7}, "mismatched": {"accuracy": 0.6}}
    assert headline_score(TASKS["MNLI"], mnli) == pytest.approx(70.0)


def test_median_is_taken_per_metric():
    runs = [{"dev": {"f1": 0.1, "accuracy": 0.9}}, {"dev": {"f1": 0.5, "accuracy": 0.2}},
            {"dev": {"f1": 0.3, "accuracy": 0.4}}]
    assert median_metrics(runs) == {"dev": {"f1": 0.3, "accuracy": 0.4}}
    assert median_metrics(runs[:2]) == {"dev": {"f1": pytest.approx(0.3),
                                                "accuracy": pytest.approx(0.55)}}


def test_trivial_predictions():
    assert trivial_predictions(TASKS["RTE"], np.array([1, 0, 1]), 4).tolist() == [1] * 4
    assert trivial_predictions(TASKS["RTE"], np.array([1, 0]), 2).tolist() == [0, 0]  # tie
    mean = trivial_predictions(TASKS["STS-B"], np.array([1.0, 2.0, 6.0]), 2)
    assert mean.tolist() == [3.0, 3.0]


def test_averages_with_and_without_cola():
    scores = {"RTE": 60.0, "MRPC": 80.0, "CoLA": 10.0, "WNLI": 50.0}
    avg = averages(scores)
    assert avg["without_cola"] == pytest.approx(70.0)
    assert avg["with_cola"] == pytest.approx(50.0)
    assert avg["tasks_without_cola"] == ["RTE", "MRPC"]
    assert avg["tasks_with_cola"] == ["RTE", "MRPC", "CoLA"]
    no_cola = averages({"RTE": 60.0})
    assert no_cola["with_cola"] is None and no_cola["without_cola"] == 60.0
    assert averages({})["without_cola"] is None
