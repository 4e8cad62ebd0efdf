"""What ``convert`` tells its user about the quality: the required distillation text, and the
held-out distance to the dense model with its ablation and end-of-run warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from convertcheck import tiny_corpus  # noqa: E402
from ultrafastbert.convert.data import load_segments  # noqa: E402
from ultrafastbert.convert.pipeline import (  # noqa: E402
    NO_CORPUS,
    POOR_COSINE_KEPT,
    ConvertSettings,
    cosine_kept,
    heldout_fit,
    heldout_set,
    quality_warning,
    removed_pooled_cosine,
)
from ultrafastbert.convert.source import make_student, parse_fff  # noqa: E402
from ultrafastbert.errors import InputError  # noqa: E402
from ultrafastbert.model.converted import FAMILIES, base_model_of, dense_ffns  # noqa: E402


@pytest.fixture(scope="module")
def held(source, tmp_path_factory):
    corpus = tiny_corpus(tmp_path_factory.mktemp("c") / "c.txt", 40)
    rows = load_segments(str(corpus), source.tokenizer_dir, max_len=32)
    return heldout_set(source, rows, pad_id=0)


def test_convert_refuses_to_run_without_a_corpus(bert_dir, tmp_path, capsys):
    from ultrafastbert.cli import main

    with pytest.raises(InputError, match="needs --corpus") as err:
        ConvertSettings(source=bert_dir, out=tmp_path / "o")
    assert "--corpus demo" in str(err.value) and str(err.value) == NO_CORPUS
    assert main(["convert", str(bert_dir), "--out", str(tmp_path / "o"), "--budget", "5s"]) == 2
    assert "--corpus demo" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the demo corpus by name is accepted
    assert ConvertSettings(source=bert_dir, out=tmp_path / "o", corpus="demo").corpus == "demo"


def test_help_says_the_text_decides_the_quality(capsys):
    from ultrafastbert.cli import main

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "decides the quality" in text and "required" in text


def test_cosine_kept_and_the_warning_threshold():
    assert cosine_kept(1.0, 0.5) == 1.0 and cosine_kept(0.5, 0.5) == 0.0
    assert cosine_kept(0.75, 0.5) == pytest.approx(0.5)
    good = {"pooled_cosine": 0.9, "removed_pooled_cosine": 0.5, "pooled_cosine_kept": 0.8}
    poor = {"pooled_cosine": 0.7, "removed_pooled_cosine": 0.5, "pooled_cosine_kept": 0.4}
    assert quality_warning(good) is None
    message = quality_warning(poor)
    assert message is not None and "0.700" in message and "--corpus" in message
    assert quality_warning({**good, "pooled_cosine_kept": POOR_COSINE_KEPT}) is None


class _Dense(torch.nn.Module):
    """A layer's dense feed-forward block as a module (the positive control)."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn = ffn

    def forward(self, x):
        return self.ffn(x)


def test_heldout_fit_of_the_dense_blocks_and_of_removed_ones(source, held):
    """Positive control: a student whose blocks are the dense blocks is the dense model (cosine
    1, all of the way, no warning); negative control: the blocks removed (kept 0, warned)."""
    family = FAMILIES[source.family]
    dense = make_student(source, parse_fff("1x1", source.n_layers))
    for layer, ffn in zip(family.layers(base_model_of(dense)), dense_ffns(source.model, family),
                          strict=True):
        family.install(layer, _Dense(ffn))
    removed_model = make_student(source, parse_fff("none", source.n_layers))
    removed = removed_pooled_cosine(dense, held)
    assert 0 < removed < 0.999  # the tiny model's FFNs matter
    fit = heldout_fit(dense, held, removed)
    assert fit["pooled_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert fit["pooled_cosine_kept"] == pytest.approx(1.0, abs=1e-4)
    assert quality_warning(fit) is None
    fit = heldout_fit(removed_model, held, removed)
    assert fit["pooled_cosine"] == pytest.approx(removed, abs=1e-6)
    assert fit["pooled_cosine_kept"] == pytest.approx(0.0, abs=1e-5)
    assert quality_warning(fit) is not None


def test_the_hooks_leave_the_student_as_it_was(source, held):
    student = make_student(source, parse_fff("2x2", source.n_layers))
    before = heldout_fit(student, held)
    removed_pooled_cosine(student, held)
    assert heldout_fit(student, held) == before


def test_run_records_and_prints_the_warning_for_the_ablation(bert_dir, tmp_path, capsys):
    """End to end: ``--fff none`` (nothing kept) is warned about in conversion.json and on
    stderr."""
    from ultrafastbert.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt", 200)
    out = tmp_path / "out"
    assert main(["convert", str(bert_dir), "--fff", "none", "--out", str(out), "--budget", "5s",
                 "--corpus", str(corpus), "--init-tokens", "200", "--no-progress",
                 "--threads", "1"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    held = report["heldout"]
    assert held["pooled_cosine_kept"] == pytest.approx(0.0, abs=1e-5)
    assert report["quality_warning"] and "far from the dense one" in report["quality_warning"]
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "FFN blocks removed" in captured.out
    assert np.isfinite(held["removed_pooled_cosine"])
