"""Inference on text: fill-mask, sentence embeddings, classification with a fine-tuned model.

Works with every model directory the project writes or reads: our crammedBERT/UltraFastBERT
models, converted ``transformers`` BERT-family models (``ultrafastbert convert``) and their
dense sources, through one interface (:mod:`ultrafastbert.infer.views`).

The model runs in eval mode under ``torch.inference_mode``, so every FFF block uses the fastest
kernel the dispatcher allows. Embeddings and classification run as packed tokens
(:mod:`.fast`: no padded rows through the linears, norms and feed-forward blocks; attention
per text) with the dense linears at ``precision`` (:mod:`.precision`: ``float32``,
``bfloat16``, ``int8`` or ``auto``, the fastest that passes the accuracy rule on this CPU,
measured once and cached: :mod:`.autoprecision`). Fill-mask runs the model's own padded forward
in ``dtype``: ``bfloat16`` casts the model (less memory traffic; routes may differ from fp32
near logit 0); on a CPU the FFF blocks then stay in float32, where the native kernel runs
(faster and more exact than the generic kernel in bfloat16).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, InputTypeError
from ..model.auto import from_pretrained
from ..model.checkpoint import TOKENIZER_NAME
from ..model.layouts import transformers_model_type
from ..model.pretrained import fff_compute_dtype, set_fff_runtime, set_precision
from ..utils.device import require_device
from . import autoprecision
from .autoprecision import Choice
from .fast import FastEncoder, fast_encoder
from .packing import Packing
from .precision import unavailable
from .precision import validate as validate_precision
from .views import ModelView, view_of

logger = logging.getLogger(__name__)

#: Spellings of the mask token accepted in input text (each becomes the tokenizer's own).
MASK_ALIASES = ("<mask>", "[MASK]")
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


def _load_tokenizer(path: Path, native: bool = True) -> Any:
    """Our tokenizer (its special tokens checked), or a transformers model's own."""
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError("text inference needs the tokenizers package: pip install tokenizers"
                          ) from err
    if not native:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
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


def _resolve_pooling(pooling: str | None, view: ModelView) -> str:
    pooling = view.default_pooling if pooling is None else pooling
    if pooling not in ("mean", "first"):
        raise InputError(f"pooling must be 'mean' or 'first', got {pooling!r}")
    return pooling


