"""The native bf16 kernel (``native-bf16``) against the reference: routes first, then values.

Every path this CPU has runs: AVX512-BF16 dot products and the widening AVX-512 / AVX2 fallbacks
(forced through the kernel's ``isa`` switch). The reference is the float64 spec evaluated on the
kernel's own (bf16) inputs and weights, so what remains is the kernel's fp32 accumulation and its
final rounding to bf16: rows with a routing logit within a margin of 0 are excluded and counted
(docs/design.md §2, low precision), and values are compared within a bf16 tolerance.
"""

from __future__ import annotations

import functools

import pytest
import torch

from test_native import _toolchain_present, isa_paths, loaded
from ultrafastbert.fff import FFF, dispatch
from ultrafastbert.fff.native import build
from ultrafastbert.fff.native import kernel as native_kernel
from ultrafastbert.fff.native.kernel import NativeBF16Kernel
from ultrafastbert.fff.reference import fff_reference
from ultrafastbert.fff.tree import n_nodes

CPU = torch.device("cpu")
#: The paths this CPU runs, best first.
PATHS = isa_paths("avx512bf16", "avx512_bf16")
#: fp32 sums of bf16 products (dpbf16 pairs them) against float64: ~1e-6 of the logits' scale
#: (0.1-1 here), so logits this close to 0 may round either way.
MARGIN = 1e-4
#: At most this fraction of tokens may be excluded for sitting near a routing boundary.
MAX_EXCLUDED = 0.05
#: The output is rounded to bf16 once: at most half an ulp, 2**-8 of each element's magnitude;
#: plus the fp32 sums' own error, relative to the output's scale.
VALUE_RTOL = 2**-8
VALUE_ATOL = 1e-5


def _kernel(isa: str | None) -> NativeBF16Kernel:
    return loaded(NativeBF16Kernel(isa), torch.bfloat16)


@pytest.fixture(params=PATHS)
def kernel(request) -> NativeBF16Kernel:
    """The kernel on each path this CPU runs."""
    return _kernel(request.param)


def make_case(n_trees: int, depth: int, d: int, tokens: int, seed: int = 0):
    """bf16 inputs ``(T, d)`` (LayerNorm-ed), bf16 weights in checkpoint layout, fp32 bias."""
    gen = torch.Generator().manual_seed(seed)
    rows = n_trees * n_nodes(depth)
    w_in = (torch.randn(rows, d, generator=gen) * 0.05).bfloat16()
    b_in = torch.randn(rows, generator=gen) * 0.1
    w_out = (torch.randn(d, rows, generator=gen) * 0.02).bfloat16()
    x = torch.nn.functional.layer_norm(torch.randn(tokens, d, generator=gen) * 2 + 0.3, (d,))
    return x.bfloat16(), (w_in, b_in, w_out)


@functools.cache
def reference_case(n_trees: int, depth: int, d: int, tokens: int):
    x, weights = make_case(n_trees, depth, d, tokens, seed=depth * 7 + d)
    ref = fff_reference(x.double(), *(w.double() for w in weights), n_trees, depth)
    return x, weights, ref


def run(kernel, x, weights, n_trees, depth):
    packed = kernel.pack(*weights, n_trees, depth, "fp32")
    return kernel.forward(x, packed, n_trees, depth, return_nodes=True)


def check_routes(nodes, ref, margin: float = MARGIN) -> torch.Tensor:
    """Equal routes except on tokens with a deciding reference logit within ``margin`` of 0;
    returns the compared tokens' mask."""
    near = (ref.logits[..., :-1].abs() < margin).flatten(1).any(dim=1)
    bad = (nodes != ref.nodes).flatten(1).any(dim=1) & ~near
    assert not bad.any(), f"{int(bad.sum())} of {len(bad)} tokens route differently"
    assert near.sum() <= max(1, MAX_EXCLUDED * len(near)), f"{int(near.sum())} tokens excluded"
    return ~near


