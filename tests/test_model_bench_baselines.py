"""``bench model`` on a tiny converted model: its dense source's baselines (torch fp32/bf16,
autocast, sentence-transformers, ONNX Runtime fp32 and int8) are checked before timing, the FFF
model is compared with the fastest dense of each dtype, and a missing extra is a skip row."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from convertcheck import tiny_bert  # noqa: E402
from ultrafastbert.bench import baselines  # noqa: E402
from ultrafastbert.bench import model as bench_model  # noqa: E402
from ultrafastbert.cli import bench as bench_cli  # noqa: E402

HAS_ST = baselines.missing_extra("st") is None
HAS_ONNX = baselines.missing_extra("onnx") is None


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(converted dir whose conversion.json names its source, the sentence-transformers source)."""
    from transformers import AutoTokenizer

    from ultrafastbert.convert.source import load_source, make_student, parse_fff

    root = tmp_path_factory.mktemp("bench-baselines")
    source_dir = tiny_bert(root / "dense", sentence_transformers=True)
    source = load_source(source_dir)
    student = make_student(source, parse_fff("2x3", source.n_layers))
    converted = root / "converted"
    student.save_pretrained(converted)
    AutoTokenizer.from_pretrained(source.tokenizer_dir).save_pretrained(converted)
    (converted / "conversion.json").write_text(json.dumps(
        {"settings": {"source": str(source_dir), "fff": "2x3"}}))
    return converted, source_dir


def settings(models, dtypes=("float32",)) -> bench_model.ModelBenchSettings:
    return bench_model.ModelBenchSettings(models=tuple(models), batches=(2,), seq_len=16,
                                          dtypes=dtypes, warmup=0, repeats=3, max_seconds=2.0,
                                          profile_batch=None)


def parse(argv):
    from ultrafastbert.cli import build_parser

    return build_parser().parse_args(["bench", "model", *argv])


def test_a_converted_model_brings_its_dense_source_baselines(dirs):
    converted, source = dirs
    models = bench_cli.model_settings(parse(["--models", str(converted)])).models
    assert models == (str(converted), str(source), f"autocast:{source}", f"st:{source}",
                      f"onnx:{source}", f"onnx-int8:{source}")
    alone = bench_cli.model_settings(parse(["--models", str(converted),
                                                  "--no-dense-baselines"])).models
    assert alone == (str(converted),)
    explicit = bench_cli.model_settings(parse(["--models", f"onnx:{source}"])).models
    assert explicit == (f"onnx:{source}",)  # a dense directory brings nothing more
    with pytest.raises(ValueError, match="unknown models"):
        bench_cli.model_settings(parse(["--models", "onnx:/no/such/dir"]))
    with pytest.raises(ValueError, match="not a dense model"):
        bench_cli.model_settings(parse(["--models", str(converted), "--dense-source",
                                              str(converted)]))


@pytest.mark.slow  # integration (two ONNX exports, both dtypes): CI runs it (make test-slow)
@pytest.mark.skipif(not (HAS_ST and HAS_ONNX), reason="needs the st and onnx extras (dev)")
def test_every_baseline_is_checked_then_timed_and_the_fff_model_compared(dirs, tmp_path,
                                                                        capsys):
    converted, source = dirs
    args = parse(["--models", str(converted), "--batches", "2", "--seq-len", "16", "--dtypes",
                  "float32,bfloat16", "--warmup", "0", "--repeats", "3", "--max-seconds", "2",
                  "--profile-batch", "0", "--out", str(tmp_path)])
    assert bench_cli.run_model(args) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "bench_model.json").read_text())
    rows = {(r["model"], r["dtype"]): r for r in data["rows"]}
    fp32 = {str(converted), str(source), f"st:{source}", f"onnx:{source}", f"onnx-int8:{source}"}
    bf16 = {str(converted), str(source), f"autocast:{source}"}
    assert set(rows) == {(m, "float32") for m in fp32} | {(m, "bfloat16") for m in bf16}
    assert all(r["latency_ms"] > 0 and "skipped" not in r for r in rows.values())
    assert rows[(f"onnx-int8:{source}", "float32")]["runtime"] == "onnxruntime dynamic int8"
    checks = json.loads((tmp_path / "bench_model_checks.json").read_text())["rows"]
    by_name = {(c["model"], c["dtype"]): c for c in checks}
    assert all(c["ok"] for c in checks) and len(checks) == len(rows)
    assert by_name[(f"onnx:{source}", "float32")]["max_rel_error"] < 1e-4
    assert by_name[(f"st:{source}", "float32")]["sentence_embedding_max_abs_error"] < 1e-4
    int8 = by_name[(f"onnx-int8:{source}", "float32")]
    assert int8["mean_token_cosine"] >= 0.95 and int8["min_pooled_cosine"] >= 0.95
    fff = rows[(str(converted), "float32")]
    dense_fp32 = [r for (m, d), r in rows.items() if d == "float32" and m != str(converted)]
    fastest = min(dense_fp32, key=lambda r: r["latency_ms"])
    assert fff["kind"] == "fff" and fff["fastest_dense"] == fastest["model"]
    assert fff["speedup_vs_fastest_dense"] == pytest.approx(
        fastest["latency_ms"] / fff["latency_ms"])
    assert fff["speedup_vs_fastest_dense_any_dtype"] <= fff["speedup_vs_fastest_dense"] + 1e-12
    env = data["environment"]
    assert env["dtypes"] == ["float32", "bfloat16"] and "amx_bf16" in env["cpu_flags"]
    assert env["onnxruntime_version"] and env["sentence-transformers_version"]
    assert "fastest dense model per dtype and batch" in out and env["cpu"] in out


