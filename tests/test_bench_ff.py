"""The FF benchmark checks outputs before timing and writes its files."""

import json

import pytest
import torch

from ultrafastbert.bench import ff
from ultrafastbert.bench.common import format_table, time_call
from ultrafastbert.cli import main


def small_settings(**kw):
    base = dict(d_model=32, tokens=(1, 9), configs=("1x3", "4x1"), implementations=("torch",),
                repeats=2, warmup=1)
    base.update(kw)
    return ff.BenchSettings(**base)


@pytest.mark.slow  # integration: CI runs it (make test-slow)
def test_run_writes_table_csv_json_png(tmp_path):
    result = ff.run(small_settings(), tmp_path, train=True)
    names = {p.name for p in result["files"]}
    assert {"bench_ff.json", "bench_ff.csv", "bench_ff_train.json", "bench_ff.png"} <= names
    data = json.loads((tmp_path / "bench_ff.json").read_text())
    env = data["environment"]
    assert env["torch_threads"] >= 1 and env["torch"] == torch.__version__
    fff_rows = [r for r in data["rows"] if r["kind"] == "fff"]
    assert len(fff_rows) == 2 * 2 and all(r["median_s"] > 0 for r in fff_rows)
    assert all(r["check_rows"] >= 1 and r["max_abs_err"] < 1e-4 for r in fff_rows)
    dense = [r for r in data["rows"] if r["config"] == "dense-4095" and
             r["implementation"] == "nn.Linear"]
    assert all(abs(r["speedup_vs_torch_dense"] - 1) < 1e-9 for r in dense)
    assert all(r["speedup_vs_fastest_dense"] <= 1 + 1e-9 for r in dense)
    assert env["cpu_flags"]["avx2"] in (True, False, None) and env["dtypes"] == ["float32"]
    assert "| 1x3 | float32 | torch |" in result["table"]
    assert {r["implementation"] for r in result["train_rows"]} == {
        "fff-sparse", "fff-masked", "dense-4095 nn.Linear"}


def test_check_fff_refuses_a_wrong_kernel(monkeypatch):
    layer = ff.FFF(16, n_trees=1, depth=3).eval()
    x = torch.randn(20, 16)
    ff.check_fff(layer, x, 0)
    _assert_refuses_scaled_output(monkeypatch, layer, x, 1.01)


def _assert_refuses_scaled_output(monkeypatch, layer, x, factor):
    """``check_fff`` rejects ``layer`` once its outputs are scaled by ``factor``."""
    real = layer.forward_with_nodes

    def broken(inp, return_nodes=True):
        y, nodes = real(inp, return_nodes)
        return y * factor, nodes

    monkeypatch.setattr(layer, "forward_with_nodes", broken)
    with pytest.raises(RuntimeError, match="output differs"):
        ff.check_fff(layer, x, 0)


def test_packed_dense_variant_is_timed_on_the_packed_path():
    module = ff.DenseFF(16, 30)
    variants = ff.dense_variants(module, compile_dense=False)
    assert "onednn-packed" in variants
    assert ff.check_dense(variants, torch.randn(5, 16)) < 1e-5
    with torch.no_grad():
        variants["onednn-packed"](torch.randn(3, 16))
    packed = closure_linears(variants["onednn-packed"])
    assert packed and all(m._packed is not None for m in packed)


def closure_linears(fn) -> list:
    """The InferenceLinear modules a variant's closure holds."""
    from ultrafastbert.model.linear import InferenceLinear

    cells = fn.__closure__ or ()
    return [c.cell_contents for c in cells if isinstance(c.cell_contents, InferenceLinear)]


def test_check_dense_refuses_a_wrong_variant():
    module = ff.DenseFF(16, 30)
    variants = ff.dense_variants(module, compile_dense=False)
    assert ff.check_dense(variants, torch.randn(5, 16)) < 1e-5
    variants["broken"] = lambda x: module(x) + 1.0
    with pytest.raises(RuntimeError, match="broken"):
        ff.check_dense(variants, torch.randn(5, 16))


def test_parse_config_and_timer():
    assert ff.parse_config("16x7") == (16, 7)
    with pytest.raises(ValueError, match="KxD"):
        ff.parse_config("16-7")
    samples = time_call(lambda: sum(range(100)), warmup=1, repeats=4)
    assert len(samples) == 4 and all(s > 0 for s in samples)
    assert format_table([{"a": 1.23456, "b": "x"}], ["a", "b"]).splitlines()[2] == "| 1.23 | x |"


