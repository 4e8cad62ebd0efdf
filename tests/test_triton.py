"""The Triton FFF kernels against the reference: routes first, then values, then gradients.

Without CUDA the kernels run through Triton's CPU interpreter (small odd shapes: the interpreter
is slow). Tests marked ``gpu`` run the same comparisons on a CUDA device at the paper's shape
(1x11, d 768, 4,096 tokens); they are deselected by default (``make test-gpu`` runs them).

Triton decides once, when it is first imported, whether its kernels are interpreted, so this
module asks for the interpreter (``TRITON_INTERPRET=1``) at import on a machine without CUDA; on a
CUDA machine it leaves Triton compiling real kernels. When another module imported Triton first
(``transformers`` does), :func:`test_interpreter_tests_in_a_fresh_process` runs this file's
interpreter tests in a child process instead, and they are skipped here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ultrafastbert.fff import FFF, dispatch, fff_masked, fff_reference  # noqa: E402
from ultrafastbert.fff.tree import n_nodes, visited_mask  # noqa: E402
from ultrafastbert.fff.triton import kernel as ti  # noqa: E402
from ultrafastbert.fff.triton import routing as tr  # noqa: E402
from ultrafastbert.fff.triton import training as tt  # noqa: E402

INTERPRETED = (not torch.cuda.is_available()) and ti.triton_interpreting()
#: Interpreter tests in a child process: no CUDA, but Triton was imported without the interpreter.
IN_CHILD = not torch.cuda.is_available() and not INTERPRETED
interp = pytest.mark.skipif(not INTERPRETED, reason=(
    "run by test_interpreter_tests_in_a_fresh_process (Triton was imported here before "
    "TRITON_INTERPRET=1)" if IN_CHILD else "needs Triton's CPU interpreter: on CUDA machines "
    "the gpu-marked tests run the compiled kernels"))
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: |logit| below which a route may legitimately differ from the float64 reference.
MARGIN = {torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
#: ||y - ref|| / ||ref|| allowed, by the dtype of the output.
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


# ----------------------------------------------------------------------------- problem set-up

def make_problem(tokens: int, d: int, n_trees: int, depth: int, dtype: torch.dtype,
                 device: str, seed: int, bias: bool = True) -> dict:
    """Random inputs and weights with logits of order 1: ``x`` ``(T, d)``, ``w_in``
    ``(K*N, d)``, ``b_in`` ``(K*N,)`` or None, ``w_out`` ``(d, K*N)`` (checkpoint layout)."""
    gen = torch.Generator().manual_seed(seed)
    width = n_trees * n_nodes(depth)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {"x": rand(tokens, d), "w_in": rand(width, d, scale=d ** -0.5),
            "b_in": rand(width, scale=0.1) if bias else None, "w_out": rand(d, width, scale=0.5),
            "n_trees": n_trees, "depth": depth}


def weights(p: dict) -> tuple:
    """The positional arguments ``(x, w_in, b_in, w_out, n_trees, depth)`` of a problem."""
    return p["x"], p["w_in"], p["b_in"], p["w_out"], p["n_trees"], p["depth"]


def reference(p: dict, weight_format: str = "fp32"):
    """The float64 reference on the same (rounded) inputs; ``y`` stays float64."""
    x, w_in, b_in, w_out, k, depth = weights(p)
    if weight_format == "bf16":
        w_in = w_in.to(torch.bfloat16)
    if weight_format in ("bf16", "bf16-out"):
        w_out = w_out.to(torch.bfloat16)
    bias = b_in.double() if b_in is not None else None
    return fff_reference(x.double(), w_in.double(), bias, w_out.double(), k, depth)


def kernel_for(device: str) -> ti.TritonKernel:
    """The compiled kernel on CUDA, the interpreted one on the CPU."""
    return ti.TritonKernel(interpret=(device == "cpu"))


def run_kernel(p: dict, device: str, weight_format: str = "fp32", config=None):
    """``(y, nodes)`` from the inference kernel."""
    kernel = kernel_for(device)
    packed = kernel.pack(p["w_in"], p["b_in"], p["w_out"], p["n_trees"], p["depth"],
                         weight_format)
    if config is None:
        return kernel.forward(p["x"], packed, p["n_trees"], p["depth"], return_nodes=True)
    y, nodes, _ = tr.fff_forward(p["x"], packed.w_in, packed.b_in, packed.w_out, p["n_trees"],
                                 p["depth"], write_nodes=True, config=config)
    return y, nodes


# ----------------------------------------------------------------------------- comparisons

def near_tie_rows(ref_logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Rows ``(T,)`` bool with a reference path logit within ``margin`` of 0."""
    return (ref_logits.abs() < margin).flatten(1).any(dim=1)


