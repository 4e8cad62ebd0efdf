"""ultrafastbert: UltraFastBERT with exact fast-feedforward semantics and real speed.

Importing needs only torch and numpy. The one thing done at import is installing a lazy hook
that registers our model classes with ``transformers``' ``Auto*`` factories the first time a
program imports them (``transformers`` itself is never imported here).
"""

from .fff import FFF, FFFRuntime, fff_reference
from .model import (
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    UltraFastBertModel,
    from_pretrained,
)
from .model.hf_hook import install_transformers_hook as _install_transformers_hook

__version__ = "0.1.0"

_install_transformers_hook()

__all__ = ["FFF", "FFFRuntime", "ModelConfig", "UltraFastBertForMaskedLM",
           "UltraFastBertForSequenceClassification", "UltraFastBertModel", "__version__",
           "fff_reference", "from_pretrained"]
