"""What every model class shares: checkpoint I/O, FFF kernel choice, parameter count."""

from __future__ import annotations

import os
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from ..fff import FFF, FFFRuntime, dispatch
from . import checkpoint
from .config import ModelConfig

_M = TypeVar("_M", bound="PretrainedMixin")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``set_fff_runtime`` / ``num_parameters``.

    Mixed into ``nn.Module`` subclasses that set ``self.config``.
    """

    config: ModelConfig
    #: Prefix of this class's tensors in a checkpoint (the bare encoder's are ``encoder.*``).
    checkpoint_prefix: ClassVar[str] = ""
    #: State-dict keys that alias another tensor and are not stored (a tied decoder).
    tied_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        checkpoint.register_model_class(cls)

    def save_pretrained(self, directory: str | os.PathLike,
                        tokenizer_file: str | os.PathLike | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) atomically to ``directory``.

        ``tokenizer_file`` defaults to the ``tokenizer.json`` of the directory the model was
        loaded from, when there was one.
        """
        checkpoint.save_pretrained(cast(nn.Module, self), directory, tokenizer_file=tokenizer_file)

    @classmethod
    def from_pretrained(cls: type[_M], directory: str | os.PathLike, **changes: Any) -> _M:
        """Load a checkpoint directory (ours or the released crammedBERT format).

        ``changes`` edit the config, e.g. ``num_labels=3`` to start a classifier from a
        pretrained encoder (the new head is initialised; the encoder must load completely).
        """
        return cast(_M, checkpoint.from_pretrained(directory, model_class=cls, **changes))

    def set_fff_runtime(self, implementation: str = "auto", weight_format: str = "fp32",
                        training: str = "auto") -> None:
        """Choose the inference kernel and weight format, and the training kernel, of every FFF
        block (``FFFRuntime``)."""
        set_fff_runtime(self, implementation, weight_format, training)  # type: ignore[arg-type]

    def set_precision(self, dtype: torch.dtype, fff_dtype: torch.dtype | None = None
                      ) -> PretrainedMixin:
        """Cast the model to ``dtype``, its FFF blocks to ``fff_dtype`` (default ``dtype``).

        ``torch.bfloat16`` on the CPU: the linear layers run oneDNN's bf16 GEMMs on prepacked
        weights (AMX where the CPU has it) and the FFF blocks the native bf16 kernel
        (docs/precision.md). ``fff_dtype=torch.float32`` keeps the FFF blocks in float32 (their
        inputs and outputs are cast on the way); see :func:`fff_compute_dtype`.
        """
        set_precision(self, dtype, fff_dtype)  # type: ignore[arg-type]
        return self

    def num_parameters(self) -> int:
        """Unique parameters (a tied decoder counts once)."""
        params = {id(p): p.numel() for p in self.parameters()}  # type: ignore[attr-defined]
        return sum(params.values())


def set_fff_runtime(model: nn.Module, implementation: str = "auto",
                    weight_format: str = "fp32", training: str = "auto") -> None:
    """Choose the inference kernel and weight format, and the training kernel, of every FFF
    block in ``model`` (``FFFRuntime``)."""
    FFFRuntime(implementation, weight_format, training)  # validate before touching a layer
    for module in model.modules():
        if isinstance(module, FFF):
            module.set_runtime(implementation, weight_format, training)


def set_precision(model: nn.Module, dtype: torch.dtype, fff_dtype: torch.dtype | None = None
                  ) -> None:
    """Cast ``model`` to ``dtype`` and its FFF blocks to ``fff_dtype`` (default ``dtype``)."""
    model.to(dtype)
    if fff_dtype is not None and fff_dtype != dtype:
        for module in model.modules():
            if isinstance(module, FFF):
                module.to(fff_dtype)


def fff_compute_dtype(device: torch.device | str, dtype: torch.dtype,
                      implementation: str = "auto") -> torch.dtype:
    """The precision to run FFF blocks in for a model in ``dtype`` on ``device``.

    ``dtype`` itself, unless only the generic torch kernel takes ``dtype`` there while a
    dedicated kernel takes float32 (e.g. bfloat16 where the native bf16 kernel cannot run but
    the float32 one can): then float32, which is both faster and more exact than the torch
    kernel in bfloat16.
    """
    if implementation != "auto" or dtype == torch.float32:
        return dtype
    if dispatch.select("auto", device, dtype).name != "torch":
        return dtype
    faster = dispatch.select("auto", device, torch.float32).name != "torch"
    return torch.float32 if faster else dtype
