"""The native CPU kernel against the reference: routes first, then values, each with a control.

Runs both instruction sets this CPU has (AVX-512 and the AVX2 fallback). Skips only when the
kernel truly cannot be built here (no ninja / compiler / AVX2); ``test_builds_where_it_can``
fails instead of skipping when the toolchain is present, so CI cannot silently lose the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ultrafastbert.fff.native import build
from ultrafastbert.fff.native.kernel import NativeCPUKernel
from ultrafastbert.fff.pytorch.kernel import TorchKernel
from ultrafastbert.fff.reference import fff_reference
from ultrafastbert.fff.tree import n_nodes

CPU = torch.device("cpu")
#: Routing logits this close to 0 may legitimately round the other way (fp32 vs float64).
FP32_MARGIN = 1e-4
#: bf16 weights move a logit by ~0.1% of its scale (std ~0.55 here): ~6 sigma.
BF16_MARGIN = 4e-3
#: At most this fraction of tokens may be excluded for sitting near a routing boundary.
MAX_EXCLUDED = 0.05


def _toolchain_present() -> bool:
    return build.toolchain_reason() is None and build.cpu_isa() is not None


def isa_paths(extra: str, flag: str) -> list[str]:
    """The paths of a kernel this CPU runs: ``extra`` (e.g. ``avx512bf16``) where the CPU has
    ``flag``, then ``avx512`` and ``avx2`` (``avx2`` alone without AVX-512)."""
    if build.cpu_isa() != "avx512":
        return ["avx2"]
    return ([extra] if flag in (build._cpu_flags() or set()) else []) + ["avx512", "avx2"]


def loaded(kernel, dtype: torch.dtype, weight_format: str = "fp32"):  # noqa: ANN001, ANN201
    """``kernel`` once it runs here; a failure where the toolchain is present, else a skip."""
    reason = kernel.unavailable_reason(CPU, dtype, weight_format)
    if reason is not None:
        if _toolchain_present():
            pytest.fail(f"{kernel.name} should run here but: {reason}")
        pytest.skip(f"native kernel unavailable: {reason}")
    return kernel


def _native(isa: str | None = None) -> NativeCPUKernel:
    kernel = NativeCPUKernel(isa)
    reason = kernel.unavailable_reason(CPU, torch.float32)
    if reason is not None:
        if _toolchain_present() and (isa is None or build.ISA_CODES[isa] <= build.ISA_CODES.get(
                build.cpu_isa(), 0)):
            pytest.fail(f"native kernel should build here but: {reason}")
        pytest.skip(f"native kernel unavailable: {reason}")
    return kernel


def _isas() -> list[str]:
    best = build.cpu_isa()
    return ["avx512", "avx2"] if best == "avx512" else ["avx2"]


@pytest.fixture(params=_isas())
def kernel(request) -> NativeCPUKernel:
    """The kernel for each instruction set this CPU runs."""
    return _native(request.param)


def make_weights(n_trees: int, depth: int, d: int, *, seed: int = 0, w_std: float = 0.02,
                 bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Checkpoint-layout weights: w_in ``(K*N, d)``, b_in ``(K*N,)``|None, w_out ``(d, K*N)``."""
    gen = torch.Generator().manual_seed(seed)
    rows = n_trees * n_nodes(depth)
    w_in = torch.randn(rows, d, generator=gen) * w_std
    b_in = torch.randn(rows, generator=gen) * 0.05 if bias else None
    w_out = torch.randn(d, rows, generator=gen) * 0.02
    return w_in, b_in, w_out


