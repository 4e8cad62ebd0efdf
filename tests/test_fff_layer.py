"""The FFF module: checkpoint names, init, input handling, packed-copy invalidation."""

import math

import pytest
import torch

from fffcheck import assert_matches, inputs, make_layer, reference_of
from ultrafastbert import FFF


def test_state_dict_uses_released_names_and_shapes():
    layer = FFF(768, n_trees=1, depth=11)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"linear_in.weight": (4095, 768), "linear_in.bias": (4095,),
                      "linear_out.weight": (768, 4095)}
    assert "linear_in.bias" not in FFF(8, n_trees=2, depth=1, bias=False).state_dict()


def test_init_is_normal_002_with_zero_bias():
    layer = FFF(768, n_trees=1, depth=11)
    for w in (layer.linear_in.weight, layer.linear_out.weight):
        assert abs(w.std().item() - 0.02) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert (layer.linear_in.bias == 0).all()


def test_loads_a_state_dict_in_the_original_layout():
    torch.manual_seed(3)
    original = {"linear_in.weight": torch.randn(2 * 7, 10) * 0.3,
                "linear_in.bias": torch.randn(14) * 0.3,
                "linear_out.weight": torch.randn(10, 14) * 0.3}
    layer = FFF(10, n_trees=2, depth=2).eval()
    layer.load_state_dict(original)
    x = inputs(40, 10)
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
    ref = reference_of(layer, x)
    assert torch.equal(ref.y, __import__("ultrafastbert").fff_reference(
        x, original["linear_in.weight"], original["linear_in.bias"],
        original["linear_out.weight"], 2, 2).y)
    assert_matches(y, nodes, ref, margin=1e-5)


def test_packed_copy_follows_weight_changes():
    layer = make_layer(32, 1, 6)
    x = inputs(20, 32)
    with torch.no_grad():
        before = layer(x)
        layer.linear_out.weight.mul_(2.0)  # in place, as an optimizer step would
        after = layer(x)
    assert torch.allclose(after, 2 * before, atol=1e-6)
    layer.load_state_dict({k: v * 0 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        assert (layer(x) == 0).all()


def test_optimizer_step_then_eval_uses_new_weights():
    layer = make_layer(16, 2, 3).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = inputs(8, 16)
    layer.eval()
    with torch.no_grad():
        layer(x)  # builds a packed copy
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
    assert_matches(y, nodes, reference_of(layer, x), margin=1e-5)


def test_leading_dimensions_are_preserved():
    layer = make_layer(12, 2, 2)
    x = inputs(2 * 3 * 5, 12).view(2, 3, 5, 12)
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
        assert torch.equal(y.reshape(-1, 12), layer(x.reshape(-1, 12)))
    assert y.shape == x.shape and nodes.shape == (2, 3, 5, 2, 3)


def test_non_contiguous_input_gives_the_same_result():
    layer = make_layer(12, 1, 3)
    x = inputs(12, 20)[:, :12]  # strided view
    assert not x.is_contiguous()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.contiguous()))


def test_zero_size_input_gives_zero_size_output():
    layer = make_layer(12, 1, 3)
    for shape in [(0, 12), (3, 0, 12)]:
        y, nodes = layer.forward_with_nodes(torch.empty(shape))
        assert y.shape == shape and nodes.shape == (*shape[:-1], 1, 4)


def test_nan_rows_give_nan_outputs_and_route_left_without_touching_other_rows():
    layer = make_layer(12, 1, 3)
    x = inputs(4, 12)
    x[1, 5] = math.nan
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any()
    assert nodes[1, 0].tolist() == [0, 1, 3, 7]  # NaN > 0 is false: always left


@pytest.mark.parametrize("bad,error,match", [
    (torch.zeros(3, 11), ValueError, "last dimension must be d_model=12"),
    (torch.zeros(3, 12, dtype=torch.long), TypeError, "floating-point"),
    (torch.zeros(3, 12, dtype=torch.float64), TypeError, "differs from the layer"),
    (torch.tensor(1.0), ValueError, "last dimension"),
    ([1.0] * 12, TypeError, "torch.Tensor"),
    (torch.zeros(3, 12, device="meta"), ValueError, "is on meta"),
])
def test_bad_inputs_get_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        make_layer(12, 1, 3)(bad)


def test_bad_construction_and_runtime_errors():
    with pytest.raises(ValueError, match="d_model"):
        FFF(0, n_trees=1, depth=1)
    with pytest.raises(ValueError, match="weight_format"):
        make_layer(8, 1, 1).set_runtime("auto", "int4")
    with pytest.raises(ValueError, match="unknown FFF implementation 'no-such-kernel'"):
        make_layer(8, 1, 1).set_runtime("no-such-kernel")


def test_autocast_bf16_computes_in_the_layer_dtype_forward_and_backward():
    layer = make_layer(16, 1, 4).train()
    x = inputs(6, 16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert layer.linear_in.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        assert torch.allclose(y, layer(x.to(torch.bfloat16).float()), atol=1e-6)


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    from ultrafastbert.utils.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "hi")
    mode = os.stat(tmp_path / "a.txt").st_mode & 0o777
    assert mode & 0o044  # readable by group/others under the usual umask


def test_repeat_inference_shortcut_notices_every_change():
    layer = make_layer(16, 2, 3)
    x = inputs(5, 16)
    with torch.no_grad():
        first = layer(x)
        assert layer._repeat_inference(x) is not None  # the shortcut is live
        layer.linear_in.weight = torch.nn.Parameter(torch.randn_like(layer.linear_in.weight))
        assert layer._repeat_inference(x) is None  # replaced parameter: general path
        y, nodes = layer.forward_with_nodes(x)
        assert_matches(y, nodes, reference_of(layer, x), margin=1e-5)
        assert torch.equal(layer(x), y) and not torch.equal(y, first)
        layer.linear_in.bias.add_(1.0)  # in-place change
        assert layer._repeat_inference(x) is None
        assert layer._repeat_inference(x.to(torch.float64)) is None
        assert layer._repeat_inference(x.t().contiguous().t()) is None  # non-contiguous
    assert layer._repeat_inference(x) is None  # grad enabled
