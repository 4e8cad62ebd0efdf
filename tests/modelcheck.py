"""The small model configuration the model tests build (2 layers, d 32, FFF 2x3)."""

from __future__ import annotations

from ultrafastbert.model import FFFSpec, ModelConfig


def mini(**changes) -> ModelConfig:
    """A 2-layer, d 32, 4-head, FFF 2x3 config (vocabulary 64, 16 positions), with changes."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                ff=FFFSpec(2, 3), classifier_width=24)
    return ModelConfig(**{**base, **changes})
