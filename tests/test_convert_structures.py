"""Structures beyond plain FFF trees (``KxD+sN``, ``KxD+rN`` beside them, ``KxDbB`` block
nodes): parsing and cost, the float64 reference of their semantics (routes first, then values,
every CPU kernel), the init, save/load and the run."""

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
from ultrafastbert.errors import ConfigError, InputError  # noqa: E402
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
    # block nodes: B neurons a visited node, the plain spec's JSON unchanged
    trees, extras = parse_structure("4x7b2,2x3b3+s4", 2)
    assert trees == [[4, 7], [2, 3]]
    assert extras == [{"shared": 0, "rank": 0, "block": 2},
                      {"shared": 4, "rank": 0, "block": 3}]
    assert block_cost([4, 7], extras[0]) == block_cost([8, 7]) == 64
    assert block_cost([2, 3], extras[1]) == 2 * 4 * 3 + 4
    assert Extras.from_json(extras[1]).label == "b3+s4"
    assert parse_structure("8x7b1", 1) == ([[8, 7]], [None])  # B = 1 is the plain tree


@pytest.mark.parametrize("spec, message", [
    ("8x7+x3", "s<N>"), ("8x7+s0", "add nothing"), ("8x7+s4+s2", "twice"), ("s16", "KxD"),
    ("8x7+", "s<N>"), ("8x7b0", "B >= 1"), ("8x7b", "KxD")])
def test_parse_structure_bad(spec, message):
    with pytest.raises(InputError, match=message):
        parse_structure(spec, 2)


def _describe_config(tmp_path, spec: str, n_layers: int = 2, width: int = 1536) -> dict:
    """``glue``'s description of a converted model whose config.json holds ``spec``."""
    from ultrafastbert.glue.transformers_models import describe

    layers, extras = parse_structure(spec, n_layers)
    config = {"architectures": ["BertModel"], "model_type": "bert", "num_hidden_layers": n_layers,
              "intermediate_size": width, "ffn_width": width, "fff_layers": layers,
              "ffn_extras": extras if any(extras) else None}
    folder = tmp_path / spec.replace("+", "p").replace(",", "_")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return describe(folder, spec)


@pytest.mark.parametrize("spec, stored, used", [
    ("8x7", 8 * 255, 64), ("6x7+s16", 6 * 255 + 16, 64), ("6x7+r16", 6 * 255 + 16, 64),
    ("4x7b2", 4 * 255 * 2, 64), ("2x3b3+s4+r2", 2 * 15 * 3 + 6, 2 * 4 * 3 + 6),
    ("8x7,none", 8 * 255 / 2, 32)])
def test_glue_describes_the_cost_of_every_structure(tmp_path, spec, stored, used):
    """The GLUE report's neurons and cost count the shared neurons, the low-rank term and the
    block nodes (the same cost as ``active_fraction``)."""
    info = _describe_config(tmp_path, spec)
    assert info["active_neurons"] == round(used) and info["neurons"] == round(stored)
    layers, extras = parse_structure(spec, 2)
    assert info["ffn_cost"] == pytest.approx(active_fraction(layers, 1536, extras))
    assert info["ffn_cost"] == pytest.approx(used / 1536)


def test_glue_describe_counts_the_extras_not_the_trees_alone(tmp_path):
    """Negative control: the trees of 6x7+s16 alone cost 48 neurons, the structure 64."""
    assert _describe_config(tmp_path, "6x7")["active_neurons"] == 48
    assert _describe_config(tmp_path, "6x7+s16")["active_neurons"] == 64
    from ultrafastbert.glue.transformers_models import describe

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"fff_layers": [[6, 7], [6, 7]], "ffn_width": 1536,
         "ffn_extras": [{"shared": 16, "rank": 0}]}))
    with pytest.raises(ConfigError, match="ffn_extras entries"):
        describe(folder, "bad")


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


def _block_node_block(seed=0, d=16, spec=(2, 3), block=3, extras=None) -> FFFBlock:
    torch.manual_seed(seed)
    block_ = make_block(d, spec, extras or Extras(block=block))
    with torch.no_grad():
        for p in block_.parameters():
            p.normal_(0, 0.5)
    return block_.eval()


