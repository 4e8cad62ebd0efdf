"""The vectorised PyTorch kernel against the reference: routes first, then values."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fffcheck import assert_matches, compare, inputs, make_layer, perturb_visited_row, reference_of
from ultrafastbert.fff.pytorch import sparse

SHAPES = [  # (tokens, d_model, n_trees, depth)
    (1, 37, 1, 0), (13, 37, 1, 1), (13, 37, 3, 3), (1000, 37, 2, 11), (1, 768, 1, 11),
    (13, 768, 1, 11), (1200, 768, 1, 11), (13, 37, 3072, 0), (50, 37, 16, 7), (13, 768, 8, 8),
]


def run_torch(layer, x, weight_format="fp32"):
    layer.set_runtime("torch", weight_format)
    with torch.no_grad():
        return layer.forward_with_nodes(x)


@pytest.mark.parametrize("tokens,d_model,n_trees,depth", SHAPES)
def test_torch_kernel_matches_reference(tokens, d_model, n_trees, depth):
    layer = make_layer(d_model, n_trees, depth)
    x = inputs(tokens, d_model)
    y, nodes = run_torch(layer, x)
    assert y.shape == x.shape and nodes.shape == (tokens, n_trees, depth + 1)
    assert_matches(y, nodes, reference_of(layer, x), margin=1e-5, atol=1e-5)


def test_negative_control_detects_a_wrong_output_row():
    layer = make_layer(37, 2, 3)
    x = inputs(13, 37)
    ref = reference_of(layer, x)
    perturb_visited_row(layer, int(ref.nodes[0, 0, 2]))
    y, nodes = run_torch(layer, x)
    with pytest.raises(AssertionError, match="values differ"):
        assert_matches(y, nodes, ref, margin=1e-5)


def test_negative_control_detects_a_wrong_route():
    layer = make_layer(37, 1, 4)
    x = inputs(13, 37)
    ref = reference_of(layer, x)
    with torch.no_grad():
        layer.linear_in.bias[0] += 100.0  # every token now goes right at the root
    y, nodes = run_torch(layer, x)
    assert compare(y, nodes, ref, 1e-5).route_mismatches > 0
    with pytest.raises(AssertionError, match="route differently"):
        assert_matches(y, nodes, ref, margin=1e-5)


def test_exact_zero_tie_goes_left_in_every_level_mode():
    for depth in (2, 5):  # depth 5 reaches the sparse (sampled) levels
        layer = make_layer(16, 2, depth)
        with torch.no_grad():
            layer.linear_in.weight.zero_()
            layer.linear_in.bias.zero_()
        _, nodes = run_torch(layer, inputs(5, 16))
        local = nodes - torch.arange(2).view(1, 2, 1) * (2 ** (depth + 1) - 1)
        assert (local == torch.tensor([2**level - 1 for level in range(depth + 1)])).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_follow_the_low_precision_rule(dtype):
    layer = make_layer(37, 2, 3, weight_std=0.2, bias_std=0.5, dtype=dtype)
    x = inputs(200, 37, dtype=dtype)
    y, nodes = run_torch(layer, x)
    ref = reference_of(layer, x)
    if dtype == torch.float64:
        assert_matches(y, nodes, ref, margin=1e-12, atol=1e-12)
    else:  # rows with a path logit near 0 may route differently: excluded and counted
        c = assert_matches(y, nodes, ref, margin=0.03, atol=3e-2, max_excluded_frac=0.5)
        assert c.excluded < c.rows


def test_gather_fallback_chunks_cover_every_token(monkeypatch):
    monkeypatch.setattr(sparse, "GATHER_ELEMENTS", 37 * 12 * 3)
    layer = make_layer(37, 1, 11, weight_std=0.2, bias_std=0.5, dtype=torch.bfloat16)
    x = inputs(20, 37, dtype=torch.bfloat16)
    y, nodes = run_torch(layer, x)
    assert_matches(y, nodes, reference_of(layer, x), margin=0.03, atol=3e-2,
                   max_excluded_frac=0.5)


@pytest.mark.parametrize("weight_format", ["bf16", "bf16-out"])
def test_bf16_weight_formats(weight_format):
    layer = make_layer(64, 2, 6)
    x = inputs(300, 64)
    y, nodes = run_torch(layer, x, weight_format)
    y32, nodes32 = run_torch(layer, x, "fp32")
    if weight_format == "bf16-out":
        assert torch.equal(nodes, nodes32)  # routing weights stay fp32: identical routes
    same = (nodes == nodes32).flatten(1).all(1)
    assert same.float().mean() > 0.8
    rel = (y[same] - y32[same]).abs().max() / y32.abs().max()
    assert 0 < rel < 2e-2  # rounding happened, and stayed small


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), d_model=st.integers(1, 40), n_trees=st.integers(1, 5),
       depth=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_property_any_shape_matches_reference(tokens, d_model, n_trees, depth, seed):
    layer = make_layer(d_model, n_trees, depth, seed=seed)
    x = inputs(tokens, d_model, seed=seed + 1)
    y, nodes = run_torch(layer, x)
    assert_matches(y, nodes, reference_of(layer, x), margin=1e-5, atol=1e-5,
                   max_excluded_frac=1.0)