def test_cli_bench_ff_small(tmp_path, capsys):
    code = main(["bench", "ff", "--tokens", "1,4", "--configs", "1x2", "--implementations",
                 "torch", "--repeats", "2", "--warmup", "1", "--threads", "1", "--out",
                 str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "1 threads" in out and "| 1x2 | float32 | torch |" in out
    assert (tmp_path / "bench_ff.csv").exists()


def test_cli_bad_arguments_are_clear(capsys):
    assert main(["bench", "ff", "--configs", "bad", "--tokens", "1"]) == 2
    assert "KxD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "ff", "--tokens", "0"])


def test_bfloat16_run_checks_with_low_precision_tolerances():
    result = ff.run(small_settings(dtypes=(torch.bfloat16,), tokens=(5,)), None)
    assert result["environment"]["dtypes"] == ["bfloat16"]
    assert {r["implementation"] for r in result["rows"] if r["kind"] == "dense"} == {
        "nn.Linear", "mm-pretransposed", "onednn-packed"}
    assert all(r["dtype"] == "bfloat16" for r in result["rows"])


def test_both_dtypes_custom_width_with_biases_and_speedups_per_dtype():
    """fp32 and bf16 in one run at a MiniLM-like shape (d 48, dense 96 with biases): every row
    has both speedups, the same-dtype one against its own dtype's fastest dense."""
    s = small_settings(d_model=48, tokens=(3, 17), configs=("2x2",), dtypes=(
        torch.float32, torch.bfloat16), dense_widths=(96,), dense_bias=True)
    result = ff.run(s, None)
    rows = result["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {r["config"] for r in rows if r["kind"] == "dense"} == {"dense-96+bias"}
    assert result["environment"]["reference_dense"] == "dense-96+bias"
    for dtype in ("float32", "bfloat16"):
        for tokens in (3, 17):
            dense = [r for r in rows if r["kind"] == "dense" and r["dtype"] == dtype
                     and r["tokens"] == tokens]
            best = min(r["median_s"] for r in dense)
            assert max(r["speedup_vs_fastest_dense"] for r in dense) == pytest.approx(1.0)
            fff_row = ff_row(rows, "2x2", dtype, tokens)
            assert fff_row["speedup_vs_fastest_dense"] == pytest.approx(
                best / fff_row["median_s"])
            assert fff_row["speedup_vs_fastest_dense_any_dtype"] <= (
                fff_row["speedup_vs_fastest_dense"] + 1e-12)
    assert "| dense-96+bias | bfloat16 | 3 |" in result["fastest_dense_table"]
    module = ff.DenseFF(48, 96, bias=True)
    assert module.linear_in.bias is not None and module.linear_out.bias.abs().sum() > 0


def ff_row(rows, config, dtype, tokens):
    found = [r for r in rows if r["config"] == config and r["dtype"] == dtype
             and r["tokens"] == tokens]
    assert len(found) == 1
    return found[0]


def test_speedups_any_dtype_name_the_fastest_dense():
    def row(kind, config, impl, dtype, seconds):
        return {"kind": kind, "config": config, "implementation": impl, "dtype": dtype,
                "tokens": 8, "median_s": seconds}

    rows = [row("dense", "dense-4095", "nn.Linear", "float32", 8.0),
            row("dense", "dense-4095", "onednn-packed", "float32", 4.0),
            row("dense", "dense-4095", "nn.Linear", "bfloat16", 2.0),
            row("dense", "dense-3072", "nn.Linear", "bfloat16", 1.0),  # not the reference
            row("fff", "1x11", "native", "float32", 0.1),
            row("fff", "1x11", "torch", "bfloat16", 0.5)]
    ff.add_speedups(rows, "dense-4095")
    fp32, bf16 = rows[4], rows[5]
    assert fp32["speedup_vs_torch_dense"] == pytest.approx(80)
    assert fp32["speedup_vs_fastest_dense"] == pytest.approx(40)
    assert fp32["speedup_vs_fastest_dense_any_dtype"] == pytest.approx(20)
    assert bf16["speedup_vs_fastest_dense"] == pytest.approx(4)
    assert bf16["fastest_dense_any_dtype"] == "bfloat16 nn.Linear"
    with pytest.raises(RuntimeError, match="no dense-1536 rows"):
        ff.add_speedups(rows, "dense-1536")


def test_check_fff_in_bf16_counts_near_zero_rows_and_refuses_a_wrong_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = ff.FFF(32, n_trees=2, depth=3).to(torch.bfloat16).eval()
    x = torch.randn(200, 32).to(torch.bfloat16)
    report = ff.check_fff(layer, x, 0)
    assert report["check_rows"] == 200 and 0 <= report["excluded_rows"] < 200
    _assert_refuses_scaled_output(monkeypatch, layer, x, 1.1)


def test_requested_implementation_that_runs_in_no_dtype_is_an_error():
    with pytest.raises(ValueError, match="nope"):
        ff.run(small_settings(implementations=("nope",), tokens=(2,)), None)


def test_cli_bench_ff_two_dtypes_prints_the_cpu(tmp_path, capsys):
    code = main(["bench", "ff", "--tokens", "2", "--configs", "1x2", "--implementations",
                 "torch", "--dtypes", "float32,bfloat16", "--d-model", "24", "--dense-widths",
                 "40", "--dense-bias", "--repeats", "1", "--warmup", "0", "--out",
                 str(tmp_path)])
    out = capsys.readouterr().out
    env = json.loads((tmp_path / "bench_ff.json").read_text())["environment"]
    assert code == 0 and env["cpu"] in out and "Fastest dense form per dtype" in out
    assert env["dtypes"] == ["float32", "bfloat16"] and env["d_model"] == 24
    assert "| 1x2 | bfloat16 | torch |" in out and "dense-40+bias" in out
    with pytest.raises(SystemExit):
        main(["bench", "ff", "--dtypes", "int8"])
    assert "dtypes must be among" in capsys.readouterr().err


def test_demo_speed_table_names_the_cpu():
    from ultrafastbert.bench.common import environment
    from ultrafastbert.cli.demo import speed_table

    text = speed_table(small_settings(tokens=(2,), configs=("1x2",), dense_widths=(40,),
                                      repeats=1, warmup=0))
    env = environment()
    assert f"measured on: {env['cpu']}" in text and f"{env['torch_threads']} threads" in text
    assert "1x2 FFF vs dense 40" in text and "| 1x2 | float32 | torch |" in text