def route_mismatches(nodes: torch.Tensor, ref, margin: float) -> tuple[int, int]:
    """``(rows whose route differs, rows excluded as near ties)``; raises if all are excluded."""
    excluded = near_tie_rows(ref.logits, margin)
    if bool(excluded.all()):
        raise AssertionError("every row is a near tie: nothing left to compare")
    differ = (nodes.cpu() != ref.nodes.cpu()).flatten(1).any(dim=1) & ~excluded.cpu()
    return int(differ.sum()), int(excluded.sum())


def relative_error(y: torch.Tensor, ref_y: torch.Tensor, rows: torch.Tensor | None = None
                   ) -> float:
    """``||y - ref|| / ||ref||`` over ``rows`` (all rows by default); NaN never passes."""
    y, ref_y = y.double().cpu(), ref_y.double().cpu()
    if rows is not None:
        y, ref_y = y[rows.cpu()], ref_y[rows.cpu()]
    err = float((y - ref_y).norm() / ref_y.norm().clamp_min(1e-30))
    return err if err == err else float("inf")


def check_forward(p: dict, device: str, weight_format: str = "fp32", config=None
                  ) -> tuple[int, float]:
    """Routes, then values, against the reference; returns ``(excluded rows, value error)``."""
    ref = reference(p, weight_format)
    y, nodes = run_kernel(p, device, weight_format, config)
    assert nodes.shape == ref.nodes.shape and nodes.dtype == torch.long
    bad, excluded = route_mismatches(nodes, ref, MARGIN[p["x"].dtype])
    assert bad == 0, f"{bad} rows routed differently from the reference"
    assert y.dtype == p["x"].dtype and y.shape == p["x"].shape
    keep = ~near_tie_rows(ref.logits, MARGIN[p["x"].dtype])
    err = relative_error(y, ref.y, keep)
    assert err < REL_TOL[p["x"].dtype], f"relative error {err:.2e}"
    return excluded, err


