"""``benchmarks/reproduce_table1.py``'s verdict: judged against the paper only when the dense
model has learned something beyond the trivial baseline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_table1.py"


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("reproduce_table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def report(dense: float, fff_share: float, base: float) -> dict:
    return {"models": {"tiny-dense": {"average": {"without_cola": dense}},
                       "tiny-fff": {"average": {"without_cola": dense * fff_share / 100},
                                    "percent_of_dense_without_cola": fff_share}},
            "baseline": {"average": {"without_cola": base}}}


def test_verdict_judges_when_dense_beats_the_baseline(table1):
    text = table1.verdict(report(dense=60.0, fff_share=97.0, base=46.0))
    assert "Caution" not in text and "meets the paper's >= 96%" in text
    text = table1.verdict(report(dense=60.0, fff_share=90.0, base=46.0))
    assert "does not meet the paper's >= 96%" in text


def test_verdict_withholds_judgement_near_the_baseline(table1):
    text = table1.verdict(report(dense=47.7, fff_share=96.5, base=46.2))
    assert "Caution" in text and "96.5%" in text
    assert "meets" not in text and "does not meet" not in text


def test_gain_retained(table1):
    assert table1.gain_retained(55.0, 60.0, 50.0) == pytest.approx(50.0)
    assert table1.gain_retained(55.0, 49.0, 50.0) is None


def test_compute_seconds_counts_reused_steps(table1):
    pretrained = {"a": {"train_seconds": 60.0}, "b": {"train_seconds": 120.0}}
    seeds = [{"train_seconds": 10.0, "eval_seconds": 2.0}, {"train_seconds": 8.0,
                                                           "eval_seconds": 1.0}]
    glue = {"a": {"tasks": {"RTE": {"seeds": seeds}}}, "b": {"tasks": {"RTE": {"seeds": seeds}}}}
    spent = table1.compute_seconds(pretrained, glue)
    assert spent == {"pretraining": 180.0, "fine_tuning": 42.0}
    assert "3 min" in table1.compute_note({"compute_seconds": spent})


def test_model_groups_and_child_arguments(table1):
    models = ("tiny-dense", "tiny-fff", "tiny-fff-8x6", "tiny-fff-32x4")
    assert table1.model_groups(models, 2) == [models[:2], models[2:]]
    assert table1.model_groups(models, 3) == [models[:2], models[2:]]
    assert table1.model_groups(models, 1) == [models]
    argv = ["--budget", "20m", "--models", "tiny-fff", "--jobs=2", "--out", "x", "--seeds", "3"]
    stripped = argv
    for name in ("--models", "--out", "--jobs"):
        stripped = table1._without_option(stripped, name)
    assert stripped == ["--budget", "20m", "--seeds", "3"]


def test_fine_tuning_results_are_kept_per_protocol(table1, tmp_path):
    def settings(*extra: str):
        args = table1.parse_args(["--glue-dir", str(tmp_path), "--work-dir", str(tmp_path),
                                  *extra])
        return table1.settings_from_args(args)

    default, again, other = settings(), settings(), settings("--lr", "4e-5")
    assert default.protocol.lr == 1e-3 and other.protocol.lr == 4e-5
    assert default.glue_out("tiny-fff") == again.glue_out("tiny-fff")
    assert default.glue_out("tiny-fff") != other.glue_out("tiny-fff")
    assert default.glue_out("tiny-fff").parent.parent == tmp_path / "glue"
    assert default.pretrain_dir("tiny-fff") == other.pretrain_dir("tiny-fff")
