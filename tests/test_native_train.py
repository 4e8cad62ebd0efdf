"""The native CPU training kernel (fff/native/training.py, fff_cpu_train.cpp) against the masked
form in float64: routes first, then output and gradients; ties, off-path rows, thread counts,
bad node ids, the layer's use of it, and the dispatcher's measured choice (synthetic clock)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fffcheck import inputs, make_layer
from ultrafastbert.fff import FFF, dispatch, fff_masked, route
from ultrafastbert.fff.dispatch import Workload
from ultrafastbert.fff.native import build
from ultrafastbert.fff.pytorch.kernel import TorchKernel


def native_trains() -> bool:
    return dict(dispatch.explain("cpu", torch.float32, training=True))["native"] is None


needs_native = pytest.mark.skipif(not native_trains(), reason="native kernel unavailable here")
ISAS = [isa for isa in ("avx512", "avx2")
        if build.cpu_isa() is not None
        and build.ISA_CODES[isa] <= build.ISA_CODES.get(build.cpu_isa() or "", 0)]


def native_run(x, w_in, b_in, w_out, n_trees, depth, isa, grad_y):
    """Output, gradients of x and the three weights, and nodes from the native ops."""
    ops = torch.ops.ultrafastbert
    code = build.ISA_CODES[isa]
    rows = w_out.t().contiguous()
    y, nodes, logits = ops.fff_cpu_train_forward(x, w_in, b_in, rows, n_trees, depth, code)
    grads = ops.fff_cpu_train_backward(grad_y, x, w_in, rows, nodes, logits, n_trees, depth, code)
    return [y, *grads], nodes


def masked64(x, w_in, b_in, w_out, n_trees, depth, grad_y):
    """The masked form in float64: output and gradients of x and the three weights."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w_in, b_in, w_out)]
    y = fff_masked(*leaves, n_trees, depth)
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y.double())]


def layer_tensors(tokens, d, n_trees, depth, seed=0):
    layer = make_layer(d, n_trees, depth, seed=seed, weight_std=0.05)
    x = inputs(tokens, d, seed=seed + 1)
    grad_y = inputs(tokens, d, seed=seed + 2)
    return (x, layer.linear_in.weight.detach(), layer.linear_in.bias.detach(),
            layer.linear_out.weight.detach(), grad_y)


def assert_close_rel(got, want, tol, name):
    err = ((got.double() - want).abs().max() / (1 + want.abs().max())).item()
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("tokens", "d", "n_trees", "depth"), [
    (1, 384, 8, 7), (13, 384, 8, 7), (300, 384, 8, 7), (1, 768, 1, 11), (200, 768, 1, 11),
    (13, 37, 3, 3), (13, 37, 64, 0), (1, 37, 1, 0), (7, 5, 4, 9), (50, 37, 16, 7),
    (40, 17, 2, 5), (33, 400, 3, 4), (700, 8, 3072, 0),  # the last: > 2M (token, node) pairs
])
def test_routes_then_output_and_gradients_equal_the_masked_form(isa, tokens, d, n_trees, depth):
    x, w_in, b_in, w_out, grad_y = layer_tensors(tokens, d, n_trees, depth)
    nodes64, logits64 = route(x.double(), w_in.double(), b_in.double(), n_trees, depth)
    # no float32 rounding can flip a route here (a leaf's logit decides nothing)
    assert (logits64[..., :-1].abs() > 1e-5).all()
    got, nodes = native_run(x, w_in, b_in, w_out, n_trees, depth, isa, grad_y)
    assert torch.equal(nodes, nodes64)  # routes first
    want = masked64(x, w_in, b_in, w_out, n_trees, depth, grad_y)
    for name, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert_close_rel(a, b, 2e-6, name)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_exact_zero_logits_go_left_and_their_gradients_match(isa):
    """Nodes whose routing row and bias are zero have logit exactly 0 for every token: the
    token goes left, GELU(0) = 0 and GELU'(0) = 1/2 (the node still passes gradient to x)."""
    x, w_in, b_in, w_out, grad_y = layer_tensors(13, 37, 3, 3)
    tied = torch.tensor([0, 1, 15 + 3, 30 + 0, 30 + 2])  # roots, inner nodes, several trees
    w_in, b_in = w_in.clone(), b_in.clone()
    w_in[tied], b_in[tied] = 0.0, 0.0
    nodes64, logits64 = route(x.double(), w_in.double(), b_in.double(), 3, 3)
    assert (logits64 == 0).any() and ((logits64 == 0) | (logits64.abs() > 1e-4)).all()
    got, nodes = native_run(x, w_in, b_in, w_out, 3, 3, isa, grad_y)
    assert torch.equal(nodes, nodes64)
    assert (nodes[:, 0, 1] == 1).all() and (nodes[:, 2, 1] == 31).all()  # roots 0 and 30: left
    want = masked64(x, w_in, b_in, w_out, 3, 3, grad_y)
    for name, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want, strict=True):
        assert_close_rel(a, b, 2e-6, name)
    assert (got[3][tied[:1]] != 0).all()  # the tied root's bias gradient: sum of g/2 terms


