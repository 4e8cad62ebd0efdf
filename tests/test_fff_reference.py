"""The reference against an independent scalar implementation, and its defining properties."""

import math

import torch

from fffcheck import make_layer, reference_of


def scalar_fff(x, w_in, b_in, w_out, n_trees, depth):
    """Pure-Python evaluation of one token (lists of floats), written from docs/design.md §1.1."""
    n = 2 ** (depth + 1) - 1
    d = len(x)
    y = [0.0] * d
    for tree in range(n_trees):
        local = 0
        for _ in range(depth + 1):
            node = tree * n + local
            logit = sum(x[i] * w_in[node][i] for i in range(d)) + b_in[node]
            act = 0.5 * logit * (1.0 + math.erf(logit / math.sqrt(2.0)))
            for i in range(d):
                y[i] += act * w_out[i][node]
            local = 2 * local + (2 if logit > 0 else 1)
    return y


def test_reference_equals_scalar_definition():
    layer = make_layer(9, 3, 2)
    x = torch.randn(5, 9)
    ref = reference_of(layer, x)
    for t in range(5):
        expected = scalar_fff(x[t].tolist(), layer.linear_in.weight.tolist(),
                              layer.linear_in.bias.tolist(), layer.linear_out.weight.tolist(), 3, 2)
        assert torch.allclose(ref.y[t].double(), torch.tensor(expected, dtype=torch.float64),
                              atol=1e-6)


def test_negative_control_scalar_check_detects_a_wrong_rule():
    layer = make_layer(9, 1, 3)
    x = torch.randn(4, 9)
    ref = reference_of(layer, x)
    with torch.no_grad():  # flipping the routing bias of the root changes the paths
        layer.linear_in.bias[0] = -1e3 if ref.nodes[0, 0, 1] == 2 else 1e3
    moved = reference_of(layer, x)
    assert not torch.equal(moved.nodes[0], ref.nodes[0])


def test_exact_zero_logit_goes_left():
    layer = make_layer(4, 1, 2)
    with torch.no_grad():
        layer.linear_in.weight[0].zero_()
        layer.linear_in.bias[0] = 0.0
    ref = reference_of(layer, torch.randn(3, 4))
    assert (ref.logits[:, 0, 0] == 0).all()
    assert (ref.nodes[:, 0, 1] == 1).all()


def test_off_path_weights_do_not_change_the_output():
    layer = make_layer(8, 2, 3)
    x = torch.randn(6, 8)
    ref = reference_of(layer, x)
    off = torch.ones(layer.n_neurons, dtype=torch.bool)
    off[ref.nodes.flatten()] = False
    with torch.no_grad():
        layer.linear_in.weight[off] = torch.randn_like(layer.linear_in.weight[off])
        layer.linear_out.weight[:, off] = 7.0
        layer.linear_in.bias[off] = 3.0
    again = reference_of(layer, x)
    assert torch.equal(again.nodes, ref.nodes) and torch.equal(again.y, ref.y)
    with torch.no_grad():  # negative control: an on-path output row does change it
        layer.linear_out.weight[:, ref.nodes[0, 0, -1]] += 1.0
    assert not torch.equal(reference_of(layer, x).y, ref.y)


def test_depth_zero_is_a_plain_gelu_ff():
    layer = make_layer(7, 5, 0)
    x = torch.randn(4, 7)
    dense = torch.nn.functional.gelu(x.double() @ layer.linear_in.weight.double().T
                                     + layer.linear_in.bias.double()) @ layer.linear_out.weight.double().T
    assert torch.allclose(reference_of(layer, x).y.double(), dense.to(torch.float32).double(),
                          atol=1e-6)