def grads_of(fn, p: dict, grad_y: torch.Tensor) -> list[torch.Tensor | None]:
    """``[y, dx, dw_in, db_in, dw_out]`` of ``fn(x, w_in, b_in, w_out, n_trees, depth)``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in weights(p)[:4]]
    y = fn(*leaves, p["n_trees"], p["depth"])
    y = y[0] if isinstance(y, tuple) else y
    (y.float() * grad_y.float()).sum().backward()
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def triton_train(device: str):
    """The Triton training forward as a function of the weights."""
    return kernel_for(device).train_forward


def check_gradients(p: dict, device: str, rel_tol: float, seed: int = 1) -> list[float]:
    """Routes (vs the reference), then ``y`` and every gradient against :func:`fff_masked` in
    float64; returns the relative errors."""
    ref = reference(p)
    _, nodes = kernel_for(device).train_forward(*weights(p))
    assert route_mismatches(nodes, ref, MARGIN[p["x"].dtype])[0] == 0
    gen = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(p["x"].shape, generator=gen).to(device)
    got = grads_of(triton_train(device), p, grad_y)
    p64 = {**p, **{k: (v.double() if v is not None else None)
                   for k, v in p.items() if isinstance(v, torch.Tensor) or v is None}}
    want = grads_of(fff_masked, p64, grad_y)
    errors = [relative_error(g, w) for g, w in zip(got, want, strict=True) if w is not None]
    for name, err in zip(("y", "dx", "dw_in", "db_in", "dw_out"), errors, strict=False):
        assert err < rel_tol, f"{name}: relative error {err:.2e}"
    return errors


# ----------------------------------------------------------------------------- interpreter: forward

SHAPES = [  # (tokens, d, n_trees, depth)
    (1, 37, 1, 3), (13, 37, 3, 3), (13, 37, 5, 0), (13, 16, 2, 1), (40, 37, 1, 5), (13, 37, 1, 1),
]


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-d{}-{}x{}".format(*s))
def test_forward_fp32_routes_then_values(shape):
    excluded, _ = check_forward(make_problem(*shape, torch.float32, "cpu", seed=sum(shape)), "cpu")
    assert excluded <= max(1, shape[0] // 10)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(13, 37, 3, 3), (40, 37, 1, 5)], ids=["T13-3x3", "T40-1x5"])
def test_forward_low_precision(dtype, shape):
    """bf16/fp16 inputs: rows near a tie excluded and counted, values within the dtype's bound."""
    excluded, _ = check_forward(make_problem(*shape, dtype, "cpu", seed=7), "cpu")
    assert excluded <= max(1, shape[0] // 10)


@interp
@pytest.mark.parametrize("weight_format", ["bf16", "bf16-out"])
def test_forward_weight_formats(weight_format):
    check_forward(make_problem(13, 37, 3, 3, torch.float32, "cpu", seed=3), "cpu", weight_format)


@interp
def test_forward_several_programs_and_exact_tile():
    """Token tiles of 4 (several programs, a partial last one) and d equal to the tile width."""
    config = tr.LaunchConfig(block_t=4, block_d=32, num_warps=4)
    check_forward(make_problem(13, 32, 2, 3, torch.float32, "cpu", seed=5), "cpu", config=config)


@interp
def test_exact_zero_goes_left_and_nan_goes_left():
    p = make_problem(5, 8, 1, 2, torch.float32, "cpu", seed=11)
    p["w_in"][0].zero_()
    p["b_in"][0] = 0.0  # root logit exactly 0 for every token: left child (node 1)
    p["w_in"][1].zero_()
    p["b_in"][1] = 0.0  # and again: node 3
    p["x"][4] = float("nan")
    y, nodes = run_kernel(p, "cpu")
    assert nodes[:4, 0, :2].tolist() == [[0, 1]] * 4
    assert (nodes[:, 0, 2] == 3).all()  # the NaN row's logits are NaN: left every time
    assert torch.isnan(y[4]).all() and torch.isfinite(y[:4]).all()
    p["b_in"][0] = 1e-30  # control: the smallest positive logit goes right
    assert (run_kernel(p, "cpu")[1][:4, 0, 1] == 2).all()


@interp
def test_off_path_weights_do_not_change_output():
    p = make_problem(13, 37, 3, 3, torch.float32, "cpu", seed=13)
    y, nodes = run_kernel(p, "cpu")
    off = ~visited_mask(nodes.reshape(13, 3, -1), 3, 3).any(dim=0)
    assert off.any()
    q = {**p, "w_in": p["w_in"].clone(), "b_in": p["b_in"].clone(), "w_out": p["w_out"].clone()}
    q["w_in"][off] = 1e3
    q["b_in"][off] = -1e3
    q["w_out"][:, off] = 1e3
    y2, nodes2 = run_kernel(q, "cpu")
    assert torch.equal(nodes, nodes2) and torch.equal(y, y2)
    q["w_out"][:, ~off] *= 1.001  # control: an on-path output weight does change it
    assert not torch.equal(y, run_kernel(q, "cpu")[0])


# ------------------------------------------------------------------------ interpreter: training

GRAD_SHAPES = [(13, 37, 3, 3, True), (1, 37, 1, 3, True), (13, 37, 4, 0, False),
               (13, 16, 2, 1, True)]


@interp
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "T{}-d{}-{}x{}-bias{}".format(*s))
def test_gradients_match_masked_fp32(shape):
    p = make_problem(*shape[:4], torch.float32, "cpu", seed=21, bias=shape[4])
    check_gradients(p, "cpu", rel_tol=1e-5)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_low_precision(dtype):
    check_gradients(make_problem(13, 37, 3, 3, dtype, "cpu", seed=22), "cpu", rel_tol=1e-2)


