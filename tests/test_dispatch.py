"""One place picks the kernel; explicit requests that cannot run are errors."""

import json

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
    section = dispatch.describe("cpu", training=False).splitlines()
    status_columns = {line.index(" available") if " available" in line
                      else line.index(" unavailable") for line in section}
    assert len(section) == len(dispatch.registry()) and len(status_columns) == 1  # aligned


# ------------------------------------------------------------------ choices by shape, reasons

from ultrafastbert.fff.dispatch import Workload  # noqa: E402
from ultrafastbert.fff.native import build  # noqa: E402
from ultrafastbert.fff.reference import fff_reference  # noqa: E402
from ultrafastbert.fff.token_split import TokenSplit  # noqa: E402


def native_runs() -> bool:
    return dict(dispatch.explain("cpu", torch.float32))["native"] is None


needs_native = pytest.mark.skipif(not native_runs(), reason="native kernel unavailable here")


@needs_native
@pytest.mark.parametrize(("n_trees", "depth", "d"), [(1, 11, 768), (8, 7, 384), (32, 5, 384),
                                                     (4, 8, 384), (1, 10, 384), (2, 0, 384),
                                                     (63, 0, 37)])
def test_native_is_chosen_for_trees_at_every_token_count(n_trees, depth, d):
    shape = Workload(n_trees, depth, d)
    (choice,) = dispatch.plan("cpu", torch.float32, "fp32", shape)
    assert choice.kernel == "native" and choice.covers(1) and choice.covers(10**6)
    assert choice.reason.startswith(f"native: chosen for {n_trees}x{depth}")
    assert "faster than the torch path" in choice.reason
    assert dispatch.select("auto", "cpu", torch.float32, shape=shape).name == "native"


@needs_native
def test_depth_zero_takes_the_gemm_route_from_the_threshold():
    shape = Workload(3072, 0, 768)
    small, large = dispatch.plan("cpu", torch.float32, "fp32", shape)
    assert (small.kernel, small.min_tokens, small.max_tokens) == (
        "native", 1, dispatch.GEMM_MIN_TOKENS - 1)
    assert (large.kernel, large.min_tokens, large.max_tokens) == (
        "gemm", dispatch.GEMM_MIN_TOKENS, None)
    assert "gemm: chosen for 3072x0 at >=16 tokens" in large.reason
    assert "below 16 tokens" in small.reason
    # With a known token count there is one choice, and select returns that kernel.
    at = Workload(3072, 0, 768, tokens=512)
    (only,) = dispatch.plan("cpu", torch.float32, "fp32", at)
    assert only.kernel == "gemm" and dispatch.select("auto", "cpu", torch.float32,
                                                     shape=at).name == "gemm"
    assert dispatch.select("auto", "cpu", torch.float32,
                           shape=Workload(3072, 0, 768, tokens=1)).name == "native"


@needs_native
def test_token_split_routes_each_call_and_matches_the_reference():
    kernel = dispatch.select("auto", "cpu", torch.float32, shape=Workload(64, 0, 37))
    assert isinstance(kernel, TokenSplit) and kernel.name.startswith("auto(native")
    assert kernel.kernel_for(1).name == "native" and kernel.kernel_for(16).name == "gemm"
    gen = torch.Generator().manual_seed(0)
    w_in, b_in, w_out = (torch.randn(64, 37, generator=gen) * 0.2,
                         torch.randn(64, generator=gen) * 0.1, torch.randn(37, 64, generator=gen))
    packed = kernel.pack(w_in, b_in, w_out, 64, 0, "fp32")
    for tokens in (1, 15, 16, 40):
        x = torch.randn(tokens, 37, generator=gen)
        ref = fff_reference(x, w_in, b_in, w_out, 64, 0)
        y, nodes = kernel.forward(x, packed, 64, 0, return_nodes=True)
        torch.testing.assert_close(y, ref.y, rtol=1e-4, atol=1e-5)
        assert torch.equal(nodes, ref.nodes)


