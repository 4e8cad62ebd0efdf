"""``bench model``: checks before timing (and can fail), rows, speedups, profile, files."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ultrafastbert.bench import model as bench_model
from ultrafastbert.cli import bench as bench_cli
from ultrafastbert.cli import build_parser


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "model", *argv])


def small_settings(**changes) -> bench_model.ModelBenchSettings:
    base = dict(models=("tiny-fff", "tiny-dense"), batches=(1, 2), seq_len=16,
                dtypes=("float32",), warmup=0, repeats=1, max_seconds=1.0, profile_batch=2)
    base.update(changes)
    return bench_model.ModelBenchSettings(**base)


@pytest.mark.slow  # integration: CI runs it (make test-slow)
def test_small_run_writes_checked_results(tmp_path, capsys):
    args = parse(["--models", "tiny-fff,tiny-dense", "--batches", "1,2", "--seq-len", "16",
                  "--dtypes", "float32,bfloat16", "--warmup", "0", "--repeats", "1",
                  "--max-seconds", "1", "--profile-batch", "2", "--out", str(tmp_path)])
    assert bench_cli.run_model(args) == 0
    out = capsys.readouterr().out
    assert "output checks (before timing)" in out and "per-part profile" in out
    data = json.loads((tmp_path / "bench_model.json").read_text())
    rows = data["rows"]
    assert {(r["model"], r["dtype"], r["batch"]) for r in rows} == {
        (m, d, b) for m in ("tiny-fff", "tiny-dense") for d in ("float32", "bfloat16")
        for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and r["seq_len"] == 16 for r in rows)
    assert data["environment"]["torch_threads"] == torch.get_num_threads()
    assert data["environment"]["dtypes"] == ["float32", "bfloat16"]
    assert set(data["environment"]["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "amx_tile"}
    checks = json.loads((tmp_path / "bench_model_checks.json").read_text())["rows"]
    assert all(c["ok"] for c in checks) and len(checks) == 4
    assert all(c["max_rel_error"] < 1e-4 for c in checks if c["dtype"] == "float32")
    parts = {r["part"] for r in json.loads(
        (tmp_path / "bench_model_profile.json").read_text())["rows"]}
    assert {"embedding", "attention", "feed-forward", "norms", "rest"} <= parts
    assert (tmp_path / "bench_model.png").stat().st_size > 1000


def test_speedups_are_relative_to_the_fff_model():
    def row(model, kind, dtype, ms):
        return {"model": model, "kind": kind, "dtype": dtype, "batch": 8, "latency_ms": ms}

    rows = [row(bench_model.FFF_MODEL, "fff", "float32", 2.0),
            row("crammedbert-4095", "dense", "float32", 5.0),
            row("hf-bert-base", "dense", "float32", 4.0),
            row(bench_model.FFF_MODEL, "fff", "bfloat16", 1.5),
            row(bench_model.HF_AUTOCAST, "dense", "bfloat16", 3.0),
            {"model": "onnx-int8:x", "kind": "dense", "dtype": "float32", "batch": 8,
             "skipped": "onnxruntime not installed"}]
    bench_model.add_speedups(rows)
    assert [r.get("fff_model_speedup") for r in rows] == [1.0, 2.5, 2.0, 1.0, 2.0, None]
    fp32, bf16 = rows[0], rows[3]
    assert fp32["speedup_vs_fastest_dense"] == 2.0 and fp32["fastest_dense"] == "hf-bert-base"
    assert fp32["speedup_vs_fastest_dense_any_dtype"] == 1.5
    assert fp32["fastest_dense_any_dtype"] == f"{bench_model.HF_AUTOCAST} (bfloat16)"
    assert bf16["speedup_vs_fastest_dense"] == 2.0
    assert "speedup_vs_fastest_dense" not in rows[1]  # dense rows get fff_model_speedup only
    assert [(r["dtype"], r["model"]) for r in bench_model.fastest_dense(rows)] == [
        ("float32", "hf-bert-base"), ("bfloat16", bench_model.HF_AUTOCAST)]


def test_a_wrong_fast_path_stops_the_benchmark(monkeypatch):
    s = small_settings()
    model = bench_model.build_model("tiny-fff", torch.float32, "cpu", 16)
    ffn = model.layers[2].ffn
    original = ffn.forward
    monkeypatch.setattr(ffn, "forward", lambda x: original(x) * 1.01)
    with pytest.raises(RuntimeError, match="output check failed for tiny-fff"):
        bench_model.check_model("tiny-fff", model, "float32", s)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--dtypes must be among"):
        bench_cli.model_settings(parse(["--dtypes", "float16"]))
    with pytest.raises(ValueError, match="unknown models"):
        bench_cli.model_settings(parse(["--models", "gpt2"]))


def test_hf_baseline_on_packed_gemms_is_checked_and_packed():
    pytest.importorskip("transformers")
    from ultrafastbert.model.linear import InferenceLinear

    s = small_settings(models=(bench_model.HF_PACKED,))
    bert = bench_model.build_model(bench_model.HF_PACKED, torch.float32, "cpu", 16)
    linears = [m for m in bert.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, InferenceLinear) for m in linears)
    report = bench_model.check_model(bench_model.HF_PACKED, bert, "float32", s)
    assert report["ok"] and report["max_rel_error"] < 1e-4
    assert all(m._packed is not None for m in linears), "the timed path must be the packed one"


def test_texts_mode_refuses_bad_arguments_before_loading_anything(tmp_path, capsys):
    from ultrafastbert.cli import main

    assert main(["bench", "model", "--texts", str(tmp_path), "--models", "tiny-fff"]) == 2
    assert "--texts needs exactly one converted model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--texts", str(tmp_path), "--precision", "int4"])
    assert "--precision must be among" in capsys.readouterr().err
