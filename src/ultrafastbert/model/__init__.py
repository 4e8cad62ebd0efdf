"""The UltraFastBERT / crammedBERT model: config, encoder, heads, checkpoints.

Hugging Face interop lives in ``ultrafastbert.model.hf`` (needs ``transformers``).
"""

from .auto import from_pretrained
from .checkpoint import save_pretrained
from .config import PRESETS, DenseFF, FFFSpec, ModelConfig, preset_names
from .encoder import EncoderOutput, UltraFastBertModel
from .heads import (
    MaskedLMOutput,
    SequenceClassifierOutput,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
)

__all__ = ["PRESETS", "DenseFF", "EncoderOutput", "FFFSpec", "MaskedLMOutput", "ModelConfig",
           "SequenceClassifierOutput", "UltraFastBertForMaskedLM",
           "UltraFastBertForSequenceClassification", "UltraFastBertModel", "from_pretrained",
           "preset_names", "save_pretrained"]