@needs_native
def test_the_layer_asks_with_its_shape():
    from ultrafastbert import FFF

    assert FFF(37, n_trees=2, depth=3).kernel().name == "native"
    deep0 = FFF(37, n_trees=64, depth=0)
    assert isinstance(deep0.kernel(), TokenSplit)
    x = torch.randn(3, 20, 37)
    with torch.no_grad():
        y = deep0(x)
    ref = fff_reference(x.reshape(-1, 37), deep0.linear_in.weight, deep0.linear_in.bias,
                        deep0.linear_out.weight, 64, 0)
    torch.testing.assert_close(y.reshape(-1, 37), ref.y, rtol=1e-4, atol=1e-5)


def test_explicit_gemm_for_a_deep_tree_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="'gemm' cannot run 8x7 .*depth-0"):
        dispatch.select("gemm", "cpu", torch.float32, shape=Workload(8, 7, 384))
    reasons = dict(dispatch.explain("cpu", torch.float32, shape=Workload(8, 7, 384)))
    assert "depth-0" in reasons["gemm"] and reasons["torch"] is None
    assert dispatch.select("gemm", "cpu", torch.float32, shape=Workload(8, 0, 384)).name == "gemm"
    # Without a shape it cannot tell, so it is not offered (bench ff's list of runnable kernels).
    assert "shape is needed" in dict(dispatch.explain("cpu", torch.float32))["gemm"]
    with pytest.raises(ValueError, match="'gemm' cannot run on cpu"):
        dispatch.select("gemm", "cpu", torch.float32)
    # An explicitly named kernel runs even where the cost rule would choose another.
    assert dispatch.select("torch", "cpu", torch.float32,
                           shape=Workload(1, 11, 768)).name == "torch"


@pytest.fixture
def native_off(monkeypatch):
    monkeypatch.setenv("ULTRAFASTBERT_NATIVE", "0")
    build.reset()
    dispatch.registry()["native"]._library = None  # forget the loaded library's shortcut
    yield
    monkeypatch.delenv("ULTRAFASTBERT_NATIVE")
    build.reset()


def test_without_native_torch_walks_and_gemm_serves_wide_depth_zero(native_off):
    (choice,) = dispatch.plan("cpu", torch.float32, "fp32", Workload(32, 5, 384))
    assert choice.kernel == "torch" and "native kernel cannot run" in choice.reason
    assert "ULTRAFASTBERT_NATIVE" in choice.reason
    (choice,) = dispatch.plan("cpu", torch.float32, "fp32", Workload(512, 0, 384))
    assert choice.kernel == "gemm" and choice.covers(1)


def test_other_devices_keep_the_priority_order():
    (choice,) = dispatch.plan("cpu", torch.float64, "fp32", Workload(8, 7, 384))
    assert choice.kernel == "torch"  # native serves float32 only
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no FFF implementation can run 8x7"):
            dispatch.plan("cuda", torch.float32, "fp32", Workload(8, 7, 384))


def test_describe_gives_the_reason_for_each_choice():
    text = dispatch.describe("cpu", shape=Workload(3072, 0, 768))
    assert "auto for 3072x0 at d=768:" in text and "gemm: chosen for 3072x0" in text
    assert "training:" in text and text.count("auto for") == 2  # inference and training
    assert "first that can train 3072x0" in text.split("training:")[1]  # measuring is off here


def test_bfloat16_keeps_the_priority_order_of_its_walkers():
    (choice,) = dispatch.plan("cpu", torch.bfloat16, "fp32", Workload(8, 7, 384))
    reasons = dict(dispatch.explain("cpu", torch.bfloat16))
    expected = "native-bf16" if reasons.get("native-bf16") is None else "torch"
    assert choice.kernel == expected and "float32" in choice.reason


