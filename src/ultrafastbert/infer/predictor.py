"""Inference on text: fill-mask, sentence embeddings, classification with a fine-tuned model.

The model runs in eval mode under ``torch.inference_mode``, so every FFF block uses the fastest
kernel the dispatcher allows; padded positions are skipped by the feed-forward blocks. ``dtype``
``bfloat16`` casts the model (less memory traffic; routes may differ from fp32 near logit 0);
on a CPU the FFF blocks then stay in float32, where the native kernel runs (faster and more exact
than the generic kernel in bfloat16).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, InputTypeError
from ..model.checkpoint import TOKENIZER_NAME, from_pretrained
from ..model.encoder import UltraFastBertModel
from ..model.heads import (
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    pool,
)
from ..model.pretrained import fff_compute_dtype
from ..utils.device import require_device

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


def _as_list(texts: str | Sequence[str], name: str) -> list[str]:
    """``[texts]`` for one string, else the texts as a list (each must be a string)."""
    rows = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in rows if not isinstance(t, str)]
    if bad:
        raise InputTypeError(f"{name} must be a string or a list of strings, got a list "
                             f"holding {bad[0]}")
    return rows


def _warn_empty(texts: Sequence[str], pairs: Sequence[str] | None, encodings: list[Any]
                ) -> None:
    """Log the texts that have no token left after normalisation (see ``Predictor.embed``)."""
    empty = []
    for i, encoding in enumerate(encodings):
        if 0 not in encoding.sequence_ids:
            empty.append(texts[i])
        elif pairs is not None and 1 not in encoding.sequence_ids:
            empty.append(pairs[i])
    if empty:
        logger.warning("%d text(s) have no tokens after normalisation, e.g. %r: the tokenizer "
                       "keeps lowercase ASCII only (accents stripped, other characters "
                       "dropped), so such a text is read as an empty one", len(empty),
                       empty[0][:60])


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}")


def _check_pooling(pooling: str) -> None:
    if pooling not in ("mean", "first"):
        raise InputError(f"pooling must be 'mean' or 'first', got {pooling!r}")


class Predictor:
    """A model plus its tokenizer, ready for inference.

    >>> p = Predictor.from_pretrained("checkpoints/ultrafastbert-1x11-long")   # doctest: +SKIP
    >>> p.fill_mask("the capital of france is <mask>.").candidates[0][0].token  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, kernel: str = "auto",
                 weight_format: str = "fp32", batch_size: int = 32):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        _check_positive("batch_size (--batch-size)", batch_size)
        device = str(require_device(device))
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
        tokenizer = _load_tokenizer(Path(tokenizer_file or model.tokenizer_file
                                         or Path(directory) / TOKENIZER_NAME))
        dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else dtype
        return cls(model, tokenizer, dtype=dtype, **kwargs)

    def _token_id(self, token: str, required: bool = True) -> int | None:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None and required:
            raise InputError(f"the tokenizer has no {token} token")
        return token_id

    # ------------------------------------------------------------------------------ encoding
    @property
    def tasks(self) -> tuple[str, ...]:
        """What this model can do: ``"embed"`` always, ``"classify"`` with a classifier head,
        ``"fill-mask"`` with an MLM head (and a tokenizer that has the mask token)."""
        tasks = ["embed"]
        if isinstance(self.model, UltraFastBertForSequenceClassification):
            tasks.append("classify")
        if isinstance(self.model, UltraFastBertForMaskedLM) and self.mask_token_id is not None:
            tasks.append("fill-mask")
        return tuple(tasks)

    @property
    def mask_token_id(self) -> int | None:
        """Id of the mask token, None when the tokenizer has none."""
        return self._token_id(MASK_TOKEN, required=False)

    @staticmethod
    def with_mask_token(text: str) -> str:
        """``text`` with every accepted spelling of the mask (``[MASK]``) written ``<mask>``."""
        for alias in MASK_ALIASES:
            text = text.replace(alias, MASK_TOKEN)
        return text

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                 truncate: bool = True) -> list[list[int]]:
        """Token ids of each text (special tokens added, no padding). With ``truncate`` they
        are cut to ``max_length`` exactly as :meth:`encode` cuts them; without, the lengths
        tell how long each text really is. Not thread-safe (like the tokenizer itself)."""
        if isinstance(texts, str):
            raise InputTypeError("texts must be a list of strings, not one string")
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} pairs")
        inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        encodings = self._unpadded_tokenizer(truncate).encode_batch(inputs)
        _warn_empty(texts, pairs, encodings)
        return [e.ids for e in encodings]

    def _unpadded_tokenizer(self, truncate: bool) -> Any:
        # A copy of the tokenizer, so changing its truncation never races with self.tokenizer.
        if getattr(self, "_unpadded", None) is None:
            self._unpadded = copy.deepcopy(self.tokenizer)
            self._unpadded.no_padding()
        if truncate:
            self._unpadded.enable_truncation(self.max_length)
        else:
            self._unpadded.no_truncation()
        return self._unpadded

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id rows padded to the longest: ids and attention mask, both ``(N, S)``."""
        width = max((len(row) for row in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both ``(N, S)`` (padded to the longest, truncated to
        the model's ``max_seq_len``)."""
        return self.pad(self.tokenize(texts, pairs))

    def _batches(self, texts: Sequence[str], pairs: Sequence[str] | None):
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            yield self.encode(texts[start:end], None if pairs is None else pairs[start:end])

    # ------------------------------------------------------------------------------ fill-mask
    def fill_mask(self, text: str | Sequence[str], top_k: int = 5
                  ) -> FillMaskResult | list[FillMaskResult]:
        """The ``top_k`` candidates for every ``<mask>`` (or ``[MASK]``) in ``text``; a list
        of texts gives a list of results."""
        self._require(UltraFastBertForMaskedLM, "fill-mask")
        texts = [self.with_mask_token(t) for t in _as_list(text, "text")]
        results = [result for start in range(0, len(texts), self.batch_size)
                   for chunk in [texts[start:start + self.batch_size]]
                   for result in self.fill_mask_ids(chunk, *self.encode(chunk), top_k=top_k)]
        return results[0] if isinstance(text, str) else results

    def fill_mask_ids(self, texts: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
                      top_k: int = 5) -> list[FillMaskResult]:
        """Fill-mask on one padded batch: ``ids``/``mask`` ``(N, S)`` of ``texts``; every row
        needs at least one mask token. Only the masked positions are decoded. (A ``top_k``
        above the vocabulary size gives the whole vocabulary.)"""
        model = self._require(UltraFastBertForMaskedLM, "fill-mask")
        _check_positive("top_k (--top-k)", top_k)
        top_k = min(top_k, model.config.vocab_size)
        masked = ids == self._token_id(MASK_TOKEN)
        for text, row in zip(texts, masked, strict=True):
            if not bool(row.any()):
                raise InputError(f"no {MASK_TOKEN} in the text {text[:60]!r} (after truncation "
                                 f"to {self.max_length} tokens); write {MASK_TOKEN} where a "
                                 "word goes")
        with torch.inference_mode():
            hidden = model.encoder(ids, mask).last_hidden_state[masked]
            logits = model.decoder(hidden).float()
        probs, top = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        filled = ids.clone()
        filled[masked] = top[:, 0]
        counts = masked.sum(dim=1).tolist()
        rows = zip(probs.split(counts), top.split(counts), strict=True)
        return [FillMaskResult(text, self._candidates(row_p, row_i),
                               self.tokenizer.decode(filled[n][mask[n] == 1].tolist()))
                for n, (text, (row_p, row_i)) in enumerate(zip(texts, rows, strict=True))]

    def _candidates(self, probs: torch.Tensor, top: torch.Tensor) -> list[list[TokenScore]]:
        return [[TokenScore(self.tokenizer.id_to_token(int(i)), int(i), float(p))
                 for p, i in zip(row_p, row_i, strict=True)]
                for row_p, row_i in zip(probs, top, strict=True)]

    # ----------------------------------------------------------------------------- embeddings
    def embed(self, texts: str | Sequence[str], pooling: str = "mean") -> torch.Tensor:
        """Sentence embeddings ``(N, d)`` float32 (``(d,)`` for one string): mean of the final
        hidden states over real tokens (``pooling="mean"``) or the first token's (``"first"``).

        A text with no tokens left after normalisation (empty, or only characters the
        tokenizer drops, such as CJK for the ASCII-only crammed tokenizer) is logged as a
        warning: its embedding is that of an empty text, the same for all of them.
        """
        _check_pooling(pooling)
        rows = _as_list(texts, "texts")
        parts = [self.embed_ids(ids, mask, pooling) for ids, mask in self._batches(rows, None)]
        out = torch.cat(parts) if parts else torch.empty(0, self.model.config.d_model)
        return out[0] if isinstance(texts, str) else out

    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor | None,
                  pooling: str = "mean") -> torch.Tensor:
        """Embeddings ``(N, d)`` float32 on the CPU of one padded batch ``ids``/``mask``
        ``(N, S)`` (see :meth:`embed`)."""
        _check_pooling(pooling)
        with torch.inference_mode():
            hidden = self._encoder()(ids, mask).last_hidden_state
            return pool(hidden, mask, pooling).float().cpu()

    # ------------------------------------------------------------------------- classification
    def classify(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None
                 ) -> Classification | list[Classification]:
        """Predictions of a fine-tuned classifier (or regressor) for ``texts`` (and ``pairs``);
        one string (and one pair string) gives one result."""
        self._require(UltraFastBertForSequenceClassification, "classification")
        rows = _as_list(texts, "texts")
        second = None if pairs is None else _as_list(pairs, "pairs")
        results = [result for ids, mask in self._batches(rows, second)
                   for result in self.classify_ids(ids, mask)]
        return results[0] if isinstance(texts, str) else results

    def classify_ids(self, ids: torch.Tensor, mask: torch.Tensor | None
                     ) -> list[Classification]:
        """Predictions for one padded batch ``ids``/``mask`` ``(N, S)`` (see :meth:`classify`)."""
        model = self._require(UltraFastBertForSequenceClassification, "classification")
        with torch.inference_mode():
            logits = model(ids, mask).logits.float().cpu()
        return [self._classification(row) for row in logits]

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
            raise InputError(f"{task} needs a {cls.__name__} checkpoint, but this is a "
                             f"{type(self.model).__name__}")
        return self.model

    def _encoder(self) -> UltraFastBertModel:
        return self.model if isinstance(self.model, UltraFastBertModel) else self.model.encoder
