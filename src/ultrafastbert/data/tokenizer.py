"""WordPiece tokenizer with crammedBERT's normalisation and special tokens (docs/design.md §1.2).

Normalisation, in order (as in crammedBERT's ``_get_sane_normalizers`` with
``force_lowercase``, ``strip_accents`` and ``force_english_keyboard`` on):

1. ````` `` ````` and ``''`` become ``"``;
2. Unicode NFD, then lowercase, then strip combining accents (``é`` -> ``e``);
3. runs of spaces collapse to one;
4. every remaining non-ASCII character is **deleted** (not mapped to ``<unk>``): ``’`` and ``—``
   vanish, so ``don’t`` becomes ``dont``; CJK text becomes nothing. That is what the released
   checkpoints were trained with; map typographic punctuation to ASCII in your corpus beforehand
   if you want to keep it.

Pre-tokenisation splits on whitespace and punctuation (``\\w+|[^\\w\\s]+``). Special tokens get
the first ids in this order: ``<pad>``=0, ``<s>``, ``</s>``, ``<unk>``, ``<cls>``, ``<sep>``,
``<mask>``=6. The post-processor adds ``$A <sep>`` to a single text and
``<cls> $A <sep> $B <sep>`` to a pair (all token type ids 0: the model has no type embedding).

``tokenizers`` (and ``transformers`` for :func:`to_transformers`) are imported inside functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, CLS, SEP, MASK = "<pad>", "<s>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, CLS, SEP, MASK)
DEFAULT_VOCAB_SIZE = 32_768
TOKENIZER_FILE = "tokenizer.json"
DEMO_TOKENIZER_RESOURCE = ("demo_corpus", "demo_tokenizer.json")
# Keyword arguments naming the special tokens for transformers' tokenizer classes.
HF_SPECIAL_TOKENS = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
                     "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}


class TokenizerError(DataError):
    """A tokenizer cannot be trained, loaded or used; the message says what to do."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens in one tokenizer."""

    pad: int
    bos: int
    eos: int
    unk: int
    cls: int
    sep: int
    mask: int

    def all(self) -> tuple[int, ...]:
        """All special ids (never masked or used as random replacements)."""
        return astuple(self)


