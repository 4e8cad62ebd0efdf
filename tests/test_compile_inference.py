"""torch.compile of a converted model for inference: the FFF blocks are one opaque operator
each (``ultrafastbert::fff_infer``), no graph break, compiled output equal to eager."""

from __future__ import annotations

import pytest
import torch

from convertcheck import tiny_bert
from test_infer_fast import _batch, _convert
from ultrafastbert.fff import FFF
from ultrafastbert.model.converted import load_converted


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return load_converted(_convert(tiny_bert(root / "src", seed=5), root / "fff", "bert",
                                   "base")).eval()


def _forward(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_eval_forward_has_no_graph_break(converted):
    torch._dynamo.reset()
    ids, mask = _batch(60, [7, 3, 5])
    with torch.no_grad():
        explained = torch._dynamo.explain(_forward(converted))(ids, mask)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    code = "\n".join(g.code for g in explained.graphs)
    n_fff = sum(isinstance(m, FFF) for m in converted.modules())
    assert code.count("fff_infer") == n_fff == 2


def test_inductor_compiled_equals_eager(converted):
    torch._dynamo.reset()
    compiled = torch.compile(_forward(converted), backend="inductor")
    for lengths in ([7, 3, 5], [4, 4]):
        ids, mask = _batch(60, lengths)
        with torch.no_grad():
            eager = _forward(converted)(ids, mask)
            got = compiled(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got[real], eager[real], atol=1e-5, rtol=1e-5)
    # negative control: another model's output differs
    with torch.no_grad():
        assert not torch.allclose(got[real], torch.zeros_like(got[real]), atol=1e-3)


def test_the_opaque_op_follows_weight_changes(converted):
    fff = next(m for m in converted.modules() if isinstance(m, FFF))
    x = torch.randn(5, fff.d_model)
    with torch.no_grad():
        before = torch.ops.ultrafastbert.fff_infer(x, fff.linear_in.weight, fff.linear_in.bias,
                                                   fff.linear_out.weight, fff.n_trees,
                                                   fff.depth, "auto", "fp32")
        torch.testing.assert_close(before, fff(x), atol=1e-6, rtol=1e-6)
        fff.linear_out.weight.mul_(2.0)  # in place: the op's packed copy must be rebuilt
        after = torch.ops.ultrafastbert.fff_infer(x, fff.linear_in.weight, fff.linear_in.bias,
                                                  fff.linear_out.weight, fff.n_trees,
                                                  fff.depth, "auto", "fp32")
        fff.linear_out.weight.div_(2.0)
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)


def test_packed_encoder_traces_in_one_graph(converted):
    from ultrafastbert.infer.fast import fast_encoder
    from ultrafastbert.infer.packing import Packing

    torch._dynamo.reset()
    encoder = fast_encoder(converted, "float32")
    ids, mask = _batch(60, [7, 3, 5])
    packing = Packing.from_mask(mask)
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda i: encoder.hidden(i, packing))(
            packing.pack(ids))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


@pytest.mark.parametrize("native", [True, False])
def test_packed_encoder_compiles_equal_to_eager(converted, native, monkeypatch):
    """Both attention paths (the native op through its custom operator, and PyTorch's) trace in
    one graph and the inductor-compiled packed encoder equals eager."""
    from ultrafastbert.infer import native_attention
    from ultrafastbert.infer.fast import fast_encoder
    from ultrafastbert.infer.packing import Packing

    if not native:
        monkeypatch.setenv(native_attention.ENV_SWITCH, "0")
    elif native_attention.prepare() is not None:
        pytest.skip(f"native attention: {native_attention.prepare()}")
    torch._dynamo.reset()
    encoder = fast_encoder(converted, "float32")
    ids, mask = _batch(60, [7, 3, 5])
    packing = Packing.from_mask(mask)
    run = lambda i: encoder.hidden(i, packing)  # noqa: E731
    with torch.no_grad():
        explained = torch._dynamo.explain(run)(packing.pack(ids))
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
        assert any("native_packed_attention" in op for op in ops) == native, ops
        torch._dynamo.reset()
        got = torch.compile(run, backend="inductor")(packing.pack(ids))
    torch.testing.assert_close(got, run(packing.pack(ids)), atol=1e-5, rtol=1e-5)