@interp
def test_gradients_zero_on_unvisited_nodes():
    p = make_problem(13, 37, 1, 5, torch.float32, "cpu", seed=23)
    _, dx, dw_in, db_in, dw_out = grads_of(triton_train("cpu"), p, torch.ones(13, 37))
    _, nodes = run_kernel(p, "cpu")
    off = ~visited_mask(nodes, 1, 5).any(dim=0)
    assert off.sum() > 0
    assert (dw_in[off] == 0).all() and (db_in[off] == 0).all() and (dw_out[:, off] == 0).all()
    assert (dw_in[~off] != 0).any(dim=1).all()


@interp
def test_weight_gradient_scan_path_matches_dot_path():
    """The GPU's segmented scan, run once at a tiny size (the interpreter runs it per element)."""
    p = make_problem(6, 16, 2, 2, torch.float32, "cpu", seed=24)
    w_out_rows = p["w_out"].t().contiguous()
    _, nodes, logits = tr.fff_forward(p["x"], p["w_in"], p["b_in"], w_out_rows, 2, 2,
                                      write_nodes=True, write_logits=True)
    grad_y = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for by_dot in (True, False):
        config = tr.LaunchConfig(16, 16, 4, chunk=16, block_dw=16, segments_by_dot=by_dot)
        results.append(tt.fff_backward(grad_y, p["x"], p["w_in"], w_out_rows, nodes, logits,
                                       True, config=config))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@interp
def test_frozen_weights_and_zero_tokens():
    p = make_problem(13, 37, 3, 3, torch.float32, "cpu", seed=25)
    x = p["x"].clone().requires_grad_()
    y, _ = ti.TritonKernel(interpret=True).train_forward(x, p["w_in"], p["b_in"], p["w_out"], 3, 3)
    y.sum().backward()
    want = torch.autograd.grad(fff_masked(x, p["w_in"], p["b_in"], p["w_out"], 3, 3).sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
    empty = make_problem(0, 37, 3, 3, torch.float32, "cpu", seed=25)
    y0, nodes0 = run_kernel(empty, "cpu")
    assert y0.shape == (0, 37) and nodes0.shape == (0, 3, 4)


# ----------------------------------------------------------------------------- interpreter: layer

@interp
def test_layer_uses_triton_for_inference_and_training(monkeypatch):
    monkeypatch.setenv(ti.INTERPRET_ENV, "1")
    calls = []
    original = ti.TritonKernel.train_forward
    monkeypatch.setattr(ti.TritonKernel, "train_forward",
                        lambda self, *a: calls.append(1) or original(self, *a))
    torch.manual_seed(0)
    layer = FFF(37, n_trees=3, depth=3)
    x = torch.randn(2, 7, 37)
    layer.set_runtime("triton")
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
        layer.set_runtime("torch")
        y_torch, nodes_torch = layer.forward_with_nodes(x)
    assert torch.equal(nodes, nodes_torch)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-6)
    layer(x).square().sum().backward()
    assert calls, "the layer's training path did not use the Triton kernel"
    grads = [t.grad.clone() for t in layer.parameters()]
    layer.zero_grad()
    w = layer.linear_in
    fff_masked(x.reshape(-1, 37), w.weight, w.bias, layer.linear_out.weight, 3, 3
               ).square().sum().backward()
    for got, t in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- negative controls

@interp
def test_controls_each_comparison_can_fail():
    p = make_problem(13, 37, 3, 3, torch.float32, "cpu", seed=31)
    ref = reference(p)
    y, nodes = run_kernel(p, "cpu")
    flipped = nodes.clone()
    flipped[5, 1, 3] += 1 if int(flipped[5, 1, 3]) % 2 else -1  # the sibling leaf
    assert route_mismatches(flipped, ref, MARGIN[torch.float32])[0] == 1
    with pytest.raises(AssertionError, match="near tie"):
        route_mismatches(nodes, ref, margin=1e9)
    assert relative_error(y * (1 + 1e-4), ref.y) > REL_TOL[torch.float32]
    nan_y = y.clone()
    nan_y[0, 0] = float("nan")
    assert relative_error(nan_y, ref.y) == float("inf")
    low = make_problem(13, 37, 3, 3, torch.bfloat16, "cpu", seed=31)
    low_y, _ = run_kernel(low, "cpu")
    assert relative_error(low_y.float() * 1.02, reference(low).y) > REL_TOL[torch.bfloat16]


