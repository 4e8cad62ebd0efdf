"""The FFF layer as an ``nn.Module`` with the released checkpoints' parameter names."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, InputTypeError
from ..utils.cache import PackedCache, fingerprint
from . import dispatch
from .kernel import FFFKernel, validate_weight_format
from .tree import n_nodes, validate_tree_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FFFRuntime:
    """Which kernels run the layer (never what it computes beyond tolerance).

    implementation: the inference kernel, ``"auto"`` or a registered name
        (``ultrafastbert kernels`` lists them).
    weight_format: ``fp32`` | ``bf16`` | ``bf16-out`` for inference (see
        ``kernel.WEIGHT_FORMATS``); training always uses the weights as they are.
    training: the kernel of the differentiable forward, ``"auto"`` (on the CPU the fastest
        measured for the layer's shape, else the first that trains here; see
        ``dispatch.train_plan``) or the name of a kernel with a training path.
    """

    implementation: str = "auto"
    weight_format: str = "fp32"
    training: str = "auto"

    def __post_init__(self) -> None:
        validate_weight_format(self.weight_format)
        kernels = dispatch.registry()
        known = ("auto", *kernels)
        if self.implementation not in known:
            raise InputError(f"unknown FFF implementation {self.implementation!r}; choose one "
                             f"of {known}")
        trainers = ("auto", *(name for name, k in kernels.items() if k.trains))
        if self.training not in trainers:
            raise InputError(f"FFF training kernel {self.training!r} is unknown or has no "
                             f"training path; choose one of {trainers}")


@torch.library.custom_op("ultrafastbert::fff_infer", mutates_args=())
def fff_infer(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
              w_out: torch.Tensor, n_trees: int, depth: int, implementation: str,
              weight_format: str) -> torch.Tensor:
    """The inference forward as one operator, ``x`` ``(T, d)`` -> ``(T, d)``, for code compiled
    by ``torch.compile`` (the layer's packed-weight cache reads ``data_ptr``, which Dynamo
    cannot trace). Packed weights are cached here per parameter identity/version/storage."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    params = (w_in, b_in, w_out)
    key = fingerprint(params, (x.dtype, n_trees, depth, implementation, weight_format))
    cache = _COMPILED_CACHE.get(key[1][0])
    hit = None if cache is None else cache.lookup(key)
    if hit is None:
        kernel = dispatch.select(implementation, w_in.device, x.dtype, weight_format,
                                 shape=dispatch.Workload(n_trees, depth, w_in.shape[1]))
        with torch.no_grad():
            packed = kernel.pack(w_in, b_in, w_out, n_trees, depth, weight_format)
        cache = _COMPILED_CACHE.setdefault(key[1][0], PackedCache())
        hit = cache.store(params, key, (kernel, packed))
    with torch.no_grad():
        return hit[0].forward(x.contiguous(), hit[1], n_trees, depth, False)[0]


@fff_infer.register_fake
def _(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
      n_trees: int, depth: int, implementation: str, weight_format: str) -> torch.Tensor:
    return x.new_empty(x.shape)


#: fff_infer's packed weights, one cache per ``linear_in.weight`` (by id).
_COMPILED_CACHE: dict[int, PackedCache] = {}