def make_inputs(tokens: int, d: int, seed: int = 1) -> torch.Tensor:
    """LayerNorm-ed Gaussian inputs ``(T, d)``, as the FFF sees them inside the encoder."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen) * 2 + 0.3
    return torch.nn.functional.layer_norm(x, (d,))


def check_routes(nodes: torch.Tensor, ref_nodes: torch.Tensor, ref_logits: torch.Tensor,
                 margin: float, max_excluded: float = MAX_EXCLUDED) -> torch.Tensor:
    """Assert equal routes except on tokens with a deciding reference logit within ``margin`` of 0.

    A path's last logit (the leaf's) decides nothing, so only levels ``0..D-1`` can exclude.
    Returns the bool mask ``(T,)`` of tokens whose routes were compared (and are equal).
    """
    near = (ref_logits[..., :-1].abs() < margin).flatten(1).any(dim=1)
    differs = (nodes != ref_nodes).flatten(1).any(dim=1)
    bad = differs & ~near
    assert not bad.any(), (f"{int(bad.sum())} of {len(bad)} tokens route differently, first "
                           f"token {int(bad.nonzero()[0])}")
    assert near.float().mean() <= max_excluded, (
        f"{int(near.sum())} of {len(near)} tokens excluded as near a boundary (margin {margin})")
    return ~near


def check_values(y: torch.Tensor, ref_y: torch.Tensor, rows: torch.Tensor, *, rtol: float,
                 atol: float) -> None:
    """Assert ``y`` matches ``ref_y`` on the selected token rows."""
    torch.testing.assert_close(y[rows], ref_y[rows].to(y.dtype), rtol=rtol, atol=atol)


def run(kernel, x, weights, n_trees, depth, weight_format="fp32"):
    """(y, nodes) of ``kernel`` on checkpoint-layout ``weights``."""
    packed = kernel.pack(*weights, n_trees, depth, weight_format)
    return kernel.forward(x, packed, n_trees, depth, return_nodes=True)


def rounded(weights):
    """The weights as the ``bf16`` format sees them (both matrices rounded through bfloat16)."""
    w_in, b_in, w_out = weights
    return (w_in.bfloat16().float(), b_in, w_out.bfloat16().float())


# --------------------------------------------------------------------------- availability

def test_builds_where_it_can():
    """With ninja, a compiler and AVX2 present the kernel must be available (no silent skip)."""
    if not _toolchain_present():
        pytest.skip(f"no toolchain/CPU support: {build.toolchain_reason() or 'no AVX2'}")
    kernel = NativeCPUKernel()
    assert kernel.unavailable_reason(CPU, torch.float32) is None
    assert kernel.isa == build.cpu_isa()


def test_declares_its_scope():
    kernel = NativeCPUKernel()
    assert "cpu" in kernel.unavailable_reason(torch.device("meta"), torch.float32)
    assert "float64" in kernel.unavailable_reason(CPU, torch.float64)
    assert kernel.unavailable_reason(CPU, torch.float32, "fp8") is not None
    with pytest.raises(ValueError, match="isa"):
        NativeCPUKernel("sse2")


# --------------------------------------------------------------------------- vs the reference

SHAPES = [  # (n_trees, depth, d, tokens)
    (1, 11, 768, 1),
    (1, 11, 768, 1027),
    (1, 11, 37, 13),
    (3, 3, 37, 1000),
    (4, 1, 768, 13),
    (2, 0, 37, 1),
    (5, 3, 768, 13),
    (3072, 0, 768, 13),
    (2, 11, 37, 1001),
    (1, 7, 37, 1000),  # one deep tree, many tokens: the two-phase (bucketed) walk
    (1, 11, 37, 4100),
]


@functools.cache
def reference_case(n_trees: int, depth: int, d: int, tokens: int):
    """Inputs, weights and the reference trace for one shape (shared by both ISAs; read-only)."""
    weights = make_weights(n_trees, depth, d, seed=depth * 7 + d)
    x = make_inputs(tokens, d)
    return x, weights, fff_reference(x, *weights, n_trees, depth)


@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), SHAPES)
def test_matches_reference(kernel, n_trees, depth, d, tokens):
    x, weights, ref = reference_case(n_trees, depth, d, tokens)
    y, nodes = run(kernel, x, weights, n_trees, depth)
    assert nodes.shape == (tokens, n_trees, depth + 1) and nodes.dtype == torch.long
    same = check_routes(nodes, ref.nodes, ref.logits, FP32_MARGIN)
    check_values(y, ref.y, same, rtol=1e-4, atol=1e-5)


def test_without_bias_and_without_nodes(kernel):
    weights = make_weights(2, 3, 37, bias=False)
    x = make_inputs(13, 37)
    ref = fff_reference(x, *weights, 2, 3)
    packed = kernel.pack(*weights, 2, 3, "fp32")
    y, nodes = kernel.forward(x, packed, 2, 3, return_nodes=False)
    assert nodes is None
    torch.testing.assert_close(y, ref.y, rtol=1e-4, atol=1e-5)


def test_route_check_can_fail(kernel):
    """Negative control: flipping the root's routing row in the packed copy changes routes."""
    weights = make_weights(1, 3, 37)
    x = make_inputs(200, 37)
    ref = fff_reference(x, *weights, 1, 3)
    packed = kernel.pack(*weights, 1, 3, "fp32")
    packed = dataclasses.replace(packed, w_in=packed.w_in.clone())  # fp32 pack aliases w_in
    packed.w_in[0].neg_()
    _, nodes = kernel.forward(x, packed, 1, 3, return_nodes=True)
    with pytest.raises(AssertionError, match="route differently"):
        check_routes(nodes, ref.nodes, ref.logits, FP32_MARGIN)