def check_values(y, ref, rows) -> None:
    scale = ref.y.abs().max().item()
    err = (y[rows].double() - ref.y[rows]).abs()
    bound = VALUE_RTOL * ref.y[rows].abs() + VALUE_ATOL * scale
    assert (err <= bound).all(), f"values differ: max err {err.max().item():.3g}, scale {scale:.3g}"


# --------------------------------------------------------------------------- availability

def test_runs_where_it_can():
    """With a toolchain present the kernel must run, on the best path of this CPU."""
    if not _toolchain_present():
        pytest.skip(f"no toolchain/CPU support: {build.toolchain_reason() or 'no AVX2'}")
    kernel = NativeBF16Kernel()
    assert kernel.unavailable_reason(CPU, torch.bfloat16) is None
    assert kernel.isa == PATHS[0]
    assert torch.ops.ultrafastbert.fff_bf16_isa() == PATHS[0]


def test_declares_its_scope_and_reasons(monkeypatch):
    """The dispatcher says why the bf16 native path cannot run."""
    kernel = NativeBF16Kernel()
    assert "float32" in kernel.unavailable_reason(CPU, torch.float32)
    assert "cpu" in kernel.unavailable_reason(torch.device("meta"), torch.bfloat16)
    with pytest.raises(ValueError, match="isa"):
        NativeBF16Kernel("amx")
    monkeypatch.setenv(native_kernel.BF16_ISA_ENV, "sse2")
    assert native_kernel.BF16_ISA_ENV in NativeBF16Kernel().unavailable_reason(CPU, torch.bfloat16)
    monkeypatch.delenv(native_kernel.BF16_ISA_ENV)
    monkeypatch.setenv("ULTRAFASTBERT_NATIVE", "0")
    monkeypatch.setattr(dispatch, "_REGISTRY", {})  # fresh kernels (loaded ones remember)
    build.reset()
    try:
        reasons = dict(dispatch.explain(CPU, torch.bfloat16))
        assert "ULTRAFASTBERT_NATIVE" in reasons["native-bf16"]
        assert dispatch.select("auto", CPU, torch.bfloat16).name == "torch"
        with pytest.raises(ValueError, match="native-bf16.*ULTRAFASTBERT_NATIVE"):
            dispatch.select("native-bf16", CPU, torch.bfloat16)
    finally:
        monkeypatch.delenv("ULTRAFASTBERT_NATIVE")
        build.reset()


def test_forced_path_beyond_the_cpu_is_refused(monkeypatch):
    """A path the CPU lacks is a reason, not a crash (simulated by lowering the CPU's best)."""
    _kernel(None)  # loads the library
    monkeypatch.setattr(native_kernel, "bf16_cpu_path", lambda: "avx2")
    reason = NativeBF16Kernel("avx512").unavailable_reason(CPU, torch.bfloat16)
    assert reason is not None and "avx512" in reason and "best: avx2" in reason
    assert NativeBF16Kernel("avx2").unavailable_reason(CPU, torch.bfloat16) is None


# --------------------------------------------------------------------------- vs the reference

SHAPES = [  # (n_trees, depth, d, tokens)
    (1, 11, 768, 1),
    (1, 11, 768, 13),
    (1, 11, 384, 300),
    (1, 11, 37, 13),
    (3, 4, 37, 13),
    (4, 6, 384, 64),
    (8, 7, 384, 40),
    (2, 0, 768, 13),   # depth 0
    (5, 0, 37, 1),
    (1, 8, 384, 700),  # one deep tree, many tokens: the bucketed walk
    (1, 11, 768, 1100),  # bucketed, prefetching, and split across threads
]


@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), SHAPES)
def test_matches_reference(kernel, n_trees, depth, d, tokens):
    x, weights, ref = reference_case(n_trees, depth, d, tokens)
    y, nodes = run(kernel, x, weights, n_trees, depth)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, d)
    assert nodes.shape == (tokens, n_trees, depth + 1) and nodes.dtype == torch.long
    rows = check_routes(nodes, ref)
    check_values(y, ref, rows)


