"""The small model configurations the tests build."""

from __future__ import annotations

from ultrafastbert.model import FFFSpec, ModelConfig


def mini(**changes) -> ModelConfig:
    """A 2-layer, d 32, 4-head, FFF 2x3 config (vocabulary 64, 16 positions), with changes."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                ff=FFFSpec(2, 3), classifier_width=24)
    return ModelConfig(**{**base, **changes})


#: The GLUE tests' model: the demo tokenizer's 32,768 entries, 128 positions, FFF 1x4.
GLUE_TINY = ModelConfig(vocab_size=32768, d_model=64, n_layers=2, n_heads=2, max_seq_len=128,
                        ff=FFFSpec(1, 4))