@interp
def test_controls_gradient_comparison_can_fail():
    p = make_problem(13, 37, 3, 3, torch.float32, "cpu", seed=32)
    grad_y = torch.randn(13, 37, generator=torch.Generator().manual_seed(1))
    got = grads_of(triton_train("cpu"), p, grad_y)
    other = grads_of(triton_train("cpu"), p, grad_y * (1 + 1e-3 * torch.rand(13, 37)))
    assert all(relative_error(a, b) > 1e-5 for a, b in zip(got[1:], other[1:], strict=True))


@interp
def test_scan_failure_falls_back_to_the_product_variant(monkeypatch, caplog):
    """A Triton that cannot compile the segmented scan gets the 0/1-product variant, logged."""
    monkeypatch.setattr(tt, "_SCAN_FAILED", {})
    module = tr.kernel_module()
    real = module.fff_backward_weight_kernel

    class ScanFails:
        def __getitem__(self, grid):
            def launch(*args, SEGMENTS_BY_DOT, **kwargs):
                if not SEGMENTS_BY_DOT:
                    raise RuntimeError("scan does not compile")
                real[grid](*args, SEGMENTS_BY_DOT=SEGMENTS_BY_DOT, **kwargs)
            return launch

    p = make_problem(6, 16, 2, 2, torch.float32, "cpu", seed=26)
    w_out_rows = p["w_out"].t().contiguous()
    _, nodes, logits = tr.fff_forward(p["x"], p["w_in"], p["b_in"], w_out_rows, 2, 2,
                                      write_nodes=True, write_logits=True)
    grad_y = torch.ones(6, 16)
    want = tt.fff_backward(grad_y, p["x"], p["w_in"], w_out_rows, nodes, logits, True)
    monkeypatch.setattr(module, "fff_backward_weight_kernel", ScanFails())
    config = tr.LaunchConfig(16, 16, 4, chunk=16, block_dw=16, segments_by_dot=False)
    got = tt.fff_backward(grad_y, p["x"], p["w_in"], w_out_rows, nodes, logits, True,
                          config=config)
    assert "cpu" in tt._SCAN_FAILED and "0/1-product" in caplog.text
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not IN_CHILD, reason="the interpreter tests run in this process")
def test_interpreter_tests_in_a_fresh_process():
    """This file's interpreter tests, in a process where Triton starts in interpreter mode."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(Path(__file__).resolve()), "-k", "not compile_for_gpus and not fresh_process"]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout


# ----------------------------------------------------------------------------- GPU build, no GPU

#: Compiles every kernel for a CUDA architecture through Triton's own ptxas (no GPU needed), with
#: the default GPU tiles at d 768 and depth 11; argv: architecture (90) and input dtype.
_COMPILE_SCRIPT = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ultrafastbert.fff.triton import jit as k
from ultrafastbert.fff.triton.routing import launch_config

cfg = launch_config(768, torch.device("cuda"))
arch, dt = int(sys.argv[1]), sys.argv[2]
target = GPUTarget("cuda", arch, 32)

def build(fn, sig, consts, warps):
    sig = {**{n: t for n, t in zip(fn.arg_names, sig)}, **{c: "constexpr" for c in consts}}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=target, options={"num_warps": warps})
    assert compiled.asm.get("cubin"), fn.__name__

ints = ["i32"] * 4
build(k.fff_forward_kernel, [f"*{dt}", f"*{dt}", "*fp32", f"*{dt}", f"*{dt}", "*i64", "*fp32"]
      + ints, dict(DEPTH=11, HAS_BIAS=True, WRITE_NODES=True, WRITE_LOGITS=True,
                   BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d), cfg.num_warps)
build(k.fff_backward_input_kernel, [f"*{dt}", f"*{dt}", f"*{dt}", "*i64", "*fp32", f"*{dt}",
      "*fp32"] + ints[:3], dict(BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d), cfg.num_warps)
for by_dot in (False, True):
    build(k.fff_backward_weight_kernel, ["*i64", "*i64", f"*{dt}", f"*{dt}", "*fp32", "*fp32",
          "*fp32", "*fp32", "*fp32"] + ints[:3], dict(HAS_BIAS=True, SEGMENTS_BY_DOT=by_dot,
          CHUNK=cfg.chunk, BLOCK_D=cfg.block_dw), cfg.warps_w)
print("compiled")
"""


