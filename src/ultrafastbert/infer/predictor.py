"""Inference on text: fill-mask, sentence embeddings, classification with a fine-tuned model.

The model runs in eval mode under ``torch.inference_mode``, so every FFF block uses the fastest
kernel the dispatcher allows; padded positions are skipped by the feed-forward blocks. ``dtype``
``bfloat16`` casts the model (less memory traffic; routes may differ from fp32 near logit 0);
on a CPU the FFF blocks then stay in float32, where the native kernel runs (faster and more exact
than the generic kernel in bfloat16).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.checkpoint import TOKENIZER_NAME, from_pretrained
from ..model.encoder import UltraFastBertModel
from ..model.heads import (
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    pool,
)
from ..model.pretrained import fff_compute_dtype

logger = logging.getLogger(__name__)

MASK_TOKEN = "<mask>"
PAD_TOKEN = "<pad>"
#: Spellings of the mask token accepted in input text.
MASK_ALIASES = ("[MASK]",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TokenScore:
    """One candidate for a masked position: the token, its id and its probability."""

    token: str
    token_id: int
    probability: float


@dataclass(frozen=True)
class FillMaskResult:
    """``candidates[i]``: the top candidates for the i-th mask; ``filled``: text with the best."""

    text: str
    candidates: list[list[TokenScore]]
    filled: str


@dataclass(frozen=True)
class Classification:
    """``label`` and its ``probability`` with all ``probabilities``; for a regression model
    (one output) ``label`` is None and ``value`` holds the prediction."""

    label: str | None
    probability: float | None
    probabilities: dict[str, float]
    value: float | None = None


def _load_tokenizer(path: Path) -> Any:
    try:
        import tokenizers  # noqa: F401
    except ImportError as err:
        raise ImportError("text inference needs the tokenizers package: pip install tokenizers"
                          ) from err
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(path)


class Predictor:
    """A model plus its tokenizer, ready for inference.

    >>> p = Predictor.from_pretrained("checkpoints/ultrafastbert-1x11-long")   # doctest: +SKIP
    >>> p.fill_mask("the capital of france is <mask>.").candidates[0][0].token  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, kernel: str = "auto",
                 weight_format: str = "fp32", batch_size: int = 32):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        model.to(device=device)
        model.set_precision(dtype, fff_compute_dtype(device, dtype, kernel))
        self.model = model.eval()
        self.model.set_fff_runtime(kernel, weight_format)
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size
        self.max_length = model.config.max_seq_len
        pad_id = self._token_id(PAD_TOKEN, required=False)
        self.pad_id = model.config.pad_token_id if pad_id is None else pad_id

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *,
                        tokenizer_file: str | os.PathLike | None = None,
                        dtype: str | torch.dtype = "float32", **kwargs: Any) -> Predictor:
        """Load the checkpoint (its class from ``config.json``) and ``tokenizer.json``."""
        model = from_pretrained(directory)
        tokenizer = _load_tokenizer(Path(tokenizer_file or Path(directory) / TOKENIZER_NAME))
        dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else dtype
        return cls(model, tokenizer, dtype=dtype, **kwargs)

    def _token_id(self, token: str, required: bool = True) -> int | None:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None and required:
            raise ValueError(f"the tokenizer has no {token} token")
        return token_id

    # ------------------------------------------------------------------------------ encoding
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``(N, S)`` (padded to the longest, truncated to
        the model's ``max_seq_len``)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD_TOKEN)
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(inputs)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def _batches(self, texts: Sequence[str], pairs: Sequence[str] | None):
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            yield self.encode(texts[start:end], None if pairs is None else pairs[start:end])

    # ------------------------------------------------------------------------------ fill-mask
    def fill_mask(self, text: str, top_k: int = 5) -> FillMaskResult:
        """The ``top_k`` candidates for every ``<mask>`` (or ``[MASK]``) in ``text``."""
        model = self._require(UltraFastBertForMaskedLM, "fill-mask")
        for alias in MASK_ALIASES:
            text = text.replace(alias, MASK_TOKEN)
        ids, mask = self.encode([text])
        positions = (ids[0] == self._token_id(MASK_TOKEN)).nonzero().squeeze(1)
        if positions.numel() == 0:
            raise ValueError(f"no {MASK_TOKEN} in the text (after truncation to "
                             f"{self.max_length} tokens); write {MASK_TOKEN} where a word goes")
        with torch.inference_mode():  # decode only the masked positions
            hidden = model.encoder(ids, mask).last_hidden_state[0, positions]
            logits = model.decoder(hidden).float()
        probs, top = logits.softmax(-1).topk(top_k, dim=-1)
        candidates = [[TokenScore(self.tokenizer.id_to_token(int(i)), int(i), float(p))
                       for p, i in zip(row_p, row_i, strict=True)]
                      for row_p, row_i in zip(probs, top, strict=True)]
        filled = ids[0].clone()
        filled[positions] = top[:, 0]
        return FillMaskResult(text, candidates, self.tokenizer.decode(filled.tolist()))

    # ----------------------------------------------------------------------------- embeddings
    def embed(self, texts: Sequence[str], pooling: str = "mean") -> torch.Tensor:
        """Sentence embeddings ``(N, d)`` float32: mean of the final hidden states over real
        tokens (``pooling="mean"``) or the first token's (``"first"``)."""
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        encoder = self._encoder()
        parts = []
        with torch.inference_mode():
            for ids, mask in self._batches(texts, None):
                hidden = encoder(ids, mask).last_hidden_state
                parts.append(pool(hidden, mask, pooling).float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, self.model.config.d_model)

    # ------------------------------------------------------------------------- classification
    def classify(self, texts: Sequence[str], pairs: Sequence[str] | None = None
                 ) -> list[Classification]:
        """Predictions of a fine-tuned classifier (or regressor) for ``texts`` (and ``pairs``)."""
        model = self._require(UltraFastBertForSequenceClassification, "classification")
        logits = []
        with torch.inference_mode():
            for ids, mask in self._batches(texts, pairs):
                logits.append(model(ids, mask).logits.float().cpu())
        return [self._classification(row) for row in torch.cat(logits)] if logits else []

    def _classification(self, logits: torch.Tensor) -> Classification:
        config = self.model.config
        if config.num_labels == 1:
            return Classification(None, None, {}, value=float(logits[0]))
        names = config.label_names or tuple(f"LABEL_{i}" for i in range(config.num_labels))
        probs = logits.softmax(-1)
        best = int(probs.argmax())
        return Classification(names[best], float(probs[best]),
                              {n: float(p) for n, p in zip(names, probs, strict=True)})

    # -------------------------------------------------------------------------------- helpers
    def _require(self, cls: type, task: str) -> Any:
        if not isinstance(self.model, cls):
            raise ValueError(f"{task} needs a {cls.__name__} checkpoint, but this is a "
                             f"{type(self.model).__name__}")
        return self.model

    def _encoder(self) -> UltraFastBertModel:
        return self.model if isinstance(self.model, UltraFastBertModel) else self.model.encoder