class Predictor:
    """A model plus its tokenizer, ready for inference.

    >>> p = Predictor.from_pretrained("checkpoints/ultrafastbert-1x11-long")   # doctest: +SKIP
    >>> p.fill_mask("the capital of france is <mask>.").candidates[0][0].token  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, kernel: str = "auto",
                 weight_format: str = "fp32", batch_size: int = 32,
                 precision: str | None = None):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        _check_positive("batch_size (--batch-size)", batch_size)
        if precision is None:  # an explicit bfloat16 model keeps bfloat16 linears
            precision = "bfloat16" if dtype == torch.bfloat16 else "auto"
        validate_precision(precision)
        device = str(require_device(device))
        model.to(device=device)
        set_precision(model, dtype, fff_compute_dtype(device, dtype, kernel))
        self.model = model.eval()
        set_fff_runtime(self.model, kernel, weight_format)  # any module: ours or transformers
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size
        self.view: ModelView = view_of(self.model, tokenizer)
        self.max_length = self.view.max_length
        pad_id = self._token_id(self.view.pad_token, required=False)
        self.pad_id = self.view.pad_token_id if pad_id is None else pad_id
        self._fast: dict[str, FastEncoder | None] = {}
        self.precision = precision
        self.precision_choice = self._choose_precision(precision)

    # ------------------------------------------------------------------------------ precision
    def _choose_precision(self, precision: str) -> Choice:
        """The precision per workload: the one asked for, or ``auto``'s measured choice."""
        if precision != "auto":
            why = unavailable(precision, self.device)
            if why is not None:
                raise InputError(f"precision {precision} cannot run here: {why}; use "
                                 "--precision float32 or auto")
            return autoprecision.fixed(precision, "asked for")
        if self._encoder("float32") is None:
            return autoprecision.fixed("float32", "no packed encoder for this model layout")
        return autoprecision.choose(self._signature(), self.device, self._encode_packed,
                                    self._pooled_at, max_length=self.max_length)

    def _signature(self) -> str:
        """The model's shape and a checksum of its weights (the auto choice's cache key)."""
        config = self.model.config
        shape = {k: getattr(config, k, None) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "fff_layers", "d_model",
            "n_layers", "ff")}
        with torch.no_grad():
            total = sum(float(p.float().sum()) for p in self.model.parameters())
        digest = hashlib.sha256(f"{shape}{total:.6e}".encode()).hexdigest()[:12]
        return f"{type(self.model).__name__}-{digest}"

    def _encoder(self, precision: str) -> FastEncoder | None:
        """The packed encoder at ``precision`` (built on first use)."""
        if precision not in self._fast:
            sep_id = getattr(self.view, "sep_id", None) if getattr(
                self.view, "with_types", False) else None
            self._fast[precision] = fast_encoder(self.model, precision, sep_id)
        return self._fast[precision]

    def fast_encoder_for(self, n_texts: int, n_tokens: int) -> FastEncoder | None:
        """The packed encoder that runs a batch of ``n_texts`` holding ``n_tokens`` tokens
        (None: this model's layout has none, the padded path runs)."""
        return self._encoder(self.precision_choice.for_tokens(n_texts, n_tokens))

    def _pooled_at(self, precision: str, ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        encoder = self._encoder(precision)
        assert encoder is not None
        with torch.inference_mode():
            return packing.pooled(encoder.hidden(ids, packing), self.view.default_pooling)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *,
                        tokenizer_file: str | os.PathLike | None = None,
                        dtype: str | torch.dtype = "float32", **kwargs: Any) -> Predictor:
        """Load the checkpoint (its class from ``config.json``) and ``tokenizer.json``."""
        model = from_pretrained(directory)
        native = transformers_model_type(Path(directory)) is None
        tokenizer = _load_tokenizer(Path(tokenizer_file or getattr(model, "tokenizer_file", None)
                                         or Path(directory) / TOKENIZER_NAME), native)
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
        return tuple(t for t in self.view.tasks
                     if t != "fill-mask" or self.mask_token_id is not None)

    @property
    def mask_token_id(self) -> int | None:
        """Id of the mask token, None when the tokenizer has none."""
        return self._token_id(self.view.mask_token, required=False)

    def with_mask_token(self, text: str) -> str:
        """``text`` with every accepted spelling of the mask (``<mask>``, ``[MASK]``) written
        as this tokenizer's mask token."""
        for alias in MASK_ALIASES:
            if alias != self.view.mask_token:
                text = text.replace(alias, self.view.mask_token)
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
        tokenizer = self._unpadded_tokenizer(truncate)
        # One Rust call for the batch (without character offsets, which nothing here reads);
        # the per-text emptiness check runs only when a row is short enough to be empty.
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = encode(inputs)
        rows = [e.ids for e in encodings]
        if pairs is not None or min(map(len, rows), default=1 << 30) <= self._n_special:
            _warn_empty(texts, pairs, encodings)
        return rows

    def _unpadded_tokenizer(self, truncate: bool) -> Any:
        # A copy of the tokenizer, so changing its truncation never races with self.tokenizer.
        if getattr(self, "_unpadded", None) is None:
            self._unpadded = copy.deepcopy(self.tokenizer)
            self._unpadded.no_padding()
            self._n_special = int(self._unpadded.num_special_tokens_to_add(False))
            self._truncating: int | None = -1
        length = self.max_length if truncate else None
        if self._truncating != length:  # (re)configure only when it changes
            if length is None:
                self._unpadded.no_truncation()
            else:
                self._unpadded.enable_truncation(length)
            self._truncating = length
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

    def _encode_packed(self, texts: Sequence[str], pairs: Sequence[str] | None = None
                       ) -> tuple[torch.Tensor, Packing]:
        """Token ids of ``texts`` concatenated ``(T,)`` and where each text is (no padding)."""
        rows = self.tokenize(texts, pairs)
        lengths = [len(row) for row in rows]
        flat = torch.tensor([i for row in rows for i in row], dtype=torch.long)
        return flat.to(self.device), Packing.from_lengths(lengths, self.device)

    def _batches(self, texts: Sequence[str], pairs: Sequence[str] | None):
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            yield self.encode(texts[start:end], None if pairs is None else pairs[start:end])

    # ------------------------------------------------------------------------------ fill-mask
    def fill_mask(self, text: str | Sequence[str], top_k: int = 5
                  ) -> FillMaskResult | list[FillMaskResult]:
        """The ``top_k`` candidates for every ``<mask>`` (or ``[MASK]``) in ``text``; a list
        of texts gives a list of results."""
        self._require("fill-mask")
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
        self._require("fill-mask")
        _check_positive("top_k (--top-k)", top_k)
        mask_token = self.view.mask_token
        masked = ids == self._token_id(mask_token)
        for text, row in zip(texts, masked, strict=True):
            if not bool(row.any()):
                raise InputError(f"no {mask_token} in the text {text[:60]!r} (after truncation "
                                 f"to {self.max_length} tokens); write {mask_token} where a "
                                 "word goes")
        with torch.inference_mode():
            logits = self.view.masked_logits(ids, mask, masked).float()
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
    def embed(self, texts: str | Sequence[str], pooling: str | None = None,
              normalize: bool | None = None) -> torch.Tensor:
        """Sentence embeddings ``(N, d)`` float32 (``(d,)`` for one string): mean of the final
        hidden states over real tokens (``pooling="mean"``) or the first token's (``"first"``),
        L2-normalised with ``normalize``. Both default to the model's own (a sentence-
        transformers source or its converted model: its pooling and normalisation; ours: mean,
        not normalised).

        A text with no tokens left after normalisation (empty, or only characters the
        tokenizer drops, such as CJK for the ASCII-only crammed tokenizer) is logged as a
        warning: its embedding is that of an empty text, the same for all of them.
        """
        pooling = _resolve_pooling(pooling, self.view)
        rows = _as_list(texts, "texts")
        if self.fast_encoder_for(1, 1) is None:
            parts = [self.embed_ids(ids, mask, pooling, normalize)
                     for ids, mask in self._batches(rows, None)]
        else:
            parts = [self._embed_packed(*self._encode_packed(rows[i:i + self.batch_size]),
                                        pooling, normalize)
                     for i in range(0, len(rows), self.batch_size)]
        out = torch.cat(parts) if parts else torch.empty(0, self.view.width)
        return out[0] if isinstance(texts, str) else out

    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor | None,
                  pooling: str | None = None, normalize: bool | None = None) -> torch.Tensor:
        """Embeddings ``(N, d)`` float32 on the CPU of one padded batch ``ids``/``mask``
        ``(N, S)`` (see :meth:`embed`)."""
        pooling = _resolve_pooling(pooling, self.view)
        if ids.numel() and self.fast_encoder_for(1, 1) is not None:
            packing = self._packing(ids, mask)
            return self._embed_packed(packing.pack(ids), packing, pooling, normalize)
        with torch.inference_mode():
            vectors = self.view.pooled(ids, mask, pooling).float().cpu()
        return self._normalized(vectors, normalize)

    def _packing(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Packing:
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {tuple(mask.shape)} must equal input_ids "
                             f"shape {tuple(ids.shape)}")
        return Packing.from_mask(mask)

    def _embed_packed(self, ids: torch.Tensor, packing: Packing, pooling: str,
                      normalize: bool | None) -> torch.Tensor:
        """Embeddings ``(N, d)`` float32 on the CPU of packed ``ids`` ``(T,)``."""
        encoder = self.fast_encoder_for(packing.n_texts, packing.n_tokens)
        assert encoder is not None
        with torch.inference_mode():
            vectors = packing.pooled(encoder.hidden(ids, packing), pooling).float().cpu()
        return self._normalized(vectors, normalize)

    def _normalized(self, vectors: torch.Tensor, normalize: bool | None) -> torch.Tensor:
        if self.view.normalize if normalize is None else normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors

    # ------------------------------------------------------------------------- classification
    def classify(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None
                 ) -> Classification | list[Classification]:
        """Predictions of a fine-tuned classifier (or regressor) for ``texts`` (and ``pairs``);
        one string (and one pair string) gives one result."""
        self._require("classify")
        rows = _as_list(texts, "texts")
        second = None if pairs is None else _as_list(pairs, "pairs")
        results = [result for ids, mask in self._batches(rows, second)
                   for result in self.classify_ids(ids, mask)]
        return results[0] if isinstance(texts, str) else results

    def classify_ids(self, ids: torch.Tensor, mask: torch.Tensor | None
                     ) -> list[Classification]:
        """Predictions for one padded batch ``ids``/``mask`` ``(N, S)`` (see :meth:`classify`)."""
        self._require("classify")
        encoder = self.fast_encoder_for(1, 1)
        with torch.inference_mode():
            if encoder is None or not ids.numel():
                logits = self.view.class_logits(ids, mask).float().cpu()
            else:
                packing = self._packing(ids, mask)
                encoder = self.fast_encoder_for(packing.n_texts, packing.n_tokens)
                assert encoder is not None
                logits = encoder.class_logits(packing.pack(ids), packing).float().cpu()
        return [self._classification(row) for row in logits]

    def _classification(self, logits: torch.Tensor) -> Classification:
        if self.view.num_labels() == 1:
            return Classification(None, None, {}, value=float(logits[0]))
        names = self.view.label_names()
        probs = logits.softmax(-1)
        best = int(probs.argmax())
        return Classification(names[best], float(probs[best]),
                              {n: float(p) for n, p in zip(names, probs, strict=True)})

    # -------------------------------------------------------------------------------- helpers
    def _require(self, task: str) -> None:
        if task not in self.view.tasks:
            what = "classification" if task == "classify" else task
            raise InputError(f"{what} needs a {self.view.head_class(task)} checkpoint, but this "
                             f"is a {type(self.model).__name__}")
