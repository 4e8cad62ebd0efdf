"""One place picks the kernel; explicit requests that cannot run are errors."""

import pytest
import torch

from ultrafastbert.fff import dispatch
from ultrafastbert.fff.kernel import FFFKernel


def test_every_kernel_declares_itself():
    for name, kernel in dispatch.registry().items():
        assert isinstance(kernel, FFFKernel) and kernel.name == name and kernel.devices
        assert kernel.description and kernel.dtypes


def test_explain_gives_a_reason_for_each_refusal():
    reasons = dict(dispatch.explain("cpu", torch.float32))
    assert reasons["torch"] is None
    assert "cuda" in reasons["triton"]
    int_reasons = dict(dispatch.explain("cpu", torch.int32))
    assert all(r is not None for r in int_reasons.values())
    assert "int32" in int_reasons["torch"]


def test_auto_picks_the_first_available_in_priority_order():
    names = list(dispatch.registry())
    available = [n for n, r in dispatch.explain("cpu", torch.float32) if r is None]
    assert dispatch.select("auto", "cpu", torch.float32).name == available[0]
    assert names.index(available[0]) == min(names.index(n) for n in available)


def test_named_kernel_that_cannot_run_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="'triton' cannot run on cpu"):
        dispatch.select("triton", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown FFF implementation"):
        dispatch.select("fastest", "cpu", torch.float32)
    with pytest.raises(ValueError, match="weight_format"):
        dispatch.select("torch", "cpu", torch.float32, "fp8")


def test_no_kernel_for_integer_inputs_lists_every_reason():
    with pytest.raises(ValueError, match="no FFF implementation can run") as info:
        dispatch.select("auto", "cpu", torch.int64)
    for name in dispatch.registry():
        assert name in str(info.value)


def test_describe_is_a_table_with_every_kernel():
    text = dispatch.describe("cpu")
    assert all(name in text for name in dispatch.registry()) and "available" in text
