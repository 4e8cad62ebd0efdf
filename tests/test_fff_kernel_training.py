"""Training goes through the kernel interface: one ``select`` for both modes, the layer names
no kernel, and a forced training kernel is used (checked on the CPU with a stand-in for a GPU
kernel that trains)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ultrafastbert.cli import main
from ultrafastbert.errors import InputError
from ultrafastbert.fff import FFF, FFFRuntime, dispatch, fff_masked
from ultrafastbert.fff import layer as layer_module
from ultrafastbert.fff.pytorch.kernel import TorchKernel


def test_layer_names_no_kernel():
    tree = ast.parse(Path(layer_module.__file__).read_text())
    backends = {"pytorch", "triton", "native", "gemm", "routing", "sparse", "training", "jit"}
    imported = {part for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                for part in n.module.split(".")}
    imported |= {a.name.rpartition(".")[2] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & backends
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and id(n) not in docstrings}
    assert not strings & set(dispatch.registry()), "layer.py names a kernel"


def test_one_select_serves_both_modes():
    reasons = dict(dispatch.explain("cpu", torch.float32, training=True))
    first = "native" if reasons["native"] is None else "torch"  # the native kernel trains too
    assert dispatch.select("auto", "cpu", torch.float32, training=True).name == first
    assert dispatch.select("auto", "cpu", torch.float64, training=True).name == "torch"
    assert reasons["gemm"] == "has no training path (inference only)"
    with pytest.raises(InputError, match="cannot train.*no training path"):
        dispatch.select("gemm", "cpu", torch.float32, training=True)
    with pytest.raises(InputError, match="trains on the weights as they are"):
        dispatch.select("torch", "cpu", torch.float32, "bf16", training=True)
    assert dispatch.select("torch", "cpu", torch.float32, "bf16").name == "torch"  # inference


def test_runtime_names_the_training_kernel():
    assert FFFRuntime().training == "auto"
    assert FFFRuntime("native", training="torch").training == "torch"
    assert FFFRuntime(training="native").training == "native"
    with pytest.raises(InputError, match="no training path"):
        FFFRuntime(training="gemm")
    with pytest.raises(InputError):
        FFFRuntime(training="nope")


def test_kernels_command_covers_training(capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    inference, training = out.split("training:")
    assert "inference:" in inference and "native" in training
    assert "has no training path" in training and "has no training path" not in inference


class StandInGpuKernel(TorchKernel):
    """Trains first in priority order, as the Triton kernel does on CUDA; counts its calls."""

    name = "standin"
    calls = 0

    def train_forward(self, *args):  # noqa: D102
        StandInGpuKernel.calls += 1
        return super().train_forward(*args)


@pytest.fixture
def standin_registry(monkeypatch):
    kernels = {"standin": StandInGpuKernel(), "torch": TorchKernel()}
    monkeypatch.setattr(dispatch, "registry", lambda: kernels)
    StandInGpuKernel.calls = 0
    return kernels


@pytest.mark.parametrize("training, expect_standin", [("auto", True), ("torch", False)])
def test_forcing_torch_training_uses_the_sparse_torch_path(standin_registry, training,
                                                           expect_standin):
    torch.manual_seed(0)
    layer = FFF(24, n_trees=2, depth=3)
    layer.set_runtime(training=training)
    spy = []
    original = TorchKernel.train_forward
    standin_registry["torch"].train_forward = lambda *a: spy.append(1) or original(
        standin_registry["torch"], *a)
    x = torch.randn(9, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert (StandInGpuKernel.calls > 0) == expect_standin
    assert bool(spy) == (not expect_standin)
    grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    x2 = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    fff_masked(x2, layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight, 2, 3
               ).square().sum().backward()
    want = [p.grad for p in layer.parameters()] + [x2.grad]
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