def _compiled_inference(layer: FFF, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` under ``torch.compile`` without autograd: :func:`fff_infer` on ``(T, d)``."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(layer.linear_in.weight.dtype)
    flat = x.reshape(-1, layer.d_model)
    y = fff_infer(flat, layer.linear_in.weight, layer.linear_in.bias, layer.linear_out.weight,
                  layer.n_trees, layer.depth, layer.runtime.implementation,
                  layer.runtime.weight_format)
    return y.reshape(x.shape)


def _autocast_on(x: object) -> bool:
    """Whether autocast is active for ``x``'s device (False for devices without autocast)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda", "xpu", "mps"):
        return False
    return torch.is_autocast_enabled(x.device.type)


class FFF(nn.Module):
    """Fast feedforward layer: ``n_trees`` binary trees of ``depth`` decisions (docs/design.md §1.1).

    Parameters use the released checkpoints' names: ``linear_in.weight`` ``(K*N, d)``,
    ``linear_in.bias`` ``(K*N,)``, ``linear_out.weight`` ``(d, K*N)`` with ``N = 2**(D+1)-1``.

    Forward takes ``(..., d_model)`` and returns the same shape. When autograd needs gradients it
    uses the sparse training path (visited nodes only); otherwise the dispatcher's kernel.
    Zero-size inputs give zero-size outputs; NaN logits route left and NaN inputs give NaN rows.
    """

    def __init__(self, d_model: int, *, n_trees: int, depth: int, bias: bool = True,
                 runtime: FFFRuntime | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        validate_tree_shape(n_trees, depth)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise InputError(f"d_model must be an int >= 1, got {d_model!r}")
        self.d_model, self.n_trees, self.depth = d_model, n_trees, depth
        width = n_trees * n_nodes(depth)
        self.linear_in = nn.Linear(d_model, width, bias=bias, device=device, dtype=dtype)
        self.linear_out = nn.Linear(width, d_model, bias=False, device=device, dtype=dtype)
        #: (kernel, its packed weights, device) for inference; see utils.cache.PackedCache
        self._cache = PackedCache()
        self.runtime = runtime or FFFRuntime()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released recipe's effective init: weights ~ N(0, 0.02), bias 0."""
        nn.init.normal_(self.linear_in.weight, std=0.02)
        nn.init.normal_(self.linear_out.weight, std=0.02)
        if self.linear_in.bias is not None:
            nn.init.zeros_(self.linear_in.bias)
        self._cache.clear()

    @property
    def n_neurons(self) -> int:
        """Total neurons ``K * (2**(D+1) - 1)``."""
        return self.linear_in.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_trees={self.n_trees}, depth={self.depth}, "
                f"bias={self.linear_in.bias is not None}, runtime={self.runtime}")

    @property
    def runtime(self) -> FFFRuntime:
        """The inference kernel choice and weight format."""
        return self._runtime

    @runtime.setter
    def runtime(self, value: FFFRuntime) -> None:
        if not isinstance(value, FFFRuntime):
            raise InputTypeError(f"runtime must be an FFFRuntime, got {type(value).__name__}")
        self._runtime = value
        self._cache.clear()

    def set_runtime(self, implementation: str = "auto", weight_format: str = "fp32",
                    training: str = "auto") -> None:
        """Choose the inference kernel and weight format, and the training kernel
        (availability is checked at the next call)."""
        self.runtime = FFFRuntime(implementation, weight_format, training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d_model)`` -> ``(..., d_model)``."""
        if torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (
                x.requires_grad or self._needs_param_grad())):
            return _compiled_inference(self, x)  # one opaque op: no graph break
        y = self._repeat_inference(x)
        if y is not None:
            return y
        return self.forward_with_nodes(x, return_nodes=False)[0]

    def _repeat_inference(self, x: object) -> torch.Tensor | None:
        """The common inference call with little Python around the kernel, or None.

        Applies only when nothing changed since the packed copy was built: no autograd, no
        autocast, a contiguous ``(T, d)`` input of the cached dtype and device, and the same
        parameter tensors at the same versions and storage (the cache checks those). Anything
        else takes the general path, which validates the input and rebuilds the cache. (At one
        token the general path's checks cost several times the kernel itself.)
        """
        if (type(x) is not torch.Tensor or torch.is_grad_enabled()
                or torch._C._is_any_autocast_enabled()):
            return None
        hit = self._cache.lookup(self._key(x.dtype))
        if (hit is None or x.dim() != 2 or x.shape[1] != self.d_model or x.shape[0] == 0
                or not x.is_contiguous() or x.device != hit[2]):
            return None
        return hit[0].forward(x, hit[1], self.n_trees, self.depth, False)[0]

    def _params(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(w_in, b_in, w_out)``."""
        return self.linear_in.weight, self.linear_in.bias, self.linear_out.weight

    def _key(self, dtype: torch.dtype) -> tuple:
        """The cache key of the current parameters for inputs of ``dtype``: the same tuple as
        ``utils.cache.fingerprint((w_in, b_in, w_out), dtype)``, built inline and read through
        the module dicts (much cheaper than attribute access, which matters at one token)."""
        lin = self._modules["linear_in"]._parameters  # type: ignore[union-attr]
        w, b = lin["weight"], lin.get("bias")
        o = self._modules["linear_out"]._parameters["weight"]  # type: ignore[union-attr]
        return (dtype, (id(w), w._version, w.data_ptr()),  # type: ignore[union-attr]
                None if b is None else (id(b), b._version, b.data_ptr()),
                (id(o), o._version, o.data_ptr()))  # type: ignore[union-attr]

    def forward_with_nodes(self, x: torch.Tensor, return_nodes: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output ``(..., d)`` and the visited nodes ``(..., K, D+1)`` (int64 global ids).

        Under autocast the layer computes in its own parameter dtype (routing is precision
        sensitive and the layer is memory-bound, so low-precision matmuls would gain little).
        """
        if _autocast_on(x):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward_with_nodes(x.to(self.linear_in.weight.dtype), return_nodes)
        flat = self._check_input(x)
        lead = x.shape[:-1]
        if flat.shape[0] == 0:
            nodes = torch.empty(*lead, self.n_trees, self.depth + 1, dtype=torch.long,
                                device=x.device) if return_nodes else None
            return x.new_zeros(x.shape), nodes
        if torch.is_grad_enabled() and (x.requires_grad or self._needs_param_grad()):
            y, nodes = self._train_forward(flat, return_nodes)
        else:
            y, nodes = self._infer(flat, return_nodes)
        if nodes is not None:
            nodes = nodes.reshape(*lead, self.n_trees, self.depth + 1)
        return y.reshape(x.shape), nodes

    def _needs_param_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate and flatten to a contiguous ``(T, d)`` view or copy."""
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"FFF input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputTypeError(f"FFF input must be a floating-point tensor, got {x.dtype}; "
                                 "convert it with x.float()")
        weight = self.linear_in.weight
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise InputError(f"FFF input's last dimension must be d_model={self.d_model}, got "
                             f"shape {tuple(x.shape)}")
        if x.device != weight.device:
            raise InputError(f"FFF input is on {x.device} but the layer is on {weight.device}; "
                             "move one of them with .to(device)")
        if x.dtype != weight.dtype:
            raise InputTypeError(f"FFF input dtype {x.dtype} differs from the layer's {weight.dtype}; "
                                 f"cast the input or call layer.to({x.dtype})")
        return x.reshape(-1, self.d_model).contiguous()

    def _train_forward(self, flat: torch.Tensor, return_nodes: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The differentiable forward of the training kernel (visited nodes only)."""
        kernel = self.train_kernel(flat.dtype)
        y, nodes = kernel.train_forward(flat, self.linear_in.weight, self.linear_in.bias,
                                        self.linear_out.weight, self.n_trees, self.depth)
        return y, (nodes if return_nodes else None)

    def kernel(self, dtype: torch.dtype | None = None) -> FFFKernel:
        """The inference kernel the dispatcher picks for this layer's device, ``dtype`` and
        shape (``"auto"``: by the cost rule, possibly a ``dispatch.TokenSplit`` by call size)."""
        return dispatch.select(self.runtime.implementation, self.linear_in.weight.device,
                               dtype or self.linear_in.weight.dtype, self.runtime.weight_format,
                               shape=dispatch.Workload(self.n_trees, self.depth, self.d_model))

    def train_kernel(self, dtype: torch.dtype | None = None) -> FFFKernel:
        """The training kernel the dispatcher picks (``runtime.training``) for this layer's
        device, ``dtype`` and shape: on CUDA the Triton kernel when it can run; on the CPU
        the native or the sparse PyTorch path, measured (``dispatch.train_plan``)."""
        return dispatch.select(self.runtime.training, self.linear_in.weight.device,
                               dtype or self.linear_in.weight.dtype, training=True,
                               shape=dispatch.Workload(self.n_trees, self.depth, self.d_model))

    def _infer(self, flat: torch.Tensor, return_nodes: bool):
        kernel, packed = self._kernel_and_packed(flat.dtype)
        if not torch.is_grad_enabled():  # the common case: skip the context manager's cost
            return kernel.forward(flat, packed, self.n_trees, self.depth, return_nodes)
        with torch.no_grad():
            return kernel.forward(flat, packed, self.n_trees, self.depth, return_nodes)

    def _kernel_and_packed(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """The selected kernel and its packed weights, cached until a parameter changes
        (in place or replaced; see :class:`~ultrafastbert.utils.cache.PackedCache`)."""
        params, key = self._params(), self._key(dtype)
        hit = self._cache.lookup(key)
        if hit is not None:
            return hit[0], hit[1]
        kernel = self.kernel(dtype)
        logger.debug("packing FFF weights for kernel %s", kernel.name)
        with torch.no_grad():
            packed = kernel.pack(*params, self.n_trees, self.depth, self.runtime.weight_format)
        self._cache.store(params, key, (kernel, packed, params[0].device))
        return kernel, packed

    def train(self, mode: bool = True) -> FFF:
        """Switch mode; drops the packed inference copy (training will change the weights)."""
        self._cache.clear()
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FFF:
        """``.to()``, ``.half()`` ...: the packed copy belongs to the old tensors."""
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)