@pytest.mark.parametrize("extras", [Extras(block=2), Extras(block=3), Extras(3, 2, 2)])
def test_block_nodes_against_their_float64_reference(extras):
    """Routes first (each kernel's visited nodes are the float64 reference's), then values
    (the reference adds every visited node's further neurons token by token) on every CPU
    inference kernel and the training path, odd sizes; gradients reach the further neurons."""
    block = _block_node_block(extras=extras, d=37, spec=(2, 3))
    assert block.node_neurons is not None
    assert block.node_neurons.linear_in.weight.shape == (2 * 15 * (extras.block - 1), 37)
    for n_tokens in (1, 13):
        x = torch.randn(n_tokens, 37)
        nodes, want = structured_reference(block, x)
        kernels = _cpu_kernels()
        assert "torch" in kernels
        for name in kernels:
            set_fff_runtime(block, name)
            with torch.no_grad():
                _, got_nodes = block.fff.forward_with_nodes(x)
                assert torch.equal(got_nodes, nodes), name
                got = block(x)
            assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), name
    x = torch.randn(13, 37)
    _, want = structured_reference(block, x)
    xg = x.clone().requires_grad_(True)
    got = block.train()(xg)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert block.node_neurons.linear_in.weight.grad.abs().sum() > 0
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_block_nodes_gradient_matches_autograd_of_the_reference():
    """The sparse training path's gradients equal autograd through a dense masked form."""
    import torch.nn.functional as F

    block = _block_node_block(block=2).train()
    x = torch.randn(9, 16, requires_grad=True)
    block(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in block.node_neurons.parameters()] + [x.grad.clone()]
    for p in block.parameters():
        p.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    fff, nn_ = block.fff, block.node_neurons
    with torch.no_grad():
        nodes = route(x2, fff.linear_in.weight, fff.linear_in.bias, 2, 3)[0].reshape(9, -1)
        mask = torch.zeros(9, nn_.linear_in.weight.shape[0]).scatter_(1, nn_.rows(nodes), 1.0)
    logits = F.linear(x2, fff.linear_in.weight, fff.linear_in.bias)
    tree_mask = torch.zeros_like(logits).scatter_(1, nodes, 1.0)
    y = F.linear(F.gelu(logits) * tree_mask, fff.linear_out.weight) + block.bias
    y = y + F.linear(F.gelu(F.linear(x2, nn_.linear_in.weight, nn_.linear_in.bias)) * mask,
                     nn_.linear_out.weight)
    y.pow(2).sum().backward()
    want = [p.grad for p in nn_.parameters()] + [x2.grad]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4)


def test_block_nodes_off_path_neurons_do_not_matter():
    """Changing the further neurons of nodes no token visits leaves the output unchanged;
    changing a visited node's changes it (negative control)."""
    block = _block_node_block(block=3)
    x = torch.randn(13, 16)
    nodes, want = structured_reference(block, x)
    visited = set(nodes.reshape(-1).tolist())
    unvisited = next(n for n in range(2 * 15) if n not in visited)
    per = block.node_neurons.per_node
    with torch.no_grad():
        block.node_neurons.linear_in.weight[unvisited * per:(unvisited + 1) * per] += 3.0
        block.node_neurons.linear_out.weight[:, unvisited * per] += 3.0
        assert torch.allclose(block(x).double(), want, atol=1e-5)
        hit = int(nodes[0, 0, 1])
        block.node_neurons.linear_out.weight[:, hit * per] += 3.0
        assert not torch.allclose(block(x).double(), want, atol=1e-3)


def test_plain_specs_build_plain_blocks(source):
    student = make_student(source, parse_fff("2x3", source.n_layers))
    assert all(type(b) is FFFBlock and b.extras is None and b.node_neurons is None
               for b in fff_blocks(student))
    assert not any("extras" in k or "node_neurons" in k for k in student.state_dict())
    assert student.config.ffn_extras is None


@pytest.mark.parametrize("extras", [Extras(5, 3), Extras(5, 3, 2)])
def test_bfloat16_cast_keeps_the_structure_close(extras):
    block = _random_block(extras=extras)
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


