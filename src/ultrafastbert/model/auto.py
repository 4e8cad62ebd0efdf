"""Load any model directory the project writes, whatever its kind.

Ours (crammedBERT / UltraFastBERT, and the released checkpoint format) load through
:func:`ultrafastbert.model.checkpoint.from_pretrained`; ``transformers`` BERT-family models,
converted (``ultrafastbert convert``, ``model_type: ultrafastbert-bert`` ...) or dense (a BERT,
RoBERTa, DistilBERT or sentence-transformers folder), through
:func:`ultrafastbert.model.converted.load_transformers` (needs ``transformers``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .layouts import transformers_model_type


def from_pretrained(directory: str | os.PathLike, model_class: type | None = None, *,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    **changes: Any) -> nn.Module:
    """Load ``directory`` in eval mode: a transformers model as its saved class, anything else
    as :func:`~ultrafastbert.model.checkpoint.from_pretrained` does (``changes`` edit the
    config, e.g. ``num_labels=2``)."""
    if model_class is None and transformers_model_type(Path(directory)) is not None:
        from .converted import load_transformers

        model = load_transformers(directory, **changes)
        model.to(device=device, dtype=dtype)
        return model.eval()
    return checkpoint.from_pretrained(directory, model_class, dtype=dtype, device=device,
                                      **changes)