@pytest.mark.parametrize("arch,dtype", [(90, "bf16"), (80, "fp32")])
def test_kernels_compile_for_gpus_without_one(arch, dtype):
    """The interpreter does not check what the GPU compiler rejects (non-constexpr globals,
    unsupported scans): build real sm_90 / sm_80 binaries, in a process without the
    interpreter."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton cannot compile ahead of time: {err}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


# ----------------------------------------------------------------------------- availability

def test_cpu_needs_explicit_opt_in(monkeypatch):
    monkeypatch.delenv(ti.INTERPRET_ENV, raising=False)
    reasons = dict(dispatch.explain("cpu", torch.float32))
    assert ti.INTERPRET_ENV in reasons["triton"]
    assert dispatch.select("auto", "cpu", torch.float32).name != "triton"
    with pytest.raises(ValueError, match="triton"):
        dispatch.select("triton", "cpu", torch.float32)
    with pytest.raises(ValueError, match=ti.INTERPRET_ENV):
        ti.TritonKernel().forward(torch.zeros(1, 4), None, 1, 0)


def test_dtype_and_cuda_reasons():
    kernel = ti.TritonKernel(interpret=True)
    assert "float64" in kernel.unavailable_reason(torch.device("cpu"), torch.float64)
    if not torch.cuda.is_available():
        assert "CUDA" in ti.TritonKernel().unavailable_reason(torch.device("cuda"), torch.float32)


def test_missing_triton_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "triton", None)
    reason = ti.TritonKernel().unavailable_reason(torch.device("cuda"), torch.float32)
    assert "install ultrafastbert[triton]" in reason
    assert "install ultrafastbert[triton]" in ti.TritonKernel(interpret=True).unavailable_reason(
        torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------- GPU (make test-gpu)

PAPER = (4096, 768, 1, 11)  # tokens, d_model, n_trees, depth: UltraFastBERT-1x11


def paper_problem(dtype: torch.dtype, seed: int) -> dict:
    """The paper's layer with the released init scale (N(0, 0.02)) and unit-scale inputs."""
    p = make_problem(*PAPER, dtype, "cuda", seed=seed)
    p["w_in"] = (p["w_in"].float() * 0.02 * 768 ** 0.5).to(dtype)
    p["w_out"] = (p["w_out"].float() * 0.04).to(dtype)
    return p


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_forward_paper_shape(dtype):
    excluded, _ = check_forward(paper_problem(dtype, seed=1), "cuda")
    assert excluded < PAPER[0] * 0.05


@gpu
@needs_cuda
@pytest.mark.parametrize("weight_format", ["bf16", "bf16-out"])
def test_gpu_forward_weight_formats(weight_format):
    check_forward(paper_problem(torch.float32, seed=2), "cuda", weight_format)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", SHAPES + [(13, 768, 16, 7)],
                         ids=lambda s: "T{}-d{}-{}x{}".format(*s))
def test_gpu_forward_odd_shapes(shape):
    for dtype in (torch.float32, torch.bfloat16):
        check_forward(make_problem(*shape, dtype, "cuda", seed=sum(shape)), "cuda")


@gpu
@needs_cuda
def test_gpu_gradients_paper_shape():
    torch.backends.cuda.matmul.allow_tf32 = False  # fff_masked's reference GEMMs in true fp32
    check_gradients(paper_problem(torch.float32, seed=3), "cuda", rel_tol=1e-5)
    check_gradients(paper_problem(torch.bfloat16, seed=4), "cuda", rel_tol=1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "T{}-d{}-{}x{}-bias{}".format(*s))
def test_gpu_gradients_odd_shapes(shape):
    p = make_problem(*shape[:4], torch.float32, "cuda", seed=21, bias=shape[4])
    check_gradients(p, "cuda", rel_tol=1e-5)