def test_without_nodes_and_without_bias(kernel):
    x, (w_in, _, w_out) = make_case(2, 3, 37, 13)
    ref = fff_reference(x.double(), w_in.double(), None, w_out.double(), 2, 3)
    packed = kernel.pack(w_in, None, w_out, 2, 3, "fp32")
    y, nodes = kernel.forward(x, packed, 2, 3)
    assert nodes is None
    check_values(y, ref, torch.ones(13, dtype=torch.bool))


def test_paths_agree(kernel):
    """Each path against the best one: same routes off the margin, values within bf16."""
    x, weights, ref = reference_case(1, 11, 768, 13)
    y, nodes = run(kernel, x, weights, 1, 11)
    y0, nodes0 = run(_kernel(None), x, weights, 1, 11)
    rows = check_routes(nodes, ref) & check_routes(nodes0, ref)
    assert torch.equal(nodes[rows], nodes0[rows])
    torch.testing.assert_close(y[rows].float(), y0[rows].float(), rtol=2**-7, atol=1e-3)


def test_exact_zero_goes_left(kernel):
    """A logit of exactly 0 (zero row, zero bias) goes left; a tiny positive bias goes right."""
    x, (w_in, b_in, w_out) = make_case(2, 2, 37, 5)
    w_in[0] = 0
    b_in = b_in.clone()
    b_in[0] = 0.0
    b_in[n_nodes(2)] = 1e-30  # tree 1's root: positive by a hair
    w_in[n_nodes(2)] = 0
    _, nodes = kernel.forward(x, kernel.pack(w_in, b_in, w_out, 2, 2, "fp32"), 2, 2, True)
    assert (nodes[:, 0, 1] == 1).all()  # left child of root 0
    assert (nodes[:, 1, 1] == n_nodes(2) + 2).all()  # right child of tree 1's root


def test_nan_input_routes_left_and_gives_nan(kernel):
    x, weights = make_case(1, 3, 37, 3)
    x[1] = float("nan")
    y, nodes = run(kernel, x, weights, 1, 3)
    assert torch.equal(nodes[1, 0], torch.tensor([0, 1, 3, 7]))
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_route_check_can_fail(kernel):
    """Negative control: negating the root's routing row changes routes, and it is caught."""
    x, weights, ref = reference_case(1, 11, 768, 13)
    w_in = weights[0].clone()
    w_in[0].neg_()
    _, nodes = run(kernel, x, (w_in, *weights[1:]), 1, 11)
    with pytest.raises(AssertionError, match="route differently"):
        check_routes(nodes, ref)


def test_value_check_can_fail(kernel):
    """Negative control: a 10% change of one visited output row is caught; off-path rows are
    not read at all."""
    x, weights, ref = reference_case(1, 11, 768, 13)
    w_in, b_in, w_out = weights
    packed = kernel.pack(w_in.clone(), b_in, w_out, 1, 11, "fp32")  # bf16 w_in is not copied
    visited = set(ref.nodes.flatten().tolist())
    off_path = next(n for n in range(n_nodes(11)) if n not in visited)
    packed.w_out[off_path] = float("nan")
    packed.w_in[off_path] = float("nan")
    y, nodes = kernel.forward(x, packed, 1, 11, True)
    rows = check_routes(nodes, ref)
    check_values(y, ref, rows)  # off-path NaNs changed nothing
    leaf = int(ref.nodes[5, 0, -1])
    packed.w_out[leaf] *= 1.1
    y, _ = kernel.forward(x, packed, 1, 11, True)
    with pytest.raises(AssertionError, match="values differ"):
        check_values(y, ref, rows)