def test_value_check_can_fail(kernel):
    """Negative control: a 0.1% change of one visited output row is detected."""
    weights = make_weights(1, 11, 768)
    x = make_inputs(64, 768)
    ref = fff_reference(x, *weights, 1, 11)
    packed = kernel.pack(*weights, 1, 11, "fp32")
    leaf = int(ref.nodes[5, 0, -1])
    packed.w_out[leaf] *= 1.001
    y, nodes = kernel.forward(x, packed, 1, 11, return_nodes=True)
    same = check_routes(nodes, ref.nodes, ref.logits, FP32_MARGIN)
    assert same[5]
    with pytest.raises(AssertionError):
        check_values(y, ref.y, same, rtol=1e-4, atol=1e-5)


def test_exclusion_budget_can_fail():
    """Negative control: a margin that excludes most tokens is reported, not passed."""
    weights = make_weights(1, 3, 37)
    x = make_inputs(100, 37)
    ref = fff_reference(x, *weights, 1, 3)
    with pytest.raises(AssertionError, match="excluded"):
        check_routes(ref.nodes, ref.nodes, ref.logits, margin=10.0)


@pytest.mark.parametrize(("n_trees", "depth"), [(2, 5), (1, 7)])
def test_token_result_does_not_depend_on_batch(kernel, n_trees, depth):
    """A token gives bit-identical output alone, in a group, and in a large threaded batch
    (for one tree of depth 7, a batch that large takes the two-phase bucketed walk)."""
    weights = make_weights(n_trees, depth, 100)
    packed = kernel.pack(*weights, n_trees, depth, "fp32")
    x = make_inputs(1001, 100)
    y, nodes = kernel.forward(x, packed, n_trees, depth, return_nodes=True)
    for i in (0, 7, 1000):
        y1, n1 = kernel.forward(x[i:i + 1].contiguous(), packed, n_trees, depth,
                                return_nodes=True)
        assert torch.equal(y1[0], y[i]) and torch.equal(n1[0], nodes[i])


