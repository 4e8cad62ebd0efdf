"""torch.compile: no avoidable graph breaks in a training step, compiled forward/backward equal
eager, and the native kernel's operators have fake implementations.

The compiled tests use the ``aot_eager`` backend (Dynamo + AOTAutograd with fake tensors, no
code generation), which keeps them quick on a small CPU; the graph is the one Inductor gets."""

from __future__ import annotations

import pytest
import torch

from modelcheck import mini
from ultrafastbert.fff import dispatch
from ultrafastbert.model import UltraFastBertForMaskedLM

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, model.config.vocab_size, (2, 16), generator=g)
    labels = ids.clone()
    labels[:, ::2] = -100
    return ids, labels


def _model():
    torch.manual_seed(0)  # no dropout: eager and compiled draw their masks differently
    return UltraFastBertForMaskedLM(mini(embedding_dropout=0.0, attention_dropout=0.0,
                                         hidden_dropout=0.0)).train()


def test_training_step_has_only_the_unavoidable_graph_break():
    torch._dynamo.reset()
    model = _model()
    ids, labels = _batch(model)
    explained = torch._dynamo.explain(lambda i, lab: model(i, labels=lab).loss)(ids, labels)
    reasons = [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    frames = [f"{f.filename}:{f.name}" for b in explained.break_reasons for f in b.user_stack]
    assert not any("warnings" in f or "_check_inputs" in f or "_check_labels" in f
                   for f in frames), frames
    # left: the masked positions' indices (nonzero) have a data-dependent size
    assert all("Dynamic shape operator" in r for r in reasons), reasons
    assert explained.graph_break_count <= 1


def test_compiled_forward_and_backward_equal_eager():
    torch._dynamo.reset()
    eager, compiled_model = _model(), _model()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for seed in (0, 1):
        ids, labels = _batch(eager, seed)
        loss = eager(ids, labels=labels).loss
        loss.backward()
        closs = compiled(ids, labels=labels).loss
        closs.backward()
        torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    cgrads = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    assert grads.keys() == cgrads.keys() and any("ffn.linear_in" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(cgrads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_eval_forward_equals_eager():
    torch._dynamo.reset()
    model = _model().eval()
    ids, _ = _batch(model)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_operator_traces_with_its_fake_implementation():
    kernel = dispatch.registry()["native"]
    reason = kernel.unavailable_reason(torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"native kernel unavailable here: {reason}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    w_in, b_in, w_out = torch.randn(15, 32) * 0.2, torch.randn(15) * 0.1, torch.randn(32, 15)
    packed = kernel.pack(w_in, b_in, w_out, 1, 3, "fp32")
    isa = kernel._isa_code

    def run(x):
        y, nodes = torch.ops.ultrafastbert.native_fff_forward(x, packed.w_in, packed.b_in,
                                                              packed.w_out, 1, 3, isa)
        return y * 2.0, nodes

    x = torch.randn(5, 32)
    want_y, want_nodes = kernel.forward(x, packed, 1, 3, return_nodes=True)
    got_y, got_nodes = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got_y, 2.0 * want_y)
    assert torch.equal(got_nodes, want_nodes)