@needs_native
def test_off_path_rows_get_exactly_zero_gradient_and_the_check_can_fail():
    x, w_in, b_in, w_out, grad_y = layer_tensors(9, 16, 2, 4)
    got, nodes = native_run(x, w_in, b_in, w_out, 2, 4, ISAS[0], grad_y)
    off = torch.ones(w_in.shape[0], dtype=torch.bool)
    off[nodes.flatten()] = False
    assert off.any() and (got[2][off] == 0).all() and (got[3][off] == 0).all()
    assert (got[4][:, off] == 0).all() and (got[2][~off] != 0).any()
    # negative control: the backward on a route with one leaf moved to its sibling differs
    ops, code = torch.ops.ultrafastbert, build.ISA_CODES[ISAS[0]]
    rows = w_out.t().contiguous()
    _, _, logits = ops.fff_cpu_train_forward(x, w_in, b_in, rows, 2, 4, code)
    broken = nodes.clone()
    broken[0, 0, -1] += 1 if broken[0, 0, -1] % 2 else -1
    bad = ops.fff_cpu_train_backward(grad_y, x, w_in, rows, broken, logits, 2, 4, code)
    want = masked64(x, w_in, b_in, w_out, 2, 4, grad_y)
    with pytest.raises(AssertionError):
        assert_close_rel(bad[1], want[2], 2e-6, "w_in")


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    x, w_in, b_in, w_out, grad_y = layer_tensors(257, 384, 8, 7)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(native_run(x, w_in, b_in, w_out, 8, 7, ISAS[0], grad_y)[0])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@needs_native
def test_bad_node_ids_and_shapes_are_refused():
    x, w_in, b_in, w_out, grad_y = layer_tensors(5, 16, 2, 3)
    ops, code = torch.ops.ultrafastbert, build.ISA_CODES[ISAS[0]]
    rows = w_out.t().contiguous()
    _, nodes, logits = ops.fff_cpu_train_forward(x, w_in, b_in, rows, 2, 3, code)
    wrong_tree = nodes.clone()
    wrong_tree[0, 1, 0] = 0  # tree 1's root replaced by tree 0's
    with pytest.raises(RuntimeError, match="not in its tree"):
        ops.fff_cpu_train_backward(grad_y, x, w_in, rows, wrong_tree, logits, 2, 3, code)
    with pytest.raises(RuntimeError, match="w_out_rows must be a contiguous"):
        ops.fff_cpu_train_forward(x, w_in, b_in, w_out, 2, 3, code)  # (d, M), not rows
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        ops.fff_cpu_train_forward(x.double(), w_in, b_in, rows, 2, 3, code)


# ------------------------------------------------------------------ the layer and the dispatcher