def test_thread_count_does_not_change_results(kernel):
    """1,500 tokens: one thread takes the bucketed walk, two threads (750 each) do not."""
    weights = make_weights(1, 11, 768)
    packed = kernel.pack(*weights, 1, 11, "fp32")
    x = make_inputs(1500, 768)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.forward(x, packed, 1, 11, return_nodes=True)
    finally:
        torch.set_num_threads(threads)
    many = kernel.forward(x, packed, 1, 11, return_nodes=True)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_through_the_layer():
    """``FFF.eval()`` with the native runtime: same as the reference, weights updates seen."""
    _native()
    from ultrafastbert import FFF

    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = FFF(37, n_trees=3, depth=4).eval()
    layer.set_runtime("native")
    x = make_inputs(2 * 13, 37).reshape(2, 13, 37)
    with torch.no_grad():
        for _ in range(2):
            y, nodes = layer.forward_with_nodes(x)
            ref = fff_reference(x.reshape(-1, 37), layer.linear_in.weight, layer.linear_in.bias,
                                layer.linear_out.weight, 3, 4)
            same = check_routes(nodes.reshape(-1, 3, 5), ref.nodes, ref.logits, FP32_MARGIN)
            check_values(y.reshape(-1, 37), ref.y, same, rtol=1e-4, atol=1e-5)
            layer.linear_out.weight.mul_(-2.0)  # the next pass must use the new weights


# --------------------------------------------------------------------------- routing rules