def test_init_of_block_nodes(source, inputs):
    """A block node's further neurons are dense neurons (input rows and biases) other than its
    routing neuron, with their dense biases; block nodes fit the dense block better than plain
    nodes in the same trees."""
    dense = dense_ffns(source.model, FAMILIES["bert"])[0]
    x = inputs[0]
    y = dense(x)
    block = make_block(x.shape[1], [2, 2], Extras(block=3))
    fit = init_block(block, dense, x, split="neuron")
    w1, b1 = dense.w1, dense.b1

    def dense_index(row):
        j = int((w1 - row).abs().sum(1).argmin())
        assert torch.equal(row, w1[j])
        return j

    per = block.node_neurons.per_node
    for g in range(2 * 7):
        router = dense_index(block.fff.linear_in.weight[g])
        others = [dense_index(block.node_neurons.linear_in.weight[g * per + i])
                  for i in range(per)]
        assert router not in others and len(set(others)) == per
        assert all(block.node_neurons.linear_in.bias[g * per + i] == b1[j]
                   for i, j in enumerate(others))
    plain = make_block(x.shape[1], [2, 2])
    fit_plain = init_block(plain, dense, x, split="neuron")
    assert fit.refit < fit_plain.refit
    with torch.no_grad():
        assert relative_error(block(x), y) == pytest.approx(fit.refit, rel=1e-4)


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_inference_paths(source, inputs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from ultrafastbert.infer import Predictor

    trees, extras = parse_structure("2x3b2+s4+r2,1x2+r3", source.n_layers)
    student = make_student(source, trees, extras)
    dense = dense_ffns(source.model, FAMILIES["bert"])
    for block, ffn, x in zip(fff_blocks(student), dense, inputs, strict=True):
        init_block(block, ffn, x, split="neuron")
    out = tmp_path / "model"
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(source.tokenizer_dir).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_extras"] == [{"shared": 4, "rank": 2, "block": 2},
                                    {"shared": 0, "rank": 3}]
    loaded = load_converted(out)
    auto = AutoModel.from_pretrained(out)
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        want = student(input_ids=ids).last_hidden_state
        for model in (loaded, auto):
            blocks = fff_blocks(model)
            assert [b.extras.spec for b in blocks] == [Extras(4, 2, 2), Extras(0, 3)]
            assert [b.node_neurons is not None for b in blocks] == [True, False]
            assert torch.equal(model(input_ids=ids).last_hidden_state, want)
    for name, p in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    # where each part runs, as `ultrafastbert kernels --model` says it
    from ultrafastbert.cli.kernels import _structures

    text = _structures(str(out))
    assert "layer 0: 2x3 trees: kernel" in text and "layer 1: 1x2 trees: kernel" in text
    assert "block nodes of 2: the 1 further neuron(s) of each visited node in torch" in text
    assert "s4+r2 beside the trees: torch linears" in text
    assert text.count("block nodes") == 1 and "r3 beside" in text
    assert _structures(str(source.path)) == ""  # a dense model: nothing to say
    predictor = Predictor.from_pretrained(out)
    got = predictor.embed(["the king saw the queen."])
    assert got.shape == (1, source.model.config.hidden_size) and torch.isfinite(got).all()


def test_run_with_a_structure(bert_dir, tmp_path):
    import ultrafastbert
    from ultrafastbert.cli import main

    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    out = tmp_path / "out"
    assert main(["convert", str(bert_dir), "--fff", "1x3b2+s4+r2", "--out", str(out),
                 "--budget", "6s", "--corpus", str(corpus), "--init-tokens", "600",
                 "--batch-size", "8", "--no-progress", "--threads", "1"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["ffn_extras"] == [{"shared": 4, "rank": 2, "block": 2}] * 2
    assert report["active_fraction"] == pytest.approx((4 * 2 + 4 + 2) / 64)
    assert set(report["phases"]) == {"layerwise", "end-to-end"}
    model = ultrafastbert.from_pretrained(out)
    assert all(b.extras.spec == Extras(4, 2, 2) and b.node_neurons.per_node == 1
               for b in fff_blocks(model))
    # the comparison script reads it back: the structure checked, scored, throughput reported
    from test_convert import _script
    from test_glue_cli import make_glue_dir

    script = _script("convert_structures")
    results = tmp_path / "results"
    assert script.main(["--models", str(out), "--glue-dir", str(make_glue_dir(tmp_path / "g")),
                        "--out", str(results), "--threads", "1"]) == 0
    row = json.loads((results / "results.json").read_text())["rows"][0]
    assert row["fff"] == "1x3b2+s4+r2"
    assert row["cost_pct"] == pytest.approx(100 * 14 / 64, abs=0.01)
    assert "| 1x3b2+s4+r2 |" in (results / "results.md").read_text()
    assert set(row["tokens_per_s"]) == {"layerwise", "end-to-end"}
    assert all(v > 0 for v in row["tokens_per_s"].values())
    report["ffn_extras"] = None  # negative control: a report that does not match the blocks
    (out / "conversion.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="does not match"):
        script.main(["--models", str(out), "--glue-dir", str(tmp_path / "g"),
                     "--out", str(results), "--threads", "1"])


def test_block_nodes_count_in_the_size_check():
    from ultrafastbert.convert.source import check_fff_size

    check_fff_size([[1, 20]], 32)  # 2 * (2^21 - 1) * 32 parameters: fits
    with pytest.raises(InputError, match="GiB of fp32 weights per layer"):
        check_fff_size([[1, 20]], 32, [{"shared": 0, "rank": 0, "block": 3}])
