"""Whole-model bfloat16 inference (docs/precision.md): ``set_precision(torch.bfloat16)`` runs the
attention/projection GEMMs on prepacked bf16 oneDNN weights and every FFF block in the native bf16
kernel, and stays within a bf16 tolerance of the fp32 model (each step against the float64
reference, rows near a routing boundary left out and counted)."""

from __future__ import annotations

import pytest
import torch

from test_model_encoder import build, ids_and_mask
from ultrafastbert.fff import FFF
from ultrafastbert.fff.native.kernel import NativeBF16Kernel
from ultrafastbert.model import ModelConfig
from ultrafastbert.model.linear import InferenceLinear
from ultrafastbert.model.reference import compare_layerwise

CPU = torch.device("cpu")


def _native_bf16_or_skip() -> None:
    from ultrafastbert.fff.native import build as native_build

    reason = NativeBF16Kernel().unavailable_reason(CPU, torch.bfloat16)
    if reason is not None:
        if native_build.toolchain_reason() is None and native_build.cpu_isa() is not None:
            pytest.fail(f"the native bf16 kernel should run here but: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def models():
    """The tiny FFF model in fp32 and a bf16 copy, and inputs with padding."""
    _native_bf16_or_skip()
    fp32 = build(ModelConfig.from_preset("tiny-fff"))
    for module in fp32.modules():  # non-zero biases, so bias handling is exercised
        if isinstance(module, FFF):
            with torch.no_grad():
                module.linear_in.bias.normal_(0, 0.1)
    low = build(ModelConfig.from_preset("tiny-fff"))
    low.load_state_dict(fp32.state_dict())
    low.set_precision(torch.bfloat16)
    ids, mask = ids_and_mask(3, 24, 8192, lengths=[24, 13, 1], seed=3)
    return fp32, low, ids, mask


def test_bf16_model_runs_bf16_kernels(models):
    _, low, ids, mask = models
    with torch.no_grad():
        out = low(ids, mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    ffs = [m for m in low.modules() if isinstance(m, FFF)]
    assert ffs and all(f.linear_in.weight.dtype == torch.bfloat16 for f in ffs)
    assert all(f.kernel().name == "native-bf16" for f in ffs)
    linears = [m for m in low.modules() if isinstance(m, InferenceLinear)]
    assert linears and all(m._packed is not None and m._packed.dtype == torch.bfloat16
                           for m in linears)


def _relative_error(model, fp32, ids, mask) -> float:
    """``|y - y_fp32| / |y_fp32|`` over the real tokens' final hidden states."""
    with torch.no_grad():
        full = fp32(ids, mask).last_hidden_state
        half = model(ids, mask).last_hidden_state
    real = mask.bool()
    return float((half.float() - full)[real].norm() / full[real].norm())


def test_bf16_model_matches_fp32_within_tolerance(models):
    fp32, low, ids, mask = models
    err = _relative_error(low, fp32, ids, mask)
    assert 0 < err < 0.02, err
    # Each step against the float64 reference fed the same input; with bf16 activations a
    # logit moves by ~1e-3 of its scale, so rows with a path logit within 3e-3 are left out.
    report = compare_layerwise(low, ids, mask, margin=3e-3)
    assert report.ok(tolerance=6e-2), report
    assert report.rows_excluded <= 0.1 * (report.rows_compared + report.rows_excluded), report


def test_tolerance_check_can_fail(models):
    """Negative control: the layerwise check catches the bf16 kernel's packed output rows of
    one layer scaled by 3 (the reference reads the parameters, the fast path its packed copy)."""
    _, low, ids, mask = models
    broken = build(ModelConfig.from_preset("tiny-fff"))
    broken.load_state_dict(low.state_dict())
    broken.set_precision(torch.bfloat16)
    with torch.no_grad():
        broken(ids, mask)  # builds the packed copies
        kernel, packed, _ = broken.layers[1].ffn._cache.value
        assert kernel.name == "native-bf16"
        packed.w_out.mul_(3)
    report = compare_layerwise(broken, ids, mask, margin=3e-3)
    assert not report.ok(tolerance=6e-2), report


def test_converted_model_in_bf16(tmp_path):
    """A converted model's ``set_precision(bf16)``: its FFF blocks run the bf16 kernel and the
    embedding stays within a bf16 tolerance of fp32."""
    _native_bf16_or_skip()
    from convertcheck import tiny_bert
    from ultrafastbert.convert.source import load_source, make_student, parse_fff
    from ultrafastbert.model.converted import fff_blocks

    src = load_source(tiny_bert(tmp_path / "bert"))
    student = make_student(src, parse_fff("2x3", src.n_layers)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask).last_hidden_state
        student.set_precision(torch.bfloat16)
        half = student(input_ids=ids, attention_mask=mask).last_hidden_state
    assert half.dtype == torch.bfloat16
    assert all(b.fff.kernel().name == "native-bf16" for b in fff_blocks(student))
    real = mask.bool()
    rel = (half.float() - full)[real].norm() / full[real].norm()
    assert 0 < rel < 0.03