def tie_weights(d: int = 37) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth-1 tree whose root logit is exactly 0 for the input ``tie_input``."""
    w_in = torch.zeros(3, d)
    w_in[0, :2] = torch.tensor([1.0, -1.0])  # x0 - x1 = 0 exactly
    w_in[1, 0], w_in[2, 0] = 0.5, -0.25
    w_out = torch.arange(3 * d, dtype=torch.float32).reshape(d, 3) / 100
    return w_in, torch.zeros(3), w_out


def test_exact_zero_goes_left(kernel):
    d = 37
    w_in, b_in, w_out = tie_weights(d)
    x = torch.zeros(3, d)
    x[:, 0] = x[:, 1] = 0.75  # root logit 0.75 - 0.75 = 0: left
    x[1, 1] = 0.75 - 2.0**-20  # a tiny positive logit: right
    x[2, 0] = 0.75 - 2.0**-20  # a tiny negative logit: left
    _, nodes = run(kernel, x, (w_in, b_in, w_out), 1, 1)
    assert nodes[:, 0, 1].tolist() == [1, 2, 1]
    ref = fff_reference(x, w_in, b_in, w_out, 1, 1)
    assert ref.logits[0, 0, 0] == 0 and torch.equal(nodes, ref.nodes)


def test_bias_tie_goes_left(kernel):
    """x.w = 0.5 and bias -0.5: the logit is exactly 0 after the bias too."""
    d = 37
    w_in, b_in, w_out = tie_weights(d)
    w_in[0] = 0
    w_in[0, 3] = 1.0
    b_in[0] = -0.5
    x = torch.zeros(2, d)
    x[:, 3] = 0.5
    x[1, 3] = 0.5 + 2.0**-20
    _, nodes = run(kernel, x, (w_in, b_in, w_out), 1, 1)
    assert nodes[:, 0, 1].tolist() == [1, 2]


def test_off_path_weights_do_not_matter(kernel):
    n_trees, depth, d = 2, 6, 37
    weights = make_weights(n_trees, depth, d)
    x = make_inputs(50, d)
    y, nodes = run(kernel, x, weights, n_trees, depth)
    visited = torch.zeros(n_trees * n_nodes(depth), dtype=torch.bool)
    visited[nodes.flatten()] = True
    w_in, b_in, w_out = (w.clone() for w in weights)
    w_in[~visited] = torch.randn(int((~visited).sum()), d) * 100
    b_in[~visited] = 1e6
    w_out[:, ~visited] = float("nan")
    y2, nodes2 = run(kernel, x, (w_in, b_in, w_out), n_trees, depth)
    assert torch.equal(nodes, nodes2) and torch.equal(y, y2)
    # Control: changing one visited output column does change the output.
    w_out[:, int(nodes[0, 0, -1])] += 1.0
    y3, _ = run(kernel, x, (w_in, b_in, w_out), n_trees, depth)
    assert not torch.equal(y, y3)


def test_nan_input_routes_left_and_gives_nan_row(kernel):
    n_trees, depth, d = 2, 3, 37
    weights = make_weights(n_trees, depth, d)
    x = make_inputs(9, d)
    clean_y, clean_nodes = run(kernel, x, weights, n_trees, depth)
    x[4, 10] = float("nan")
    y, nodes = run(kernel, x, weights, n_trees, depth)
    leftmost = torch.tensor([2**level - 1 for level in range(depth + 1)])
    expected = leftmost + torch.arange(n_trees).unsqueeze(1) * n_nodes(depth)
    assert torch.equal(nodes[4], expected)
    assert torch.isnan(y[4]).all()
    others = torch.arange(9) != 4
    assert torch.equal(y[others], clean_y[others]) and torch.equal(nodes[others],
                                                                   clean_nodes[others])


def test_large_output_is_an_ordinary_tensor(kernel):
    """Outputs over 4 MB come from a huge-page allocation: still correct, resizable, freeable."""
    weights = make_weights(1, 3, 768)
    packed = kernel.pack(*weights, 1, 3, "fp32")
    x = make_inputs(1400, 768)  # 4.3 MB of output
    y, _ = kernel.forward(x, packed, 1, 3)
    small = torch.cat([kernel.forward(c.contiguous(), packed, 1, 3)[0] for c in x.split(256)])
    assert torch.equal(y, small)
    kept = y.clone()
    y.resize_(3000, 768)  # grows through torch's allocator
    assert torch.equal(y[:1400], kept)
    del y


def test_rejects_bad_op_inputs(kernel):
    weights = make_weights(1, 2, 37)
    packed = kernel.pack(*weights, 1, 2, "fp32")
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.forward(torch.randn(37, 4).t(), packed, 1, 2)
    with pytest.raises(RuntimeError, match="weights"):
        kernel.forward(torch.randn(4, 36), packed, 1, 2)
    with pytest.raises(RuntimeError, match="weights"):
        kernel.forward(torch.randn(4, 37), packed, 1, 3)


# --------------------------------------------------------------------------- bf16 formats

@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"),
                         [(1, 11, 768, 1000), (3, 3, 37, 13), (2, 0, 768, 1)])
def test_bf16_matches_torch_path(kernel, n_trees, depth, d, tokens):
    """``bf16``: routes and values as the torch path with the same format, and the rounded spec."""
    weights = make_weights(n_trees, depth, d, seed=3)
    x = make_inputs(tokens, d)
    spec = fff_reference(x, *rounded(weights), n_trees, depth)
    torch_y, torch_nodes = run(TorchKernel(), x, weights, n_trees, depth, "bf16")
    y, nodes = run(kernel, x, weights, n_trees, depth, "bf16")
    same = check_routes(nodes, spec.nodes, spec.logits, FP32_MARGIN)
    same &= check_routes(nodes, torch_nodes, spec.logits, FP32_MARGIN)
    check_values(y, torch_y, same, rtol=1e-4, atol=1e-5)
    check_values(y, spec.y, same, rtol=1e-4, atol=1e-5)
    # Against the fp32 spec, only a bf16 tolerance holds (and only on unchanged routes).
    full = fff_reference(x, *weights, n_trees, depth)
    agree = check_routes(nodes, full.nodes, full.logits, BF16_MARGIN, max_excluded=0.15)
    check_values(y, full.y, agree, rtol=1e-2, atol=1e-3)


def test_bf16_value_check_can_fail(kernel):
    """Negative control: the tight check sees the difference between fp32 and bf16 weights."""
    weights = make_weights(1, 11, 768, seed=3)
    x = make_inputs(200, 768)
    torch_y, torch_nodes = run(TorchKernel(), x, weights, 1, 11, "bf16")
    y, nodes = run(kernel, x, weights, 1, 11, "fp32")
    same = (nodes == torch_nodes).flatten(1).all(dim=1)
    with pytest.raises(AssertionError):
        check_values(y, torch_y, same, rtol=1e-4, atol=1e-5)


def test_bf16_out_keeps_fp32_routes(kernel):
    """``bf16-out`` rounds output rows only: routes bit-identical to ``fp32``, values close."""
    weights = make_weights(2, 11, 768, seed=4)
    x = make_inputs(500, 768)
    y32, nodes32 = run(kernel, x, weights, 2, 11, "fp32")
    y, nodes = run(kernel, x, weights, 2, 11, "bf16-out")
    assert torch.equal(nodes, nodes32)
    torch_y, torch_nodes = run(TorchKernel(), x, weights, 2, 11, "bf16-out")
    assert torch.equal(nodes, torch_nodes)
    everything = torch.ones(len(x), dtype=torch.bool)
    check_values(y, torch_y, everything, rtol=1e-4, atol=1e-5)
    check_values(y, y32, everything, rtol=2e-2, atol=2e-3)
    with pytest.raises(AssertionError):  # control: bf16 rounding is visible to the tight check
        check_values(y, y32, everything, rtol=1e-4, atol=1e-5)


def test_bf16_packs_half_the_bytes(kernel):
    weights = make_weights(1, 3, 37)
    packed = kernel.pack(*weights, 1, 3, "bf16")
    assert packed.w_in.dtype == packed.w_out.dtype == torch.bfloat16
    assert packed.b_in.dtype == torch.float32
    out_only = kernel.pack(*weights, 1, 3, "bf16-out")
    assert out_only.w_in.dtype == torch.float32 and out_only.w_out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- build machinery

@pytest.fixture
def fresh_build_state(tmp_path, monkeypatch):
    """An empty cache directory and forgotten build outcomes, as in a fresh process (restored
    afterwards). The tests using it must not build successfully: a second copy of the loaded
    library would register its operators twice."""
    monkeypatch.setenv("ULTRAFASTBERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_LOADED_KEYS", set())
    build.reset()
    yield tmp_path / "cache"
    build.reset()


def test_environment_switch_disables(fresh_build_state, monkeypatch):
    monkeypatch.setenv("ULTRAFASTBERT_NATIVE", "0")
    build.reset()
    reason = NativeCPUKernel().unavailable_reason(CPU, torch.float32)
    assert reason is not None and "ULTRAFASTBERT_NATIVE" in reason


def test_missing_toolchain_is_explained(fresh_build_state, monkeypatch):
    if build.cpu_isa() is None:
        pytest.skip("CPU without AVX2: the CPU reason comes first")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = NativeCPUKernel().unavailable_reason(CPU, torch.float32)
    assert "ninja" in reason and "compiler" in reason and "PyTorch" in reason


def test_a_second_cache_root_does_not_load_the_library_twice(tmp_path, monkeypatch):
    """After ``reset()`` with the cache moved, the same build is not built or loaded again (a
    second copy would register the operators twice and abort the process)."""
    if isinstance(build.status(), str):
        pytest.skip(f"native kernel unavailable: {build.status()}")
    monkeypatch.setenv("ULTRAFASTBERT_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(build, "_compile_into", lambda d: pytest.fail("built again"))
    build.reset()
    try:
        library = build.status()
        assert not isinstance(library, str), library
        assert torch.ops.ultrafastbert.fff_cpu_isa() == library.isa
    finally:
        monkeypatch.undo()
        build.reset()


def test_build_failure_is_reported_once(fresh_build_state, monkeypatch):
    if not _toolchain_present():
        pytest.skip("no toolchain")
    calls = []

    def failing_compile(build_dir: Path) -> Path:
        calls.append(build_dir)
        raise RuntimeError("fff_cpu.cpp:1:1: error: pretend the compiler failed")

    monkeypatch.setattr(build, "_compile_into", failing_compile)
    first = NativeCPUKernel().unavailable_reason(CPU, torch.float32)
    second = NativeCPUKernel().unavailable_reason(CPU, torch.float32)
    assert "pretend the compiler failed" in first and first == second
    assert len(calls) == 1
    assert not list(fresh_build_state.glob("native-*.tmp-*")), "temporary build dir left behind"


_CONCURRENT_CHILD = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from ultrafastbert.fff.native import build
    built_so, marker_dir = Path(sys.argv[1]), Path(sys.argv[2])

    def fake_compile(build_dir):
        (marker_dir / f"compiled-{time.monotonic_ns()}").touch()
        time.sleep(3.0)  # long enough for the other processes to arrive
        shutil.copy(built_so, build_dir / built_so.name)
        return build_dir / built_so.name

    build._compile_into = fake_compile
    library = build.status()
    assert not isinstance(library, str), library
    print("ok")
""")