# ------------------------------------------------------------------ measured choices (autotune on)

@pytest.fixture
def measured(tmp_path, monkeypatch):
    """``"auto"`` measures (ULTRAFASTBERT_AUTOTUNE on) with a private cache and small counts."""
    from ultrafastbert.fff.native import tuning

    if native_runs():
        build.load()  # from the usual cache, before the cache root moves to tmp_path
    monkeypatch.delenv("ULTRAFASTBERT_AUTOTUNE", raising=False)
    monkeypatch.setenv("ULTRAFASTBERT_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "MEASURED_TOKENS", (1, 4, 32))
    tuning._MEMO.clear()
    yield tuning
    tuning._MEMO.clear()


def test_choices_follow_the_timings_by_token_range():
    shape = Workload(64, 0, 384)
    timings = {"tokens": [1, 16, 128, 1024],
               "us_per_token": {"native": [1.0, 0.5, 0.4, 0.4], "torch": [9.0, 2.0, 0.5, 0.3],
                                "gemm": [5.0, 0.4, 0.2, 0.35]}}
    choices = dispatch.choices_from_timings(timings, shape)
    assert [(c.kernel, c.min_tokens, c.max_tokens) for c in choices] == [
        ("native", 1, 15), ("gemm", 16, 1023), ("torch", 1024, None)]
    assert "measured fastest on this CPU for 64x0 at d=384 at 16/128 tokens" in choices[1].reason
    assert "gemm 0.4" in choices[1].reason and "native 0.5" in choices[1].reason
    # negative control: one kernel fastest everywhere gives one choice for every count
    flat = {**timings, "us_per_token": {"native": [1, 1, 1, 1], "gemm": [2, 2, 2, 2]}}
    (only,) = dispatch.choices_from_timings(flat, shape)
    assert (only.kernel, only.min_tokens, only.max_tokens) == ("native", 1, None)


@needs_native
def test_measured_plan_times_every_runnable_kernel_once_and_caches_it(measured, monkeypatch):
    calls = []
    real = dispatch.time_kernels

    def counted(names, shape, dtype, weight_format):
        calls.append(tuple(names))
        return real(names, shape, dtype, weight_format)

    monkeypatch.setattr(dispatch, "time_kernels", counted)
    shape = Workload(64, 0, 37)
    first = dispatch.plan("cpu", torch.float32, "fp32", shape)
    assert calls == [("native", "torch", "gemm")]
    assert all("measured fastest on this CPU" in c.reason for c in first)
    assert first[0].min_tokens == 1 and first[-1].max_tokens is None
    measured._MEMO.clear()  # a new process: read from the cache file, not measured again
    again = dispatch.plan("cpu", torch.float32, "fp32", shape)
    assert calls == [("native", "torch", "gemm")] and again == first
    entries = json.loads(measured.cache_path().read_text())["kernels"][dispatch.PLAN_CACHE_KEY]
    assert len(entries) == 1 and next(iter(entries)).startswith("64x0/d37/float32/fp32/")
    # the layer runs on the measured choice and still matches the reference
    from ultrafastbert import FFF

    layer = FFF(37, n_trees=64, depth=0)
    x = torch.randn(40, 37)
    with torch.no_grad():
        y = layer(x)
    ref = fff_reference(x, layer.linear_in.weight, layer.linear_in.bias,
                        layer.linear_out.weight, 64, 0)
    torch.testing.assert_close(y, ref.y, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1  # same shape, same cache entry


def test_fixed_rule_when_measuring_is_off(monkeypatch):
    monkeypatch.setenv("ULTRAFASTBERT_AUTOTUNE", "0")
    monkeypatch.setattr(dispatch, "time_kernels", lambda *a: pytest.fail("measured"))
    choices = dispatch.plan("cpu", torch.float32, "fp32", Workload(8, 7, 384))
    assert choices and not any("measured fastest on this CPU" in c.reason for c in choices)
