"""The native int8-weight kernel (``native-int8``) against the float64 reference of its own
semantics: the FFF of the dequantized weights (each node row ``scale * q``) and, on the
``avx512vnni`` path, of the dequantized tokens too (each token ``scale * q``, the kernel's own
quantization). Routes first, then values (docs/design.md §2): what remains is the kernel's fp32
arithmetic, so rows with a path logit within a small margin of 0 are left out and counted.

Every path this CPU has runs (forced through the kernel's ``isa``).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from test_native import _toolchain_present, isa_paths, loaded
from ultrafastbert.errors import ResourceError
from ultrafastbert.fff import FFF, dispatch
from ultrafastbert.fff.native import build, tuning
from ultrafastbert.fff.native.kernel import (
    INT8_ISA_CODES,
    NativeInt8Kernel,
    quantize_rows,
    quantize_tokens,
)
from ultrafastbert.fff.reference import fff_reference
from ultrafastbert.fff.tree import n_nodes
from ultrafastbert.utils.machine import ENV_FLAGS_OFF

CPU = torch.device("cpu")
#: The paths this CPU runs, best first.
PATHS = isa_paths("avx512vnni", "avx512_vnni")
#: fp32 sums against float64: ~1e-6 of the logits' scale (0.1-1 here).
MARGIN = 1e-5
#: At most this fraction of tokens may be left out for sitting near a routing boundary.
MAX_EXCLUDED = 0.02
#: fp32 output sums against float64, relative to the output's scale.
VALUE_ATOL = 1e-5

SHAPES = [  # (n_trees, depth, d, tokens): depth 0, odd widths, several trees, one token, many
    (1, 0, 8, 1), (3, 2, 37, 13), (2, 3, 100, 2), (8, 7, 384, 1), (8, 7, 384, 130),
    (32, 5, 384, 64), (12, 5, 384, 7), (16, 6, 768, 33), (1, 11, 768, 1), (1, 11, 768, 300)]


def _kernel(isa: str | None) -> NativeInt8Kernel:
    return loaded(NativeInt8Kernel(isa, tune=False), torch.float32, "int8")


@pytest.fixture(params=PATHS)
def kernel(request) -> NativeInt8Kernel:
    """The kernel on each path this CPU runs."""
    return _kernel(request.param)


def make_case(n_trees: int, depth: int, d: int, tokens: int, seed: int = 0):
    """LayerNorm-ed fp32 inputs ``(T, d)`` and fp32 weights in checkpoint layout."""
    gen = torch.Generator().manual_seed(seed)
    rows = n_trees * n_nodes(depth)
    w_in = torch.randn(rows, d, generator=gen) * 0.05
    b_in = torch.randn(rows, generator=gen) * 0.1
    w_out = torch.randn(d, rows, generator=gen) * 0.02
    x = torch.nn.functional.layer_norm(torch.randn(tokens, d, generator=gen) * 2 + 0.3, (d,))
    return x, (w_in, b_in, w_out)


def own_reference(kernel: NativeInt8Kernel, packed, x: torch.Tensor, n_trees: int, depth: int):
    """The float64 FFF of what the kernel computes: dequantized weights (and tokens on VNNI)."""
    w_in, b_in, w_out = packed.dequantized()
    if kernel.isa == "avx512vnni":
        q, scale = quantize_tokens(x)
        x = q.double() * scale.double()[:, None]
    return fff_reference(x.double(), w_in.double(), b_in.double(), w_out.double(), n_trees,
                         depth)


def run(kernel, x, weights, n_trees, depth):
    packed = kernel.pack(*weights, n_trees, depth, "int8")
    y, nodes = kernel.forward(x, packed, n_trees, depth, return_nodes=True)
    return y, nodes, packed


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
    err = (y[rows].double() - ref.y[rows].double()).abs().max().item() if rows.any() else 0.0
    assert err <= VALUE_ATOL * scale + 1e-7, f"values differ: max err {err:.3g}, scale {scale:.3g}"


# --------------------------------------------------------------------------- quantization

def test_rows_are_quantized_symmetrically_per_row():
    rows = torch.randn(7, 37) * torch.logspace(-3, 1, 7)[:, None]
    rows[3] = 0
    q, scale = quantize_rows(rows)
    assert q.dtype == torch.int8 and scale.shape == (7,) and q.abs().max() <= 127
    assert (q.abs().amax(dim=1)[scale > 0] == 127).all()  # the largest entry uses the range
    assert scale[3] == 0 and (q[3] == 0).all()
    err = (q.float() * scale[:, None] - rows).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest


def test_packs_a_quarter_of_the_bytes(kernel):
    _, weights = make_case(8, 7, 384, 1)
    packed = kernel.pack(*weights, 8, 7, "int8")
    fp32 = weights[0].numel() * 4 * 2
    int8 = packed.w_in.numel() + packed.w_out.numel()
    assert int8 * 4 == fp32 and packed.w_in.dtype == packed.w_out.dtype == torch.int8


def test_vnni_tokens_are_quantized_per_token():
    if "avx512vnni" not in PATHS:
        pytest.skip("this CPU has no AVX512-VNNI")
    _kernel("avx512vnni")
    x = torch.randn(9, 37) * torch.logspace(-2, 1, 9)[:, None]
    x[4] = 0
    q, scale = quantize_tokens(x)
    amax = x.abs().amax(dim=1)
    torch.testing.assert_close(scale, amax / 127, rtol=0, atol=0)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    expected = torch.round(x * inv[:, None]).clamp(-127, 127)
    assert torch.equal(q.float(), expected)  # the same formula, the same float32 steps
    assert scale[4] == 0 and (q[4] == 0).all()


# --------------------------------------------------------------------------- the reference

@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), SHAPES)
def test_matches_its_own_reference(kernel, n_trees, depth, d, tokens):
    x, weights = make_case(n_trees, depth, d, tokens, seed=depth * 7 + d)
    y, nodes, packed = run(kernel, x, weights, n_trees, depth)
    ref = own_reference(kernel, packed, x, n_trees, depth)
    check_values(y, ref, check_routes(nodes, ref))
    y2, none = kernel.forward(x, packed, n_trees, depth)
    assert none is None and torch.equal(y2, y)


def test_route_check_can_fail(kernel):
    """Negative control: the float32 weights' own routes are not the int8 kernel's."""
    x, weights = make_case(32, 5, 384, 300, seed=5)
    _, nodes, _ = run(kernel, x, weights, 32, 5)
    unquantized = fff_reference(x.double(), *(w.double() for w in weights), 32, 5)
    with pytest.raises(AssertionError, match="route differently"):
        check_routes(nodes, unquantized)


def test_value_check_can_fail(kernel):
    x, weights = make_case(3, 2, 37, 13)
    y, nodes, packed = run(kernel, x, weights, 3, 2)
    ref = own_reference(kernel, packed, x, 3, 2)
    rows = check_routes(nodes, ref)
    node = int(nodes[0, 0, 1])
    bad = dataclasses.replace(packed, w_out=packed.w_out.clone())
    bad.w_out[node] = (bad.w_out[node].int() // 2).to(torch.int8)  # one visited row halved
    y_bad, _ = kernel.forward(x, bad, 3, 2)
    with pytest.raises(AssertionError, match="values differ"):
        check_values(y_bad, ref, rows)


def test_without_bias(kernel):
    x, (w_in, _, w_out) = make_case(4, 3, 64, 9)
    y, nodes, packed = run(kernel, x, (w_in, None, w_out), 4, 3)
    assert (packed.b_in == 0).all()
    ref = own_reference(kernel, packed, x, 4, 3)
    check_values(y, ref, check_routes(nodes, ref))


def test_exact_zero_goes_left(kernel):
    """Ties: a zero row with a zero bias, and x0 * q - x1 * q with x0 = x1 (the token is
    quantized the same on both entries), give logits of exactly 0: left."""
    d = 37
    w_in = torch.zeros(3, d)
    w_in[0, :2] = torch.tensor([0.5, -0.5])
    w_in[1, 0], w_in[2, 0] = 0.5, -0.25
    w_out = torch.arange(3 * d, dtype=torch.float32).reshape(d, 3) / 100
    x = torch.zeros(3, d)
    x[:, 0] = x[:, 1] = 0.75
    x[1, 5] = 3.0  # another entry: the token's scale changes, the tie stays
    _, nodes, packed = run(kernel, x, (w_in, torch.zeros(3), w_out), 1, 1)
    assert nodes[:, 0, 1].tolist() == [1, 1, 1]
    ref = own_reference(kernel, packed, x, 1, 1)
    assert (ref.logits[:, 0, 0] == 0).all() and torch.equal(nodes, ref.nodes)
    zero = torch.zeros(3, d)
    _, nodes, _ = run(kernel, x, (zero, torch.zeros(3), w_out), 1, 1)
    assert (nodes[:, 0, 1] == 1).all()


def test_nan_input_routes_left_and_gives_nan(kernel):
    x, weights = make_case(2, 3, 37, 3)
    x[1, 4] = float("nan")
    y, nodes, _ = run(kernel, x, weights, 2, 3)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    left = torch.tensor([t * n_nodes(3) + (2**lv - 1) for t in range(2) for lv in range(4)])
    assert torch.equal(nodes[1].flatten(), left)


def test_thread_count_does_not_change_results(kernel):
    x, weights = make_case(8, 7, 384, 1500, seed=11)
    packed = kernel.pack(*weights, 8, 7, "int8")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, n1 = kernel.forward(x, packed, 8, 7, return_nodes=True)
        torch.set_num_threads(2)
        y2, n2 = kernel.forward(x, packed, 8, 7, return_nodes=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(n1, n2) and torch.equal(y1, y2)


def test_token_result_does_not_depend_on_batch(kernel):
    x, weights = make_case(16, 6, 384, 40, seed=2)
    y, nodes, packed = run(kernel, x, weights, 16, 6)
    for i in (0, 17, 39):
        yi, ni = kernel.forward(x[i:i + 1].clone(), packed, 16, 6, return_nodes=True)
        assert torch.equal(ni[0], nodes[i]) and torch.equal(yi[0], y[i])


KNOB_SHAPES = [(3, 4, 37, 13), (8, 7, 384, 130), (32, 5, 384, 1), (1, 8, 384, 700),
               (16, 6, 768, 70), (5, 0, 37, 13)]


@pytest.mark.parametrize(("n_trees", "depth", "d", "tokens"), KNOB_SHAPES)
def test_every_walk_gives_the_same_bits(kernel, n_trees, depth, d, tokens):
    """The int8 ops run the fp32 kernel's walk: every knob setting (sorted, blocked, split,
    bucketed walks; 1 or 2 threads) gives the untuned op's bits."""
    from test_native_tuning import knob_rows

    x, weights = make_case(n_trees, depth, d, tokens, seed=tokens)
    y0, nodes0, packed = run(kernel, x, weights, n_trees, depth)
    ref = own_reference(kernel, packed, x, n_trees, depth)
    check_values(y0, ref, check_routes(nodes0, ref))
    threads = torch.get_num_threads()
    for i, row in enumerate([tuning.default_row(0, n_trees), *knob_rows(6, seed=tokens)]):
        torch.set_num_threads(1 + i % 2)
        try:
            tuned = dataclasses.replace(packed, knobs=tuning.to_table([row]))
            y, nodes = kernel.forward(x, tuned, n_trees, depth, return_nodes=True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(nodes, nodes0), f"routes changed with knobs {row}"
        assert torch.equal(y, y0), f"values changed with knobs {row}"


# --------------------------------------------------------------------------- scope and layer

def test_declares_its_scope():
    kernel = NativeInt8Kernel()
    assert "weight formats" in kernel.unavailable_reason(CPU, torch.float32, "fp32")
    assert "float32" in kernel.unavailable_reason(CPU, torch.bfloat16, "int8")
    with pytest.raises(ValueError, match="isa"):
        NativeInt8Kernel("amx")
    reasons = dict(dispatch.explain(CPU, torch.float32, "int8"))
    assert "weight formats" in reasons["native"] and "weight formats" in reasons["torch"]
    if _toolchain_present():
        assert reasons["native-int8"] is None
        assert dispatch.select("auto", CPU, torch.float32, "int8").name == "native-int8"


def test_hidden_cpu_flags_fall_back_with_a_clear_message(monkeypatch):
    """ULTRAFASTBERT_CPU_FLAGS_OFF: without VNNI the widening AVX-512 path runs; without
    AVX-512 the AVX2 one; a forced path the (pretended) CPU lacks is refused, saying why."""
    _kernel(None)
    monkeypatch.setenv(ENV_FLAGS_OFF, "avx512_vnni")
    no_vnni = _kernel(None)
    expected = "avx512" if build.cpu_isa() == "avx512" else "avx2"
    assert no_vnni.isa == expected
    forced = NativeInt8Kernel("avx512vnni")
    reason = forced.unavailable_reason(CPU, torch.float32, "int8")
    assert reason is not None and "avx512vnni" in reason and f"best: {expected}" in reason
    with pytest.raises(ResourceError, match="int8 FFF kernel cannot run.*avx512vnni"):
        forced.forward(torch.zeros(1, 8), None, 1, 0)
    monkeypatch.setenv(ENV_FLAGS_OFF, "avx512f,avx512_vnni")
    assert _kernel(None).isa == "avx2"


def test_best_widening_path_is_the_default():
    """VNNI lost the accuracy rule on the converted MiniLM: it runs only when asked for."""
    kernel = _kernel(None)
    assert kernel.isa == next(p for p in PATHS if p != "avx512vnni")
    assert set(INT8_ISA_CODES) >= set(PATHS)


@functools.cache
def _layer() -> FFF:
    torch.manual_seed(0)
    layer = FFF(96, n_trees=4, depth=3).eval()
    with torch.no_grad():
        layer.linear_in.bias.normal_(0, 0.1)
    return layer


def test_layer_with_int8_weights_runs_the_int8_kernel():
    _kernel(None)
    layer = _layer()
    layer.set_runtime(weight_format="int8")
    try:
        kernel = layer.kernel()
        assert kernel.name == "native-int8"
        x = torch.nn.functional.layer_norm(torch.randn(2, 5, 96), (96,))
        with torch.no_grad():
            y, nodes = layer.forward_with_nodes(x)
            packed = kernel.pack(layer.linear_in.weight, layer.linear_in.bias,
                                 layer.linear_out.weight, 4, 3, "int8")
        assert nodes is not None
        ref = own_reference(kernel, packed, x.reshape(-1, 96), 4, 3)
        rows = check_routes(nodes.reshape(10, 4, 4), ref)
        check_values(y.reshape(10, 96), ref, rows)
    finally:
        layer.set_runtime()


# --------------------------------------------------------------------------- the int8 precision

TEXTS = ["the king saw the queen", "dog", "a man and a woman walk by the river.",
         "the old city", "fire and water", "she said the word", "they went to the sea at night"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted BERT (2 layers of 4x3 FFF blocks, d=32), random FFF weights."""
    from convertcheck import tiny_bert
    from test_infer_fast import _convert

    root = tmp_path_factory.mktemp("int8")
    return _convert(tiny_bert(root / "bert", seed=1), root / "bert-fff", "bert", "base")


def _int8_faster(monkeypatch, faster: bool = True) -> None:
    """A synthetic measurement: the int8 kernel timed faster (or slower) than fp32."""
    from ultrafastbert.infer import precision

    fp32, low = ([2.0, 1.0], [1.0, 0.5]) if faster else ([1.0, 0.5], [2.0, 1.0])
    monkeypatch.setenv(tuning.ENV_SWITCH, "1")
    monkeypatch.setattr(precision, "_fff_timings", lambda fff, precision_name="int8": {
        "tokens": list(precision.FFF_MEASURED_TOKENS),
        "us_per_token": {"native": fp32, precision.FFF_LOW[precision_name][1]: low}})


def _fff_runs(predictor, precision: str) -> list:
    encoder = predictor._encoder(precision)
    return [m for m in encoder.modules() if isinstance(m, FFF)]


def test_int8_precision_runs_int8_fff_blocks_where_faster(converted, monkeypatch):
    """With int8 measured faster, the int8 encoder's FFF blocks take int8 weights (views that
    share the model's parameters; the model's own FFF modules keep fp32); slower: fp32."""
    from ultrafastbert.infer import Predictor
    from ultrafastbert.infer.precision import fff_weight_format, unavailable

    if unavailable("int8") is not None:
        pytest.skip(f"int8: {unavailable('int8')}")
    _kernel(None)
    _int8_faster(monkeypatch)
    predictor = Predictor.from_pretrained(converted, precision="int8")
    views = _fff_runs(predictor, "int8")
    own = [m for m in predictor.model.modules() if isinstance(m, FFF)]
    assert views and len(views) == len(own)
    assert all(v.runtime.weight_format == "int8" and v.kernel().name == "native-int8"
               for v in views)
    assert all(m.runtime.weight_format == "fp32" for m in own)
    assert all(v.linear_in.weight is m.linear_in.weight for v, m in zip(views, own, strict=True))
    fmt, why = fff_weight_format(own[0], "int8")
    assert fmt == "int8" and "faster" in why and "us/token" in why
    _int8_faster(monkeypatch, faster=False)
    assert fff_weight_format(own[0], "int8")[0] == "fp32"
    assert fff_weight_format(own[0], "float32") == ("fp32", "precision float32")
    monkeypatch.setenv(tuning.ENV_SWITCH, "0")
    fmt, why = fff_weight_format(own[0], "int8")
    assert fmt == "fp32" and "not measured" in why


def test_bf16_precision_runs_bf16_fff_blocks_where_faster(converted, monkeypatch):
    """With the bf16 kernel measured faster, the bfloat16 encoder's FFF blocks are bfloat16
    copies on the native-bf16 kernel (the model's own blocks keep float32); the pooled
    embeddings stay within cosine 0.99 of float32 and differ from the float32-kernel ones (the
    bf16 kernel ran); slower, or switched off: the float32 kernel."""
    from ultrafastbert.infer import Predictor
    from ultrafastbert.infer.precision import FFF_BF16_SWITCH, fff_weight_format, unavailable

    if unavailable("bfloat16") is not None:
        pytest.skip(f"bfloat16: {unavailable('bfloat16')}")
    _int8_faster(monkeypatch)
    reference = Predictor.from_pretrained(converted, precision="float32").embed(TEXTS)
    predictor = Predictor.from_pretrained(converted, precision="bfloat16")
    views = _fff_runs(predictor, "bfloat16")
    own = [m for m in predictor.model.modules() if isinstance(m, FFF)]
    assert views and len(views) == len(own)
    assert all(v.linear_in.weight.dtype == torch.bfloat16 and v.runtime.weight_format == "bf16"
               and v.kernel().name == "native-bf16" for v in views)
    assert all(m.linear_in.weight.dtype == torch.float32 for m in own)
    bf16 = predictor.embed(TEXTS)
    assert float(torch.nn.functional.cosine_similarity(bf16, reference).mean()) >= 0.99
    monkeypatch.setenv(FFF_BF16_SWITCH, "0")
    assert fff_weight_format(own[0], "bfloat16")[0] == "fp32"
    wide = Predictor.from_pretrained(converted, precision="bfloat16")
    assert all(v.linear_in.weight.dtype == torch.float32 for v in _fff_runs(wide, "bfloat16"))
    assert not torch.equal(wide.embed(TEXTS), bf16)
    monkeypatch.delenv(FFF_BF16_SWITCH)
    _int8_faster(monkeypatch, faster=False)
    assert fff_weight_format(own[0], "bfloat16")[0] == "fp32"


def _route_change_rate(model, texts, predictor) -> float:
    """Fraction of (token, layer) pairs whose path through an FFF block changes with int8
    weights (the fp32 blocks' own inputs fed to both kernels)."""
    seen: list[torch.Tensor] = []
    own = [m for m in model.modules() if isinstance(m, FFF)]
    handles = [m.register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach()))
               for m in own]
    try:
        predictor.embed(texts)
    finally:
        for h in handles:
            h.remove()
    kernel = _kernel(None)
    changed = total = 0
    for x in seen:
        fff = next(m for m in own if m.d_model == x.shape[-1])
        flat = x.reshape(-1, fff.d_model).contiguous()
        with torch.no_grad():
            _, ref = fff.forward_with_nodes(flat)
            packed = kernel.pack(fff.linear_in.weight, fff.linear_in.bias,
                                 fff.linear_out.weight, fff.n_trees, fff.depth, "int8")
            _, nodes = kernel.forward(flat, packed, fff.n_trees, fff.depth, return_nodes=True)
        changed += int((nodes != ref).flatten(1).any(1).sum())
        total += flat.shape[0]
    return changed / total


def test_int8_fff_blocks_keep_the_embeddings(converted, monkeypatch):
    """The accuracy rule's cosine half on the tiny converted model: int8 FFF blocks (beside int8
    linears) keep the pooled embeddings within cosine 0.99 of float32, and the route-change
    rate is computed and small; an unrelated model is far (negative control)."""
    from ultrafastbert.infer import Predictor
    from ultrafastbert.infer.precision import unavailable

    if unavailable("int8") is not None:
        pytest.skip(f"int8: {unavailable('int8')}")
    _kernel(None)
    _int8_faster(monkeypatch)
    texts = TEXTS * 3
    fp32 = Predictor.from_pretrained(converted, precision="float32")
    reference = fp32.embed(texts)
    int8 = Predictor.from_pretrained(converted, precision="int8").embed(texts)
    cosine = float(torch.nn.functional.cosine_similarity(int8, reference).mean())
    assert 0.99 <= cosine < 1.0, cosine
    rate = _route_change_rate(fp32.model, texts, fp32)
    assert 0.0 <= rate <= 0.1, rate
    shuffled = reference[torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))]
    assert float(torch.nn.functional.cosine_similarity(int8, shuffled).mean()) < cosine
