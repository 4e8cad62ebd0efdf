"""bench/texts.py: the STS-B reader, the quality columns, route-change rate and ratios (the
timed comparison itself runs as `bench model --texts`, never in a test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_infer_fast import TEXTS, dirs  # noqa: F401  (the module fixture)
from ultrafastbert.bench import texts as bt
from ultrafastbert.infer import Predictor


def test_stsb_dev_reads_pairs_in_file_order(tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    rows = ["index\tgenre\tsentence1\tsentence2\tscore", "0\tx\ta dog\ta cat\t1.5",
            "1\tx\tthe king\tthe queen\t4.0"]
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")
    texts, gold = bt.stsb_dev(tmp_path)
    assert texts == ["a dog", "a cat", "the king", "the queen"]
    assert gold.tolist() == [1.5, 4.0]


def test_quality_columns_can_fail():
    torch.manual_seed(0)
    gold = np.linspace(0, 5, 40)
    base = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    # pairs whose cosine grows with the gold score, and a random control
    second = torch.stack([torch.nn.functional.normalize(b + (5 - g) * torch.randn(8), dim=0)
                          for b, g in zip(base, gold, strict=True)])
    good = torch.stack([base, second], 1).reshape(80, 8)
    q = bt.quality(good, good, gold)
    assert q["cosine_to_dense_fp32"] == pytest.approx(1.0) and q["stsb_spearman"] > 50
    control = bt.quality(torch.randn(80, 8), good, gold)
    assert control["stsb_spearman"] < 50 and control["cosine_to_dense_fp32"] < 0.5


def test_route_change_rate(dirs):  # noqa: F811
    fp32 = Predictor.from_pretrained(dirs["bert"], precision="float32")
    again = Predictor.from_pretrained(dirs["bert"], precision="float32")
    assert bt.route_change_rate(again, fp32, TEXTS) == 0.0
    dense = Predictor.from_pretrained(dirs["bert-dense"], precision="float32")
    assert bt.route_change_rate(dense, dense, TEXTS) is None
    bf16 = Predictor.from_pretrained(dirs["bert"], precision="bfloat16")
    assert 0.0 <= bt.route_change_rate(bf16, fp32, TEXTS) < 0.5


def test_route_change_rate_with_bf16_fff_copies(dirs, monkeypatch):  # noqa: F811
    """With the bf16 FFF kernel chosen (a synthetic measurement), the encoder runs bfloat16
    copies of the FFF blocks; the route hooks feed each its own dtype (they fed float32)."""
    from ultrafastbert.fff import FFF
    from ultrafastbert.fff.native import tuning
    from ultrafastbert.infer import precision

    if precision.unavailable("bfloat16") is not None:
        pytest.skip(f"bfloat16: {precision.unavailable('bfloat16')}")
    monkeypatch.setenv(tuning.ENV_SWITCH, "1")
    monkeypatch.setattr(precision, "_fff_timings", lambda fff, name="int8": {
        "tokens": list(precision.FFF_MEASURED_TOKENS),
        "us_per_token": {"native": [2.0, 1.0], precision.FFF_LOW[name][1]: [1.0, 0.5]}})
    fp32 = Predictor.from_pretrained(dirs["bert"], precision="float32")
    bf16 = Predictor.from_pretrained(dirs["bert"], precision="bfloat16")
    bf16.embed(TEXTS)
    copies = [m for m in bf16._encoder("bfloat16").modules() if isinstance(m, FFF)]
    assert copies and all(m.linear_in.weight.dtype == torch.bfloat16 for m in copies)
    assert 0.0 <= bt.route_change_rate(bf16, fp32, TEXTS) < 0.5


def test_ratios_and_outside_share(dirs):  # noqa: F811
    rows = [{"workload": "w", "embedder": "dense torch fp32", "texts_per_s": 100.0},
            {"workload": "w", "embedder": "dense ORT int8 (dynamic, per-channel)",
             "texts_per_s": 200.0},
            {"workload": "w", "embedder": "ours", "texts_per_s": 300.0}]
    bt._ratios(rows)
    assert rows[2]["vs_ort_int8"] == 1.5 and rows[2]["vs_dense_torch_fp32"] == 3.0
    share = bt.outside_model_share(Predictor.from_pretrained(dirs["bert"], precision="float32"),
                                   TEXTS, repeats=3)
    assert 0.0 <= share["outside_share"] < 1.0 and share["model_ms"] > 0


def test_written_json_keeps_the_environment_at_the_top(tmp_path):
    """``bench_texts.json`` has the environment, rows and the report's parts side by side (the
    README-figure check reads ``environment`` there), not the parts nested in the environment."""
    result = {"environment": {"cpu": "some CPU", "torch_threads": 2}, "rows": [],
              "outside_model": {}, "profiles": {}}
    bt.write(tmp_path, result)
    data = json.loads((tmp_path / "bench_texts.json").read_text())
    assert data["environment"] == result["environment"]
    assert set(data) == {"environment", "rows", "outside_model", "profiles"}
