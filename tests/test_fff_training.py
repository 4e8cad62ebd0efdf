"""Sparse training (visited nodes only) equals the original masked form in value and gradient."""

import pytest
import torch

from fffcheck import inputs, make_layer
from ultrafastbert.fff import fff_masked, fff_sparse, route


def grads(fn, layer, x):
    x = x.clone().requires_grad_()
    params = [layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight]
    y = fn(x, *params, layer.n_trees, layer.depth)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    return [y.detach(), *torch.autograd.grad(loss, [x, *params])]


def far_from_ties(layer, x, margin):
    _, logits = route(x, layer.linear_in.weight, layer.linear_in.bias, layer.n_trees, layer.depth)
    return bool((logits.abs() > margin).all())


@pytest.mark.parametrize("tokens,d_model,n_trees,depth", [
    (1, 37, 1, 0), (13, 37, 3, 3), (13, 37, 3072, 0), (200, 37, 1, 11), (64, 768, 1, 11),
    (50, 37, 16, 7), (7, 5, 4, 9),
])
def test_sparse_equals_masked_in_value_and_gradient(tokens, d_model, n_trees, depth):
    layer = make_layer(d_model, n_trees, depth).double()
    x = inputs(tokens, d_model, dtype=torch.float64)
    assert far_from_ties(layer, x, 1e-9)  # float64: routes cannot flip between the two forms
    sparse, masked = grads(fff_sparse, layer, x), grads(fff_masked, layer, x)
    for name, a, b in zip(["y", "x", "w_in", "b_in", "w_out"], sparse, masked, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


def test_float32_gradients_agree():
    layer = make_layer(768, 1, 11)
    x = inputs(512, 768)
    for a, b in zip(grads(fff_sparse, layer, x), grads(fff_masked, layer, x), strict=True):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())


def test_negative_control_gradient_check_detects_a_dropped_node():
    layer = make_layer(37, 2, 3).double()
    x = inputs(13, 37, dtype=torch.float64)
    nodes, logits = route(x, layer.linear_in.weight, layer.linear_in.bias, 2, 3)
    broken = nodes.clone()
    broken[0, 0, -1] = broken[0, 0, -1] + (1 if broken[0, 0, -1] % 2 else -1)  # sibling leaf
    ok = grads(lambda *a: fff_sparse(*a, routed=(nodes, logits)), layer, x)
    bad = grads(lambda *a: fff_sparse(*a, routed=(broken, logits)), layer, x)
    assert torch.allclose(ok[3], grads(fff_masked, layer, x)[3])
    assert not torch.allclose(bad[3], ok[3])


def test_off_path_parameters_get_exactly_zero_gradient():
    layer = make_layer(16, 2, 4)
    x = inputs(9, 16)
    nodes, _ = route(x, layer.linear_in.weight, layer.linear_in.bias, 2, 4)
    _, _, g_in, g_b, g_out = grads(fff_sparse, layer, x)
    off = torch.ones(layer.n_neurons, dtype=torch.bool)
    off[nodes.flatten()] = False
    assert off.any() and (g_in[off] == 0).all() and (g_b[off] == 0).all()
    assert (g_out[:, off] == 0).all() and (g_in[~off] != 0).any()


def test_gradcheck_all_inputs():
    layer = make_layer(6, 2, 2).double()
    x = inputs(4, 6, dtype=torch.float64)
    assert far_from_ties(layer, x, 1e-3)  # finite differences (eps 1e-6) cannot flip a route
    args = [t.detach().clone().requires_grad_() for t in
            (x, layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight)]
    assert torch.autograd.gradcheck(lambda *a: fff_sparse(*a, 2, 2), args)


def test_layer_uses_sparse_path_when_training(monkeypatch):
    from ultrafastbert.fff.pytorch import kernel as layer_module  # the kernel owns the path now

    calls = []
    real = layer_module.fff_sparse
    monkeypatch.setattr(layer_module, "fff_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = make_layer(37, 1, 5).train()
    layer.set_runtime(training="torch")  # "auto" may pick the native kernel (test_native_train)
    x = inputs(11, 37).requires_grad_()
    y = layer(x)
    assert calls and y.grad_fn is not None
    with torch.no_grad():
        layer(x)  # no autograd: the inference kernel, not the training path
    assert len(calls) == 1
    y.sum().backward()
    assert x.grad is not None and layer.linear_out.weight.grad is not None