def crammed_normalizer() -> Any:
    """The crammedBERT normaliser: quotes, NFD, lowercase, strip accents, spaces, ASCII only."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.Replace("``", '"'),
        normalizers.Replace("''", '"'),
        normalizers.NFD(),
        normalizers.Lowercase(),
        normalizers.StripAccents(),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(r"[^\x00-\x7F]+"), ""),
    ])


def new_tokenizer() -> Tokenizer:
    """An untrained WordPiece tokenizer with the crammed normaliser, pre-tokeniser and decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token=UNK))
    tok.normalizer = crammed_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 0,
    length: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a WordPiece tokenizer on ``texts`` (documents, or batches of documents).

    Deterministic: the same texts and settings give the same tokenizer, in any process (see
    :func:`continuation_seeds`; ``texts`` is read twice, and a one-shot iterator is first
    kept in memory, so pass a re-iterable such as a ``Corpus`` for a large corpus). The input
    is streamed (``tokenizers`` counts words in
    parallel). On a small corpus the
    vocabulary can come out smaller than ``vocab_size``; that is logged, not an error: every id
    is still below ``vocab_size``, so a model sized for ``vocab_size`` works.

    Args:
        texts: an iterable of ``str`` or of ``list[str]`` (e.g. ``Corpus.batches()``).
        vocab_size: target vocabulary size including the 7 special tokens.
        min_frequency: minimum count for a merge (the ``tokenizers`` default, 0, as crammedBERT).
        length: number of items in ``texts``, for the progress bar only.
        show_progress: show the ``tokenizers`` progress bar.

    Raises:
        TokenizerError: ``vocab_size`` too small, or no text at all.
    """
    from tokenizers import trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, "
                             f"got {vocab_size}. Use e.g. 32768 (the paper) or 1024 for tests.")
    tok = new_tokenizer()
    if iter(texts) is texts:  # a one-shot iterator: keep it for the second pass
        texts = list(_as_strings(texts))
    seeds = continuation_seeds(tok, _as_strings(texts))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[*SPECIAL_TOKENS, *seeds],
                                        show_progress=show_progress)
    tok.train_from_iterator(_as_strings(texts), trainer=trainer, length=length)
    tok = _without_seed_specials(tok)
    _add_post_processor(tok)
    _check_trained(tok, vocab_size)
    return tok


def continuation_seeds(tok: Tokenizer, texts: Iterable[str]) -> list[str]:
    """``##c`` for every character ``c`` the normalised ``texts`` contain, in code order.

    Given to the WordPiece trainer up front, so that it never creates them itself: it would do
    so in hash-map order, which differs from run to run and then breaks ties between merges
    differently (huggingface/tokenizers#1794). With them, training is deterministic: the same
    corpus gives the same tokenizer. The trainer would add the same pieces anyway, so the
    vocabulary is not larger for it. Costs one extra pass over ``texts``.
    """
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    normalise = tok.normalizer.normalize_str
    chars = {c for raw in seen for c in normalise(raw)}
    if "`" in seen or "'" in seen:  # `` and '' become " (a two-character rule)
        chars.add('"')
    return ["##" + c for c in sorted(chars) if not c.isspace()]


def _without_seed_specials(trained: Tokenizer) -> Tokenizer:
    """The trained WordPiece vocabulary (same ids) with only :data:`SPECIAL_TOKENS` special:
    the seeds (:func:`continuation_seeds`) are ordinary continuation pieces, not tokens matched
    in raw text."""
    from tokenizers import models

    vocab = trained.get_vocab(with_added_tokens=True)
    model = trained.model
    tok = new_tokenizer()
    tok.model = models.WordPiece(vocab, unk_token=UNK,
                                 continuing_subword_prefix=model.continuing_subword_prefix,
                                 max_input_chars_per_word=model.max_input_chars_per_word)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _as_strings(texts: Iterable[str] | Iterable[list[str]]) -> Iterator[str]:
    for item in texts:
        if isinstance(item, str):
            yield item
        else:
            yield from item


def _add_post_processor(tok: Tokenizer) -> None:
    from tokenizers import processors

    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:0 {SEP}:0",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )


def _check_trained(tok: Tokenizer, vocab_size: int) -> None:
    size = tok.get_vocab_size()
    if size <= len(SPECIAL_TOKENS):
        raise TokenizerError("the tokenizer learned no tokens: the training text is empty. "
                             "Train on a corpus that contains text.")
    if size < vocab_size:
        log.warning("tokenizer vocabulary is %d < requested %d (small corpus); ids stay below "
                    "%d", size, vocab_size, vocab_size)


def special_token_ids(tok: Tokenizer) -> SpecialTokenIds:
    """Ids of ``<pad> <s> </s> <unk> <cls> <sep> <mask>`` in ``tok``.

    Raises:
        TokenizerError: a special token is missing (the tokenizer was not made for this library).
    """
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"tokenizer lacks special tokens {missing}; this library needs "
                             f"{list(SPECIAL_TOKENS)}. Train one with train_tokenizer().")
    return SpecialTokenIds(*(ids[name] for name in SPECIAL_TOKENS))


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write ``tokenizer.json`` atomically; ``path`` is the file or a folder to put it in."""
    target = Path(path)
    if target.is_dir() or target.suffix != ".json":
        target = target / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder holding one) and check its special tokens.

    Raises:
        TokenizerError: the file is missing, unreadable, or lacks the special tokens.
    """
    from tokenizers import Tokenizer

    target = Path(path)
    if target.is_dir():
        target = target / TOKENIZER_FILE
    if not target.is_file():
        raise TokenizerError(f"no tokenizer file at {str(target)!r}. Pass a tokenizer.json "
                             "(or its folder), or train one with train_tokenizer().")
    try:
        tok = Tokenizer.from_file(str(target))
    except Exception as err:  # tokenizers raises a bare Exception on parse errors
        raise TokenizerError(f"{target} is not a valid tokenizers JSON file ({err}). "
                             "Re-save it with save_tokenizer() or train a new one.") from err
    ids = special_token_ids(tok)
    if ids.pad != 0:
        log.warning("%s: <pad> has id %d, not 0; give the model pad id %d", target, ids.pad,
                    ids.pad)
    return tok


def demo_tokenizer() -> Tokenizer:
    """The WordPiece tokenizer (32,768 entries) shipped with, and trained on, the demo corpus.

    It was trained before :func:`train_tokenizer` was made deterministic, so retraining on the
    demo corpus gives a (reproducibly) different tokenizer; use this one for demo runs and
    stored-loss tests.
    """
    from tokenizers import Tokenizer

    from .corpus import packaged_file

    res = packaged_file(DEMO_TOKENIZER_RESOURCE)
    if res is None:
        raise TokenizerError("the demo tokenizer is missing from the installed package "
                             f"({'/'.join(DEMO_TOKENIZER_RESOURCE)}). Reinstall ultrafastbert or "
                             "rebuild it with scripts/build_demo_corpus.py.")
    return Tokenizer.from_str(res.read_text(encoding="utf-8"))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (vocabulary, normaliser, templates)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def to_transformers(tok: Tokenizer | str | os.PathLike[str], model_max_length: int = 128) -> Any:
    """Wrap as ``transformers.PreTrainedTokenizerFast`` with the special tokens set.

    Args:
        tok: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json`` (or its folder).
        model_max_length: the model's sequence length (128 for the crammed recipe).

    Raises:
        TokenizerError: ``transformers`` is not installed.
    """
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as err:
        raise TokenizerError("to_transformers needs the optional package 'transformers': "
                             "pip install 'ultrafastbert[hf]'.") from err
    if not hasattr(tok, "to_str"):
        tok = load_tokenizer(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   **HF_SPECIAL_TOKENS)
