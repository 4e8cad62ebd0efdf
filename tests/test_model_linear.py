"""``InferenceLinear``: the oneDNN-prepacked inference path equals ``nn.Linear`` and its cache
follows every change of the parameters."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelcheck import mini
from ultrafastbert.model import DenseFF, UltraFastBertModel
from ultrafastbert.model.linear import (
    ENV_SWITCH,
    InferenceLinear,
    packed_linear_unavailable,
    use_packed_linears,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(packed_linear_unavailable(CPU, torch.float32) is not None,
                                reason=str(packed_linear_unavailable(CPU, torch.float32)))
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def layer(bias: bool = True, dtype: torch.dtype = torch.float32) -> InferenceLinear:
    torch.manual_seed(0)
    return InferenceLinear(48, 80, bias=bias, dtype=dtype).eval()


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return False
    if b.numel() == 0:
        return True
    return float((a - b).abs().max()) <= TOL[dtype] * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (1, 48), (0, 48)])
def test_packed_path_equals_linear(dtype, bias, shape):
    lin = layer(bias, dtype)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        y = lin(x)
    assert lin._packed is not None, "the packed path was not taken"
    assert y.shape == (*shape[:-1], 80) and y.dtype == dtype
    assert close(y, F.linear(x, lin.weight, lin.bias), dtype)


def test_non_contiguous_input_under_no_grad():
    lin = layer()
    x = torch.randn(5, 3, 48).transpose(0, 1)
    with torch.no_grad():
        y = lin(x)
    assert lin._packed is not None
    assert close(y, F.linear(x, lin.weight, lin.bias), torch.float32)


def test_training_and_autograd_use_plain_linear():
    lin = layer()
    x = torch.randn(4, 48, requires_grad=True)
    lin(x).sum().backward()  # eval mode, grad enabled: plain path, gradients flow
    assert lin._packed is None and lin.weight.grad is not None and x.grad is not None
    lin.train()
    with torch.no_grad():
        lin(x)
    assert lin._packed is None, "training mode must not pack"


def test_float64_falls_back_with_a_reason():
    lin = layer(dtype=torch.float64)
    x = torch.randn(3, 48, dtype=torch.float64)
    with torch.inference_mode():
        y = lin(x)
    assert lin._packed is None
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert "float64" in packed_linear_unavailable(CPU, torch.float64)
    assert "CPU" in packed_linear_unavailable(torch.device("meta"), torch.float32)


def test_cache_follows_in_place_updates_and_replacement():
    lin = layer()
    x = torch.randn(6, 48)
    with torch.no_grad():
        lin(x)
        lin.weight.mul_(-2.0)  # in place: bumps the version
        assert close(lin(x), F.linear(x, lin.weight, lin.bias), torch.float32)
        lin.bias = nn.Parameter(torch.randn(80))  # replaced tensor
        assert close(lin(x), F.linear(x, lin.weight, lin.bias), torch.float32)
        lin.load_state_dict({"weight": torch.randn(80, 48), "bias": torch.zeros(80)})
        assert close(lin(x), F.linear(x, lin.weight, lin.bias), torch.float32)
        lin.to(torch.bfloat16)
        xb = x.bfloat16()
        assert close(lin(xb), F.linear(xb, lin.weight, lin.bias), torch.bfloat16)


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_env_switch_turns_packing_off(monkeypatch, value):
    monkeypatch.setenv(ENV_SWITCH, value)
    lin = layer()
    x = torch.randn(2, 48)
    with torch.inference_mode():
        y = lin(x)
    assert lin._packed is None and torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert ENV_SWITCH in packed_linear_unavailable(CPU, torch.float32)


def test_copy_pickle_and_save_leave_the_packed_copy_out():
    lin = layer()
    x = torch.randn(2, 48)
    with torch.inference_mode():
        expected = lin(x)
    assert lin._packed is not None
    assert set(lin.state_dict()) == {"weight", "bias"}
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert clone._packed is None
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)
    assert lin._packed is not None, "copying must not drop the original's cache"
    buffer = io.BytesIO()
    torch.save(lin, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._packed is None


def test_use_packed_linears_shares_parameters():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 4))).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
    weight = model[0].weight
    assert use_packed_linears(model) == 2
    assert isinstance(model[0], InferenceLinear) and isinstance(model[2][0], InferenceLinear)
    assert model[0].weight is weight
    with torch.inference_mode():
        assert close(model(x), expected, torch.float32)
    assert model[0]._packed is not None and use_packed_linears(model) == 0


def test_encoder_uses_packed_attention_and_dense_ff():
    config = mini(n_layers=1, max_seq_len=8, embedding_dropout=0.0, attention_dropout=0.0,
                  hidden_dropout=0.0, ff=DenseFF(64))
    model = UltraFastBertModel(config).eval()
    linears = [m for m in model.modules() if isinstance(m, InferenceLinear)]
    assert len(linears) == 4  # query_key_value, dense, linear_in, linear_out
    ids = torch.randint(0, 64, (2, 8))
    with torch.inference_mode():
        fast = model(ids).last_hidden_state
    assert all(m._packed is not None for m in linears)
    with torch.no_grad():
        model.train()  # no dropout in this config: the same function on the plain path
        plain = model(ids).last_hidden_state
    assert all(m._packed is None for m in linears)
    assert close(fast, plain, torch.float32)


def test_eval_with_autograd_logs_the_fast_path_hint_once(caplog):
    config = mini(n_layers=1, max_seq_len=8)
    model = UltraFastBertModel(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    with caplog.at_level("INFO", logger="ultrafastbert.model.encoder"):
        with torch.inference_mode():
            model(ids)
        assert "inference_mode" not in caplog.text
        model(ids)
        model(ids)
    assert caplog.text.count("eval mode with autograd on") == 1