@gpu
@needs_cuda
def test_gpu_tie_offpath_and_determinism():
    p = make_problem(64, 768, 1, 11, torch.float32, "cuda", seed=5)
    p["w_in"][0].zero_()
    p["b_in"][0] = 0.0
    y, nodes = run_kernel(p, "cuda")
    assert (nodes[:, 0, 1] == 1).all()
    off = ~visited_mask(nodes, 1, 11).any(dim=0)
    q = {**p, "w_in": p["w_in"].clone(), "w_out": p["w_out"].clone()}
    q["w_in"][off] = 1e3
    q["w_out"][:, off] = 1e3
    assert torch.equal(run_kernel(q, "cuda")[0], y)
    grad_y = torch.randn(64, 768, device="cuda")
    first, second = (grads_of(triton_train("cuda"), p, grad_y) for _ in range(2))
    assert torch.equal(first[1], second[1])  # grad_x: deterministic
    for a, b in zip(first[2:], second[2:], strict=True):  # weights: fp32 atomics, order may vary
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@gpu
@needs_cuda
def test_gpu_layer_auto_picks_triton():
    layer = FFF(768, n_trees=1, depth=11, device="cuda")
    assert layer.kernel().name == "triton"
    x = torch.randn(4, 128, 768, device="cuda")
    with torch.no_grad():
        y, nodes = layer.forward_with_nodes(x)
    flat = x.reshape(-1, 768)
    ref = fff_reference(flat.double(), layer.linear_in.weight.double(),
                        layer.linear_in.bias.double(), layer.linear_out.weight.double(), 1, 11)
    assert route_mismatches(nodes.reshape(-1, 1, 12), ref, 1e-4)[0] == 0
    assert relative_error(y.reshape(-1, 768), ref.y) < 1e-5


@interp
def test_forcing_torch_training_skips_triton(monkeypatch):
    # Where Triton can train (CUDA; here its interpreter), training="torch" takes the sparse
    # PyTorch path instead.
    from ultrafastbert.fff.pytorch.kernel import TorchKernel

    monkeypatch.setenv(ti.INTERPRET_ENV, "1")
    calls = {"triton": 0, "torch": 0}
    for cls, name in ((ti.TritonKernel, "triton"), (TorchKernel, "torch")):
        original = cls.train_forward
        monkeypatch.setattr(cls, "train_forward", lambda self, *a, _o=original, _n=name: (
            calls.__setitem__(_n, calls[_n] + 1), _o(self, *a))[1])
    torch.manual_seed(0)
    layer = FFF(37, n_trees=2, depth=3)
    x = torch.randn(5, 37)
    assert layer.train_kernel().name == "triton"
    layer(x).sum().backward()
    assert calls == {"triton": 1, "torch": 0}
    layer.set_runtime(training="torch")
    assert layer.train_kernel().name == "torch"
    layer(x).sum().backward()
    assert calls == {"triton": 1, "torch": 1}


@interp
def test_custom_ops_match_the_launches_and_have_fakes(monkeypatch):
    # torch.compile calls the Triton kernels through these operators; their fake
    # implementations must give the real outputs' shapes and dtypes.
    monkeypatch.setenv(ti.INTERPRET_ENV, "1")
    forward_op, backward_op = ti.custom_ops()
    p = make_problem(7, 16, 2, 2, torch.float32, "cpu", seed=3)
    rows = p["w_out"].t().contiguous()
    args = (p["x"], p["w_in"], p["b_in"], rows, 2, 2, True, True)
    torch.library.opcheck(forward_op, args, test_utils=("test_schema", "test_faketensor"))
    y, nodes, logits = forward_op(*args)
    want_y, want_nodes, _ = tr.fff_forward(p["x"], p["w_in"], p["b_in"], rows, 2, 2,
                                           write_nodes=True, write_logits=True)
    assert torch.equal(y, want_y) and torch.equal(nodes, want_nodes)
    grad_y = torch.randn_like(y)
    back = (grad_y, p["x"], p["w_in"], rows, nodes, logits, True, True)
    torch.library.opcheck(backward_op, back, test_utils=("test_schema", "test_faketensor"))
    assert [g.shape for g in backward_op(*back)] == [
        y.shape, p["w_in"].shape, p["b_in"].shape, p["w_in"].shape]