def test_output_rounding_is_torchs(kernel):
    """With GELU(z) = z exactly (z >= 8) and one node, y = bf16(z * w_out) in fp32: the kernel's
    rounding to bf16 (nearest even; NaN -> 0x7FC0) is torch's, on full tiles and tails."""
    gen = torch.Generator().manual_seed(3)
    d, tokens = 300, 64
    x = torch.zeros(tokens, d)
    x[:, 0] = 8 + torch.rand(tokens, generator=gen) * 8
    x[::7, 0] *= -1  # GELU(z) = -0: zero rows
    x = x.bfloat16()
    x[5, 0] = float("nan")
    bias = torch.tensor([0.1234567])  # z = x + bias is an fp32 value with all mantissa bits
    w_in = torch.zeros(1, d, dtype=torch.bfloat16)
    w_in[0, 0] = 1
    w_out = torch.randn(d, 1, generator=gen).bfloat16()
    y, _ = kernel.forward(x, kernel.pack(w_in, bias, w_out, 1, 0, "fp32"), 1, 0)
    z = x[:, :1].float() + bias
    expected = (z.clamp(min=0) * w_out[:, 0].float()).bfloat16()
    finite = ~x[:, 0].isnan()
    assert torch.equal(y[finite], expected[finite])
    assert (y[5].view(torch.int16) == 0x7FC0).all()


# --------------------------------------------------------------------------- the layer

def test_bf16_layer_runs_the_bf16_kernel_and_returns_bf16():
    _kernel(None)
    torch.manual_seed(0)
    layer = FFF(384, n_trees=4, depth=6).eval()
    with torch.no_grad():
        layer.linear_in.bias.normal_(0, 0.1)
    layer = layer.to(torch.bfloat16)
    assert layer.kernel().name == "native-bf16"
    x = torch.nn.functional.layer_norm(torch.randn(3, 13, 384), (384,)).bfloat16()
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
        again = layer(x)  # the cached fast path
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.equal(y, again)
    ref = fff_reference(x.reshape(-1, 384).double(), layer.linear_in.weight.double(),
                        layer.linear_in.bias.double(), layer.linear_out.weight.double(), 4, 6)
    rows = check_routes(nodes.reshape(-1, 4, 7), ref)
    check_values(y.reshape(-1, 384), ref, rows)
    layer.set_runtime("native")  # the fp32 kernel, asked for explicitly: an error with reason
    with torch.no_grad(), pytest.raises(ValueError, match="native.*float32, not bfloat16"):
        layer(x)


# ------------------------------------------------------- the shared walk's knobs, in bf16

KNOB_SHAPES = [  # (n_trees, depth, d, tokens): odd widths, several trees, deep, one token
    (3, 4, 37, 13), (8, 7, 384, 130), (32, 5, 384, 1), (1, 8, 384, 700), (16, 6, 768, 70),
    (5, 0, 37, 13)]


def run_knobs(kernel, x, weights, n_trees, depth, table):
    packed = kernel.pack(*weights, n_trees, depth, "fp32")
    return torch.ops.ultrafastbert.fff_bf16_forward_tuned_nodes(
        x, packed.w_in, packed.b_in, packed.w_out, n_trees, depth, kernel._isa_code, table)


@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), KNOB_SHAPES)
def test_every_walk_gives_the_same_bits(kernel, n_trees, depth, d, tokens):
    """The bf16 ops run the fp32 kernel's walk: every knob setting (sorted, blocked, split,
    bucketed walks; 1 or 2 threads) gives the untuned op's bits, which match the reference."""
    from test_native_tuning import knob_rows
    from ultrafastbert.fff.native import tuning

    x, weights, ref = reference_case(n_trees, depth, d, tokens)
    y0, nodes0 = run(kernel, x, weights, n_trees, depth)
    check_values(y0, ref, check_routes(nodes0, ref))
    threads = torch.get_num_threads()
    for i, row in enumerate([tuning.default_row(0, n_trees), *knob_rows(6, seed=tokens)]):
        torch.set_num_threads(1 + i % 2)
        try:
            y, nodes = run_knobs(kernel, x, weights, n_trees, depth, tuning.to_table([row]))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(nodes, nodes0), f"routes changed with knobs {row}"
        assert torch.equal(y, y0), f"values changed with knobs {row}"


def test_bad_bf16_knobs_are_rejected():
    from ultrafastbert.fff.native import tuning

    kernel = _kernel(None)
    x, weights = make_case(2, 2, 37, 3)
    row = {**tuning.default_row(0, 2), "group": 3}
    with pytest.raises(RuntimeError, match="fff_bf16_forward_tuned: group"):
        run_knobs(kernel, x, weights, 2, 2, tuning.to_table([row]))