def test_a_missing_extra_is_a_skip_row_not_a_crash(dirs, monkeypatch):
    converted, source = dirs
    real = baselines.importlib.util.find_spec
    monkeypatch.setattr(baselines.importlib.util, "find_spec", lambda name, *a: None if name in (
        "onnxruntime", "sentence_transformers") else real(name, *a))
    result = bench_model.run_bench(settings([str(converted), f"st:{source}", f"onnx:{source}",
                                             f"onnx-int8:{source}"]))
    skipped = {r["model"]: r["skipped"] for r in result["rows"] if "skipped" in r}
    assert set(skipped) == {f"st:{source}", f"onnx:{source}", f"onnx-int8:{source}"}
    assert "pip install 'ultrafastbert[onnx]'" in skipped[f"onnx:{source}"]
    assert "pip install 'ultrafastbert[st]'" in skipped[f"st:{source}"]
    timed = [r for r in result["rows"] if "latency_ms" in r]
    assert [r["model"] for r in timed] == [str(converted)]
    assert [c["skipped"] for c in result["checks"] if c["ok"] is None] == list(skipped.values())


def test_an_st_baseline_needs_a_sentence_transformers_dir(tmp_path):
    plain = tiny_bert(tmp_path / "plain")
    reference = bench_model.build_model(str(plain), torch.float32, "cpu", 16)
    built = baselines.build(f"st:{plain}", reference, 16)
    if HAS_ST:
        assert isinstance(built, baselines.Skipped) and "modules.json" in built.reason
    assert f"st:{plain}" not in baselines.dense_baselines(plain)


def test_autocast_baseline_is_checked_against_fp32_and_can_fail(dirs, monkeypatch):
    _, source = dirs
    s = settings([f"autocast:{source}"], dtypes=("bfloat16",))
    model = bench_model.build_model(f"autocast:{source}", torch.bfloat16, "cpu", 16)
    report = bench_model.check_model(f"autocast:{source}", model, "bfloat16", s)
    assert report["ok"] and report["max_rel_error"] > 0 and report["mean_token_cosine"] >= 0.99
    linear = next(m for m in model.reference.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    hook = linear.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    with torch.inference_mode():
        model(torch.tensor([[7, 8, 9]]))
        model.reference(torch.tensor([[7, 8, 9]]))
    hook.remove()
    assert seen == [torch.bfloat16, torch.float32]  # the GEMMs really ran in bf16
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, attention_mask=None: type(
        "O", (), {"last_hidden_state": original(ids, attention_mask).last_hidden_state * 2})())
    with pytest.raises(RuntimeError, match="output check failed"):
        bench_model.check_model(f"autocast:{source}", model, "bfloat16", s)


@pytest.mark.skipif(not HAS_ONNX, reason="needs the onnx extra (dev)")
def test_a_wrong_onnx_output_stops_the_benchmark(dirs, monkeypatch):
    _, source = dirs
    model = bench_model.build_model(f"onnx-int8:{source}", torch.float32, "cpu", 16)
    s = settings([f"onnx-int8:{source}"])
    assert bench_model.check_model(f"onnx-int8:{source}", model, "float32", s)["ok"]
    real_run = model.session.run

    class Broken:
        def run(self, outputs, feed):
            [y] = real_run(outputs, feed)
            return [y[..., ::-1].copy()]  # channels shuffled: a wrong graph

    monkeypatch.setattr(model, "session", Broken())
    with pytest.raises(RuntimeError, match="output check failed for onnx-int8"):
        bench_model.check_model(f"onnx-int8:{source}", model, "float32", s)


def test_source_of_reads_conversion_json(dirs, tmp_path):
    converted, source = dirs
    assert baselines.source_of(converted) == source
    assert baselines.source_of(tmp_path) is None
    (tmp_path / "conversion.json").write_text(json.dumps({"settings": {"source": "/gone"}}))
    assert baselines.source_of(tmp_path) is None
    assert baselines.split_name("onnx-int8:a:b") == ("onnx-int8", "a:b")
    assert baselines.split_name("C:/models/x") == (None, "C:/models/x")
    assert not baselines.applies("st:x", "bfloat16") and baselines.applies("x", "bfloat16")


def test_a_converted_model_with_a_wrong_fff_block_fails_its_check(dirs, monkeypatch):
    from ultrafastbert.fff import FFF

    converted, _ = dirs
    s = settings([str(converted)])
    model = bench_model.build_model(str(converted), torch.float32, "cpu", 16)
    report = bench_model.check_model(str(converted), model, "float32", s)
    assert report["ok"] and report["fff_max_rel_error"] < 1e-5 and report["fff_tolerance"] == 1e-3
    layer = next(m for m in model.modules() if isinstance(m, FFF))
    real = layer.forward_with_nodes
    def broken(x, *args, **kwargs):
        y, nodes = real(x, *args, **kwargs)
        return y * 1.01, nodes

    monkeypatch.setattr(layer, "forward_with_nodes", broken)
    with pytest.raises(RuntimeError, match="output check failed"):
        bench_model.check_model(str(converted), model, "float32", s)
