"""The interface every FFF implementation declares (inference, optionally training), and weight
formats.

An implementation says which devices and dtypes it serves and why it cannot run elsewhere;
``dispatch`` picks one. Implementations take weights in the checkpoint layout and may keep a
packed copy of their own (``pack``); the layer caches that copy and rebuilds it when the
weights change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..errors import InputError

#: ``fp32``: weights as they are (same dtype as the input). ``bf16``: both weight matrices rounded
#: to bfloat16 (half the memory traffic; may change routes). ``bf16-out``: routing weights kept in
#: the input precision, only output rows in bfloat16 (routes identical to ``fp32``). ``int8``:
#: every node row symmetric int8 with one float scale (a quarter of the traffic; may change
#: routes; the ``native-int8`` kernel only).
WEIGHT_FORMATS = ("fp32", "bf16", "bf16-out", "int8")


def validate_weight_format(weight_format: str) -> None:
    """Raise ``ValueError`` naming the allowed set when ``weight_format`` is unknown."""
    if weight_format not in WEIGHT_FORMATS:
        raise InputError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")


class FFFKernel(ABC):
    """One way to run the FFF layer: inference (no autograd) and, optionally, training.

    Subclasses set ``name``, ``description``, ``devices`` (device types such as ``"cpu"``) and
    ``dtypes`` (input dtypes), and may add run-time requirements in ``extra_reason``. A kernel
    that has a training path sets ``trains = True`` and implements :meth:`train_forward`.
    """

    name: str = ""
    description: str = ""
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    weight_formats: tuple[str, ...] = ("fp32",)
    #: Whether :meth:`train_forward` is implemented (the training entry is optional).
    trains: bool = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype,
                           weight_format: str = "fp32", training: bool = False) -> str | None:
        """None when this kernel can run for these inputs, else a sentence saying why not.

        ``training``: for the differentiable forward (weights as they are: format ``fp32``).
        """
        if training and not self.trains:
            return "has no training path (inference only)"
        if training and weight_format != "fp32":
            return f"trains on the weights as they are (format 'fp32'), not {weight_format!r}"
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"supports input dtypes {names}, not {str(dtype).replace('torch.', '')}"
        if weight_format not in self.weight_formats:
            return f"supports weight formats {self.weight_formats}, not {weight_format!r}"
        return self.extra_reason(device)

    def extra_reason(self, device: torch.device) -> str | None:
        """Run-time requirements beyond device and dtype (a compiler, a package)."""
        return None

    def shape_reason(self, n_trees: int | None, depth: int | None) -> str | None:
        """Why this kernel cannot run layers of ``n_trees`` trees of ``depth`` (None: it can;
        both None: the shape is not known, for kernels that serve only some shapes)."""
        return None

    @abstractmethod
    def pack(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
             n_trees: int, depth: int, weight_format: str) -> Any:
        """Build this kernel's inference copy of the weights.

        Args:
            w_in: ``(K*N, d)``; b_in: ``(K*N,)`` or None; w_out: ``(d, K*N)`` (checkpoint layout).
        """

    def train_forward(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
                      w_out: torch.Tensor, n_trees: int, depth: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The differentiable forward (autograd flows to ``x`` and the three weights).

        Optional: kernels that have no training path leave it unimplemented.
        Returns ``y`` ``(T, d)`` and the visited nodes ``(T, K, D+1)``.
        """
        raise NotImplementedError(f"the {self.name} FFF kernel has no training path")

    @abstractmethod
    def forward(self, x: torch.Tensor, packed: Any, n_trees: int, depth: int,
                return_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the layer.

        Args:
            x: ``(T, d)`` contiguous input, ``T >= 1``.
        Returns:
            ``y`` of shape ``(T, d)`` and, when asked, ``nodes`` ``(T, K, D+1)`` int64 global ids.
        """
