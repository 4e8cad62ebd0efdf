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
    assert all(abs(r["speedup_vs_torch_dense4095"] - 1) < 1e-9 for r in dense)
    assert all(r["speedup_vs_fastest_dense4095"] <= 1 + 1e-9 for r in dense)
    assert "| 1x3 | torch |" in result["table"]
    assert {r["implementation"] for r in result["train_rows"]} == {
        "fff-sparse", "fff-masked", "dense-4095 nn.Linear"}


def test_check_fff_refuses_a_wrong_kernel(monkeypatch):
    layer = ff.FFF(16, n_trees=1, depth=3).eval()
    x = torch.randn(20, 16)
    ff.check_fff(layer, x, 0)
    real = layer.forward_with_nodes

    def broken(inp, return_nodes=True):
        y, nodes = real(inp, return_nodes)
        return y * 1.01, nodes

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
    assert code == 0 and "1 threads" in out and "| 1x2 | torch |" in out
    assert (tmp_path / "bench_ff.csv").exists()


def test_cli_bad_arguments_are_clear(capsys):
    assert main(["bench", "ff", "--configs", "bad", "--tokens", "1"]) == 2
    assert "KxD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "ff", "--tokens", "0"])


def test_bfloat16_run_checks_with_low_precision_tolerances():
    result = ff.run(small_settings(dtype=torch.bfloat16, tokens=(5,)), None)
    assert result["environment"]["dtype"] == "bfloat16"
    assert {r["implementation"] for r in result["rows"] if r["kind"] == "dense"} == {
        "nn.Linear", "mm-pretransposed", "onednn-packed"}