@needs_native
@pytest.mark.parametrize("bias", [True, False])
def test_layer_trains_on_the_native_kernel_with_the_masked_gradients(bias):
    torch.manual_seed(0)
    layer = FFF(48, n_trees=4, depth=5, bias=bias)
    assert layer.train_kernel().name == "native"  # measuring is off in the suite: fixed rule
    x = torch.randn(2, 21, 48, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    params = [p for p in (layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight)
              if p is not None]
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    args = (leaves[0].reshape(-1, 48), leaves[1], leaves[2] if bias else None, leaves[-1])
    want = fff_masked(*args, 4, 5).reshape(2, 21, 48)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    expected = torch.autograd.grad(want.square().sum(), leaves)
    for got, ref in zip([x.grad, *(p.grad for p in params)], expected, strict=True):
        assert_close_rel(got, ref, 1e-5, "grad")


class ClockedKernel(TorchKernel):
    """A training kernel whose forward + backward advances a fake clock by ``cost(tokens)``."""

    now = 0.0

    def __init__(self, name, cost):
        super().__init__()
        self.name, self.cost = name, cost

    def train_forward(self, x, *args):  # noqa: D102
        y, nodes = super().train_forward(x, *args)
        ClockedKernel.now += self.cost(x.shape[0])
        return y, nodes


@pytest.fixture
def clocked(tmp_path, monkeypatch):
    """Two clocked training kernels, measuring on (private cache), a fake clock on which some
    samples take 50 ms longer (another process took the core)."""
    from ultrafastbert.fff.native import tuning

    fast_small = ClockedKernel("fast-small", lambda t: 1e-3 if t < 100 else 1e-3 * t)
    fast_large = ClockedKernel("fast-large", lambda t: 5e-3 * t ** 0.5)
    kernels = {"fast-small": fast_small, "fast-large": fast_large}
    monkeypatch.setattr(dispatch, "registry", lambda: kernels)
    monkeypatch.delenv("ULTRAFASTBERT_AUTOTUNE", raising=False)
    monkeypatch.setenv("ULTRAFASTBERT_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "TRAIN_MEASURED_TOKENS", (4, 256, 1024))
    spikes = itertools.count()

    def clock():
        if next(spikes) % 3 == 2:  # a load spike lands on one sample in three of each kernel
            ClockedKernel.now += 0.05
        return ClockedKernel.now

    calls = []
    real = dispatch.time_training

    def counted(names, shape, dtype):
        calls.append(tuple(names))
        return real(names, shape, dtype, clock=clock)

    monkeypatch.setattr(dispatch, "time_training", counted)
    tuning._MEMO.clear()
    yield calls
    tuning._MEMO.clear()


def test_measured_training_choice_follows_the_clock_and_is_cached(clocked):
    shape = Workload(2, 3, 16)
    choices = dispatch.train_plan("cpu", torch.float32, shape)
    assert clocked == [("fast-small", "fast-large")]
    assert [(c.kernel, c.min_tokens, c.max_tokens) for c in choices] == [
        ("fast-small", 1, 255), ("fast-large", 256, None)]
    assert "measured fastest to train (forward + backward)" in choices[0].reason
    again = dispatch.train_plan("cpu", torch.float32, shape)  # memo: not measured again
    assert again == choices and len(clocked) == 1
    from ultrafastbert.fff.native import tuning

    tuning._MEMO.clear()  # a new process: read back from the cache file
    assert dispatch.train_plan("cpu", torch.float32, shape) == choices and len(clocked) == 1
    # the split trains each call on its range's kernel
    split = dispatch.select("auto", "cpu", torch.float32, training=True, shape=shape)
    assert isinstance(split, dispatch.TrainSplit)
    assert split.kernel_for(4).name == "fast-small" and split.kernel_for(300).name == "fast-large"
    # negative control: one kernel faster everywhere gives one choice
    dispatch.registry()["fast-large"].cost = lambda t: 1e-4
    tuning._MEMO.clear()
    (only,) = dispatch.train_plan("cpu", torch.float32, Workload(2, 4, 16))
    assert only.kernel == "fast-large" and only.min_tokens == 1 and only.max_tokens is None


def test_training_choice_without_measuring_is_the_priority_order(monkeypatch):
    monkeypatch.setenv("ULTRAFASTBERT_AUTOTUNE", "0")
    monkeypatch.setattr(dispatch, "time_training", lambda *a, **k: pytest.fail("measured"))
    (choice,) = dispatch.train_plan("cpu", torch.float32, Workload(8, 7, 384))
    assert choice.kernel == ("native" if native_trains() else "torch")
    (choice,) = dispatch.train_plan("cpu", torch.float64, Workload(8, 7, 384))
    assert choice.kernel == "torch"  # the native kernel trains float32 only
