"""ultrafastbert: UltraFastBERT with exact fast-feedforward semantics and real speed."""

from .fff import FFF, FFFRuntime, fff_reference

__version__ = "0.1.0"

__all__ = ["FFF", "FFFRuntime", "__version__", "fff_reference"]