@pytest.mark.slow  # integration: CI runs it (make test-slow)
def test_concurrent_first_use_builds_once(tmp_path):
    """Three processes reaching an empty cache at once: one builds, all load a whole library."""
    _native()
    library = build.status()
    assert not isinstance(library, str)
    built_so = library.path / f"{build.LIBRARY_NAME}.so"
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "ULTRAFASTBERT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD, str(built_so),
                               str(markers)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert len(list(markers.iterdir())) == 1
    assert len(list((tmp_path / "cache").glob("native-*/*.so"))) == 1
    assert not list((tmp_path / "cache").glob("native-*.tmp-*"))


def test_build_key_tracks_the_source(tmp_path, monkeypatch):
    key = build.build_key()
    assert len(key) == 16 and key == build.build_key()
    for name in build.SOURCES:
        (tmp_path / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    assert build.build_key() == key
    with (tmp_path / build.SOURCES[-1]).open("a") as handle:
        handle.write("// changed\n")
    assert build.build_key() != key


@pytest.mark.slow
def test_millions_of_tokens(kernel):
    weights = make_weights(1, 11, 37)
    x = make_inputs(2_000_003, 37)
    y, nodes = run(kernel, x, weights, 1, 11)
    sample = torch.randint(0, len(x), (2000,), generator=torch.Generator().manual_seed(0))
    ref = fff_reference(x[sample], *weights, 1, 11)
    same = check_routes(nodes[sample], ref.nodes, ref.logits, FP32_MARGIN)
    check_values(y[sample], ref.y, same, rtol=1e-4, atol=1e-5)


def test_many_tree_gelu_matches_float64(kernel):
    """The many-tree walks' vector GELU (fff_cpu_walk.h gelu_vec) against float64 erfc, over
    the whole float range a logit can take: tree 0's only node has logit x[:, 0] and output row
    e_0, so y[:, 0] is GELU(x[:, 0]) itself. Control: the plain fp32 formula
    z/2 (1 + erf(z / sqrt 2)) fails the same check (cancellation for z < -5)."""
    d = 37
    z = torch.cat([torch.linspace(-14, 14, 4001), torch.tensor(
        [0.0, -0.0, 1e-30, -1e-30, 13.01, -13.01, 9.2 * 2**0.5, -9.2 * 2**0.5, 100.0, -100.0,
         3e38, -3e38, float("nan")])])  # an inf in x makes the other tree's logit inf * 0
    x = torch.zeros(len(z), d)
    x[:, 0] = z
    w_in = torch.zeros(2, d)
    w_in[0, 0] = w_in[1, 1] = 1.0
    w_out = torch.zeros(d, 2)
    w_out[0, 0] = w_out[1, 1] = 1.0
    y, _ = run(kernel, x, (w_in, torch.zeros(2), w_out), 2, 0)
    z64 = z.double()
    want = 0.5 * z64 * torch.special.erfc(-z64 / 2**0.5)  # no cancellation for z < 0
    ok = ~want.isnan()

    def max_rel_err(got: torch.Tensor) -> float:
        return float(((got.double()[ok] - want[ok]).abs() / want[ok].abs().clamp_min(1e-30)).max())

    assert torch.equal(y[:, 0].isnan(), want.isnan())
    assert max_rel_err(y[:, 0]) < 1e-6
    assert torch.equal(y[ok, 1], torch.zeros(int(ok.sum())))  # tree 1: logit 0, GELU(0) = 0
    assert max_rel_err(0.5 * z * (1 + torch.erf(z / 2**0.5))) > 1e-2  # control
