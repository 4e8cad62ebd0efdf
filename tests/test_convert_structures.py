"""Structures beside the FFF trees (``KxD+sN``, ``KxD+rN``): parsing and cost, the float64
reference of their semantics (routes first, then values, every CPU kernel), the init, save/load
and the run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from convertcheck import tiny_corpus  # noqa: E402
from ultrafastbert.convert.data import load_segments  # noqa: E402
from ultrafastbert.convert.init import init_block, relative_error  # noqa: E402
from ultrafastbert.convert.pipeline import collect_inputs  # noqa: E402
from ultrafastbert.convert.source import (  # noqa: E402
    active_fraction,
    make_student,
    parse_fff,
    parse_structure,
)
from ultrafastbert.errors import InputError  # noqa: E402
from ultrafastbert.fff import dispatch  # noqa: E402
from ultrafastbert.fff.pytorch.routing import route  # noqa: E402
from ultrafastbert.model.converted import (  # noqa: E402
    FAMILIES,
    FFFBlock,
    dense_ffns,
    fff_blocks,
    load_converted,
)
from ultrafastbert.model.ffn_structures import (  # noqa: E402
    Extras,
    block_cost,
    structured_reference,
)
from ultrafastbert.model.pretrained import set_fff_runtime  # noqa: E402


# ------------------------------------------------------------------------------ specs
def test_parse_structure_and_cost():
    trees, extras = parse_structure("8x7+s16+r8", 2)
    assert trees == [[8, 7], [8, 7]] and extras == [{"shared": 16, "rank": 8}] * 2
    trees, extras = parse_structure("8x7,6x7+r16", 2)
    assert trees == [[8, 7], [6, 7]] and extras == [None, {"shared": 0, "rank": 16}]
    assert parse_fff("6x7+s16", 1) == [[6, 7]]  # the trees alone
    assert parse_structure("none", 1) == ([None], [None])
    # equal cost: 8x7 = 6x7+s16 = 6x7+r16 = 64 neuron-equivalents a token
    assert block_cost([8, 7]) == block_cost([6, 7], {"shared": 16, "rank": 0}) == 64
    assert active_fraction([[6, 7]], 1536, [{"shared": 0, "rank": 16}]) == pytest.approx(
        active_fraction([[8, 7]], 1536))
    assert active_fraction([[8, 7], None], 128, [{"shared": 8, "rank": 0}, None]) == \
        pytest.approx(72 / 256)
    assert Extras(4, 2).label == "+s4+r2" and Extras.from_json(None) == Extras()


@pytest.mark.parametrize("spec, message", [
    ("8x7+x3", "s<N>"), ("8x7+s0", "add nothing"), ("8x7+s4+s2", "twice"), ("s16", "KxD"),
    ("8x7+", "s<N>")])
def test_parse_structure_bad(spec, message):
    with pytest.raises(InputError, match=message):
        parse_structure(spec, 2)


# ------------------------------------------------------------------------------ semantics
def make_block(d, spec, extras=None) -> FFFBlock:
    return FFFBlock(d, spec[0], spec[1], extras)


def _random_block(d=16, spec=(2, 3), extras: Extras | None = None, seed=0) -> FFFBlock:
    torch.manual_seed(seed)
    block = make_block(d, spec, Extras(5, 3) if extras is None else extras)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block.eval()


def _cpu_kernels(n_trees: int = 2, depth: int = 3) -> list[str]:
    kernels = dispatch.registry()
    return [name for name, k in kernels.items()
            if k.unavailable_reason(torch.device("cpu"), torch.float32, "fp32") is None
            and k.shape_reason(n_trees, depth) is None]


@pytest.mark.parametrize("extras", [Extras(5, 0), Extras(0, 3), Extras(5, 3)])
def test_structured_block_against_its_float64_reference(extras):
    """Routes first (the trees' routes are the plain FFF's), then values on every CPU inference
    kernel and the training path; the extra parts matter (negative control)."""
    block = _random_block(extras=extras)
    assert block.extras is not None
    x = torch.randn(37, 16)
    nodes, want = structured_reference(block, x)
    fff = block.fff
    got_nodes = route(x, fff.linear_in.weight, fff.linear_in.bias, fff.n_trees, fff.depth)[0]
    assert torch.equal(got_nodes.reshape(nodes.shape), nodes)
    kernels = _cpu_kernels()
    assert "torch" in kernels
    for name in kernels:
        set_fff_runtime(block, name)
        with torch.no_grad():
            got = block(x)
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), name
    xg = x.clone().requires_grad_(True)  # the differentiable path
    got = block.train()(xg)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in block.extras.parameters())
    plain = FFFBlock(16, 2, 3)
    plain.load_state_dict(block.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain(x).double(), want, atol=1e-2)


def test_plain_specs_build_plain_blocks(source):
    student = make_student(source, parse_fff("2x3", source.n_layers))
    assert all(type(b) is FFFBlock and b.extras is None for b in fff_blocks(student))
    assert not any("extras" in k for k in student.state_dict())
    assert student.config.ffn_extras is None


def test_bfloat16_cast_keeps_the_structure_close():
    block = _random_block()
    x = torch.randn(20, 16)
    with torch.no_grad():
        want = block(x)
        got = block.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.15, rtol=0.05)


# ------------------------------------------------------------------------------ init
@pytest.fixture(scope="module")
def inputs(source, tmp_path_factory):
    rows = load_segments(str(tiny_corpus(tmp_path_factory.mktemp("c") / "c.txt", 300)),
                         source.tokenizer_dir, max_len=32)
    return collect_inputs(source.model, rows, 3000, 0, 32)


def test_init_of_the_extra_parts(source, inputs):
    """Shared neurons start as dense neurons (their input rows and biases); a full-rank
    linear term makes the init at least as good as the best linear map (the joint refit
    holds its columns); the extras lower the fit error of the same trees."""
    dense = dense_ffns(source.model, FAMILIES["bert"])[0]
    x = inputs[0]
    y = dense(x)
    d = x.shape[1]
    shared = make_block(d, [1, 1], Extras(shared=6))
    init_block(shared, dense, x, split="neuron")
    w1 = dense.w1
    for row, bias in zip(shared.extras.shared.linear_in.weight,
                         shared.extras.shared.linear_in.bias, strict=True):
        j = int((w1 - row).abs().sum(1).argmin())
        assert torch.equal(row, w1[j]) and bias == dense.b1[j]
    full = make_block(d, [1, 1], Extras(rank=d))
    init_block(full, dense, x, split="neuron")
    design = torch.cat([x, torch.ones(len(x), 1)], 1)
    linear = design @ torch.linalg.lstsq(design.double(), y.double()).solution.float()
    with torch.no_grad():
        assert relative_error(full(x), y) <= relative_error(linear, y) + 1e-4
    plain = make_block(d, [1, 1])
    fit_plain = init_block(plain, dense, x, split="neuron")
    with torch.no_grad():
        fit_shared = relative_error(shared(x), y)
    assert fit_shared < fit_plain.refit


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_inference_paths(source, inputs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from ultrafastbert.infer import Predictor

    trees, extras = parse_structure("2x3+s4+r2,1x2+r3", source.n_layers)
    student = make_student(source, trees, extras)
    dense = dense_ffns(source.model, FAMILIES["bert"])
    for block, ffn, x in zip(fff_blocks(student), dense, inputs, strict=True):
        init_block(block, ffn, x, split="neuron")
    out = tmp_path / "model"
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(source.tokenizer_dir).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_extras"] == [{"shared": 4, "rank": 2}, {"shared": 0, "rank": 3}]
    loaded = load_converted(out)
    auto = AutoModel.from_pretrained(out)
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        want = student(input_ids=ids).last_hidden_state
        for model in (loaded, auto):
            blocks = fff_blocks(model)
            assert [b.extras.spec for b in blocks] == [Extras(4, 2), Extras(0, 3)]
            assert torch.equal(model(input_ids=ids).last_hidden_state, want)
    for name, p in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    predictor = Predictor.from_pretrained(out)
    got = predictor.embed(["the king saw the queen."])
    assert got.shape == (1, source.model.config.hidden_size) and torch.isfinite(got).all()


def test_run_with_a_structure(bert_dir, tmp_path):
    import ultrafastbert
    from ultrafastbert.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    out = tmp_path / "out"
    assert main(["convert", str(bert_dir), "--fff", "1x3+s4+r2", "--out", str(out),
                 "--budget", "6s", "--corpus", str(corpus), "--init-tokens", "600",
                 "--batch-size", "8", "--no-progress", "--threads", "1"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["ffn_extras"] == [{"shared": 4, "rank": 2}] * 2
    assert report["active_fraction"] == pytest.approx((4 + 4 + 2) / 64)
    assert set(report["phases"]) == {"layerwise", "end-to-end"}
    model = ultrafastbert.from_pretrained(out)
    assert all(b.extras.spec == Extras(4, 2) for b in fff_blocks(model))
    # the comparison script reads it back: the structure checked, scored, throughput reported
    from test_convert import _script
    from test_glue_cli import make_glue_dir

    script = _script("convert_structures")
    results = tmp_path / "results"
    assert script.main(["--models", str(out), "--glue-dir", str(make_glue_dir(tmp_path / "g")),
                        "--out", str(results), "--threads", "1"]) == 0
    row = json.loads((results / "results.json").read_text())["rows"][0]
    assert row["fff"] == "1x3+s4+r2" and row["cost_pct"] == pytest.approx(100 * 10 / 64, abs=0.01)
    assert set(row["tokens_per_s"]) == {"layerwise", "end-to-end"}
    assert all(v > 0 for v in row["tokens_per_s"].values())
    report["ffn_extras"] = None  # negative control: a report that does not match the blocks
    (out / "conversion.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="does not match"):
        script.main(["--models", str(out), "--glue-dir", str(tmp_path / "g"),
                     "--out", str(results), "--threads", "1"])
