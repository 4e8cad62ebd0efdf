"""Inference on text with a saved model: fill-mask, embeddings, classification."""

from .predictor import Classification, FillMaskResult, Predictor, TokenScore

__all__ = ["Classification", "FillMaskResult", "Predictor", "TokenScore"]
