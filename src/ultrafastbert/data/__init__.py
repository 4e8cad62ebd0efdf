"""Pretraining data: corpora, the WordPiece tokenizer, packing/caching/shuffling, MLM masking.

Pipeline::

    corpus = open_corpus(path_or_None)                    # streams documents (str)
    tok = train_tokenizer(corpus.batches(), vocab_size=32768)   # or load_tokenizer(path),
                                                          # or demo_tokenizer()
    packed = pack_corpus(corpus, tok, cache_dir, seq_len=128)   # memmap (N, 128), cached
    stream = SequenceStream(packed, seed=0)               # resumable: stream.position
    ids = stream.next_batch(256)                          # (256, 128) int64
    special = special_token_ids(tok)
    masker = MlmMasker(special.mask, tok.get_vocab_size(), special.all())
    masked, labels = masker(ids, torch.Generator().manual_seed(0))   # labels -100 if unmasked

Importing this package needs torch and numpy only; ``tokenizers``, ``pyarrow``, ``datasets`` and
``transformers`` are imported by the functions that use them.
"""

from .corpus import DEMO, Corpus, CorpusError, CorpusFile, open_corpus
from .masking import IGNORE_INDEX, MaskingConfig, MlmMasker, mask_tokens
from .packing import (
    DEFAULT_SEQ_LEN,
    LengthBucketedStream,
    PackedBatches,
    PackedCorpus,
    PreparedData,
    SequenceStream,
    cache_key,
    load_packed,
    pack_corpus,
    prepare_data,
    split_indices,
)
from .tokenizer import (
    DEFAULT_VOCAB_SIZE,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    TokenizerError,
    demo_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    to_transformers,
    tokenizer_fingerprint,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_SEQ_LEN", "DEFAULT_VOCAB_SIZE", "DEMO", "IGNORE_INDEX", "SPECIAL_TOKENS", "Corpus",
    "CorpusError", "CorpusFile", "LengthBucketedStream", "MaskingConfig", "MlmMasker",
    "PackedBatches", "PackedCorpus", "PreparedData", "SequenceStream", "SpecialTokenIds",
    "TokenizerError", "cache_key",
    "demo_tokenizer", "load_packed", "load_tokenizer", "mask_tokens", "open_corpus", "pack_corpus",
    "prepare_data", "save_tokenizer", "special_token_ids", "split_indices", "to_transformers",
    "tokenizer_fingerprint", "train_tokenizer",
]
