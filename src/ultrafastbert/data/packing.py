"""Tokenize a corpus, pack it into fixed-length sequences, cache it, and stream shuffled batches.

Packing follows crammedBERT: every document is encoded with the tokenizer's post-processor
(``$A <sep>``), the token streams are concatenated and cut into rows of ``seq_len`` tokens; the
last, incomplete row is dropped. Rows therefore cross document boundaries, separated by
``<sep>``, and contain no padding.

The cache is two files in ``cache_dir``: ``packed-<key>.bin`` (raw row-major ``uint16``, or
``uint32`` for vocabularies above 65,536, read back as a ``numpy.memmap``) and
``packed-<key>.json`` (the manifest). ``key`` hashes the corpus identity, the tokenizer
fingerprint and ``seq_len``. Both files are written to temporary names and moved into place with
``os.replace``, data first, manifest last; a cache entry exists only once its manifest does, so
an interrupted run (exception or ``kill -9``) never leaves a visible half-written entry.

Order: :class:`SequenceStream` visits the rows in a fresh permutation every epoch, derived only
from ``(seed, epoch)``. Its state is one integer, ``position`` = the number of rows consumed so
far; restoring it resumes the exact same data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import DataError
from ..utils.oserrors import writing
from .corpus import Corpus, CorpusError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 128
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackedCorpus:
    """A packed, cached corpus: ``n_sequences`` rows of ``seq_len`` token ids on disk."""

    data_path: Path
    manifest: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def n_sequences(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def __len__(self) -> int:
        return self.n_sequences

    def array(self) -> np.memmap:
        """Read-only memory map of the rows, shape ``(n_sequences, seq_len)``."""
        return np.memmap(self.data_path, dtype=np.dtype(self.manifest["dtype"]), mode="r",
                         shape=(self.n_sequences, self.seq_len))


def cache_key(corpus_identity: dict[str, Any], tokenizer_fingerprint: str, seq_len: int) -> str:
    """Hex key of a cache entry: sha256 over corpus identity, tokenizer and sequence length."""
    payload = json.dumps({"corpus": corpus_identity, "tokenizer": tokenizer_fingerprint,
                          "seq_len": seq_len, "format": CACHE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab <= 65,536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"packed-{key}.bin", cache_dir / f"packed-{key}.json"


def load_packed(cache_dir: str | os.PathLike[str], key: str) -> PackedCorpus | None:
    """The cache entry ``key`` in ``cache_dir``, or ``None`` if absent or inconsistent."""
    data_path, manifest_path = _paths(Path(cache_dir), key)
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("cache manifest %s is unreadable; rebuilding the entry", manifest_path)
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    expected = manifest["n_sequences"] * manifest["seq_len"] * itemsize
    if not data_path.is_file() or data_path.stat().st_size != expected:
        log.warning("cache entry %s is inconsistent (data file missing or wrong size); "
                    "rebuilding it", manifest_path)
        return None
    return PackedCorpus(data_path, manifest)


def pack_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    seq_len: int = DEFAULT_SEQ_LEN,
    *,
    batch_size: int = 1024,
    rebuild: bool = False,
) -> PackedCorpus:
    """Tokenize ``corpus`` and pack it into rows of ``seq_len`` ids, or reuse the cached result.

    Tokenization uses ``Tokenizer.encode_batch`` (multi-threaded in Rust; set
    ``RAYON_NUM_THREADS`` to limit it). Memory use is bounded by ``batch_size`` documents.

    Args:
        corpus: documents to pack (see :func:`ultrafastbert.data.corpus.open_corpus`).
        tokenizer: a trained tokenizer (its post-processor adds ``<sep>`` after each document).
        cache_dir: folder for the cache files (created if missing).
        seq_len: tokens per row (128 in the crammed recipe).
        batch_size: documents encoded per call.
        rebuild: ignore an existing cache entry and write a new one.

    Returns:
        The packed corpus; ``.array()`` has shape ``(n_sequences, seq_len)``.

    Raises:
        CorpusError: the corpus is empty or holds fewer than ``seq_len`` tokens.
    """
    from .tokenizer import tokenizer_fingerprint

    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(corpus.identity(), tokenizer_fingerprint(tokenizer), seq_len)
    found = None if rebuild else load_packed(cache, key)
    if found is not None:
        log.info("reusing packed corpus %s (%d sequences)", found.data_path, found.n_sequences)
        return found
    return _build(corpus, tokenizer, cache, key, seq_len, batch_size)


def _build(corpus: Corpus, tokenizer: Tokenizer, cache: Path, key: str, seq_len: int,
           batch_size: int) -> PackedCorpus:
    data_path, manifest_path = _paths(cache, key)
    dtype = token_dtype(tokenizer.get_vocab_size())
    tmp_tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_data = data_path.with_name(data_path.name + tmp_tag)
    tmp_manifest = manifest_path.with_name(manifest_path.name + tmp_tag)
    start = time.monotonic()
    with writing(data_path, "the packed-corpus cache",
                 note="Pass --cache-dir on a disk with space (or set ULTRAFASTBERT_CACHE)."):
        stats, manifest = _write_entry(corpus, tokenizer, key, seq_len, dtype, batch_size,
                                       (data_path, tmp_data), (manifest_path, tmp_manifest))
    log.info("packed %d documents into %d sequences of %d tokens in %.1fs -> %s",
             stats["n_documents"], stats["n_sequences"], seq_len, time.monotonic() - start,
             data_path)
    return PackedCorpus(data_path, manifest)


def _write_entry(corpus: Corpus, tokenizer: Tokenizer, key: str, seq_len: int, dtype: np.dtype,
                 batch_size: int, data: tuple[Path, Path], manifest_paths: tuple[Path, Path]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the rows, then the manifest, each to its temporary path and then into place."""
    (data_path, tmp_data), (manifest_path, tmp_manifest) = data, manifest_paths
    try:
        with open(tmp_data, "wb") as f:
            stats = _write_rows(corpus, tokenizer, f, seq_len, dtype, batch_size)
            f.flush()
            os.fsync(f.fileno())
        if stats["n_sequences"] == 0:
            raise CorpusError(
                f"corpus {corpus.source!r} yields {stats['n_tokens']} tokens, fewer than one "
                f"sequence of {seq_len}. Add more text or use a shorter sequence length."
            )
        manifest = _manifest(corpus, tokenizer, key, seq_len, dtype, stats, data_path)
        os.replace(tmp_data, data_path)
        _write_json_atomic(tmp_manifest, manifest_path, manifest)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return stats, manifest


def _encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list[Any]:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    return encode(docs)


def _write_rows(corpus: Corpus, tokenizer: Tokenizer, f: Any, seq_len: int, dtype: np.dtype,
                batch_size: int) -> dict[str, Any]:
    """Encode ``corpus`` batch by batch and write complete rows to ``f``; returns counts."""
    carry = np.zeros(0, dtype=np.int64)
    n_docs = n_tokens = n_rows = 0
    digest = hashlib.sha256()
    for n_batches, docs in enumerate(corpus.batches(batch_size), start=1):
        encodings = _encode_batch(tokenizer, docs)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64)
        n_docs += len(docs)
        n_tokens += len(ids)
        stream = np.concatenate([carry, ids])
        full = len(stream) // seq_len * seq_len
        block = stream[:full].astype(dtype).tobytes()
        f.write(block)
        digest.update(block)
        n_rows += full // seq_len
        carry = stream[full:]
        if n_batches % 500 == 0:
            log.info("packing: %d documents, %d sequences so far", n_docs, n_rows)
    return {"n_documents": n_docs, "n_tokens": n_tokens, "n_sequences": n_rows,
            "dropped_tokens": len(carry), "sha256": digest.hexdigest()}


def _manifest(corpus: Corpus, tokenizer: Tokenizer, key: str, seq_len: int, dtype: np.dtype,
              stats: dict[str, Any], data_path: Path) -> dict[str, Any]:
    from .tokenizer import special_token_ids, tokenizer_fingerprint

    return {
        "format": CACHE_FORMAT_VERSION, "key": key, "data_file": data_path.name,
        "dtype": dtype.name, "seq_len": seq_len, "vocab_size": tokenizer.get_vocab_size(),
        "special_token_ids": dict(zip(
            ("pad", "bos", "eos", "unk", "cls", "sep", "mask"),
            special_token_ids(tokenizer).all(), strict=True)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus": corpus.identity(), "corpus_source": corpus.source,
        "created_unix": int(time.time()), **stats,
    }


def _write_json_atomic(tmp: Path, target: Path, payload: dict[str, Any]) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


# --------------------------------------------------------------------------- one-call preparation


@dataclass(frozen=True)
class PreparedData:
    """What pretraining needs from the data side: the tokenizer and the packed rows."""

    tokenizer: Tokenizer
    packed: PackedCorpus
    tokenizer_path: Path


def prepare_data(
    corpus: Corpus,
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    vocab_size: int = 32_768,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> PreparedData:
    """Get a tokenizer, keep a copy in ``out_dir/tokenizer.json``, and pack the corpus.

    The tokenizer is ``tokenizer_path`` if given (it must match any tokenizer already in
    ``out_dir``), else the one already in ``out_dir`` (a resumed run), else the shipped demo
    tokenizer (demo corpus with ``vocab_size`` 32,768), else a new one trained on ``corpus``.
    Training is deterministic (same corpus, same tokenizer); a resumed run still reuses the copy
    in its ``out_dir``, so it never depends on the corpus being unchanged.

    Raises:
        TokenizerError: ``out_dir`` already holds a tokenizer different from ``tokenizer_path``.
    """
    from .tokenizer import TOKENIZER_FILE, save_tokenizer, tokenizer_fingerprint

    target = Path(out_dir) / TOKENIZER_FILE
    tok = _choose_tokenizer(corpus, target, tokenizer_path, vocab_size)
    if target.is_file():
        from .tokenizer import TokenizerError, load_tokenizer

        if tokenizer_fingerprint(load_tokenizer(target)) != tokenizer_fingerprint(tok):
            raise TokenizerError(f"{target} holds a different tokenizer than {tokenizer_path}. "
                                 "Use a fresh output directory, or drop --tokenizer to resume.")
    else:
        save_tokenizer(tok, target)
    packed = pack_corpus(corpus, tok, cache_dir, seq_len)
    return PreparedData(tok, packed, target)


def _choose_tokenizer(corpus: Corpus, saved: Path, given: str | os.PathLike[str] | None,
                      vocab_size: int) -> Tokenizer:
    from .tokenizer import DEFAULT_VOCAB_SIZE, demo_tokenizer, load_tokenizer, train_tokenizer

    if given is not None:
        return load_tokenizer(given)
    if saved.is_file():
        log.info("reusing the tokenizer saved in %s", saved)
        return load_tokenizer(saved)
    if corpus.kind == "demo" and vocab_size == DEFAULT_VOCAB_SIZE:
        return demo_tokenizer()
    log.info("training a WordPiece tokenizer (vocab %d) on %s", vocab_size, corpus.source)
    return train_tokenizer(corpus, vocab_size=vocab_size)  # re-iterable: read twice


# --------------------------------------------------------------------------- order and batches


def split_indices(n_sequences: int, n_holdout: int, split_seed: int = 0,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, held-out), independent of any training seed.

    Returns:
        Two sorted ``int64`` arrays of shapes ``(n_sequences - n_holdout,)`` and ``(n_holdout,)``.
    """
    if not 0 <= n_holdout < n_sequences:
        raise DataError(f"n_holdout must be in [0, {n_sequences}), got {n_holdout}: keep at "
                        "least one training sequence")
    perm = np.random.default_rng([split_seed, 0x5EED]).permutation(n_sequences)
    return np.sort(perm[n_holdout:]), np.sort(perm[:n_holdout])


class SequenceStream:
    """Deterministic, resumable, epoch-wise shuffled batches of packed rows.

    The row served at global position ``p`` is ``indices[perm_e[p % n]]`` with ``e = p // n`` and
    ``perm_e`` a permutation seeded by ``(seed, e)``. Serving a batch advances ``position`` by the
    *global* batch size, so a varying batch size (the crammed batch ramp) and any number of
    data-parallel ranks all stay on one sequence of rows.
    """

    def __init__(self, rows: PackedCorpus | np.ndarray, *, seed: int,
                 indices: np.ndarray | None = None, position: int = 0) -> None:
        """Create a stream.

        Args:
            rows: a :class:`PackedCorpus` or an array of shape ``(N, seq_len)``.
            seed: shuffling seed.
            indices: the rows to use (e.g. the train part of :func:`split_indices`); all if None.
            position: number of rows already consumed (from :meth:`state_dict`).
        """
        self.rows = rows.array() if isinstance(rows, PackedCorpus) else rows
        self.indices = (np.arange(len(self.rows), dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64))
        if len(self.indices) == 0:
            raise DataError("SequenceStream needs at least one row")
        self.seed = int(seed)
        self.position = int(position)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """Completed passes over the rows."""
        return self.position // len(self.indices)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of ``epoch`` in serving order, shape ``(len(indices),)``."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, self.arrange(epoch, rng))
        return self._perm_cache[1]

    def arrange(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """``epoch``'s serving order (computed once per epoch by :meth:`order`): a permutation
        of ``indices`` drawn from ``rng``, seeded by ``(seed, epoch)``."""
        return self.indices[rng.permutation(len(self.indices))]

    def rows_at(self, position: int, count: int) -> np.ndarray:
        """Row indices served at positions ``position ... position + count - 1``."""
        n = len(self.indices)
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(position + done, n)
            take = min(count - done, n - offset)
            out[done:done + take] = self.order(epoch)[offset:offset + take]
            done += take
        return out

    def next_batch(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The next global batch's share for ``rank``, and advance by ``batch_size`` rows.

        Rank ``r`` gets rows ``r*b ... (r+1)*b - 1`` of the global batch, ``b = batch_size //
        world_size``; concatenating all ranks' shares gives the single-process batch.

        Returns:
            ``int64`` tensor of shape ``(batch_size // world_size, seq_len)``.
        """
        if batch_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise DataError(f"batch_size {batch_size} must be a positive multiple of world_size "
                            f"{world_size}, and 0 <= rank {rank} < world_size")
        share = batch_size // world_size
        picked = self.rows_at(self.position + rank * share, share)
        self.position += batch_size
        return torch.from_numpy(self._gather(picked))

    def _gather(self, picked: np.ndarray) -> np.ndarray:
        # Read rows in file order (kind to the page cache), then restore the serving order.
        order = np.argsort(picked, kind="stable")
        out = np.empty((len(picked), self.rows.shape[1]), dtype=np.int64)
        out[order] = self.rows[picked[order]]
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: ``{"position", "seed", "n_rows"}``."""
        return {"position": self.position, "seed": self.seed, "n_rows": len(self.indices)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; refuses a state made for another seed or row set."""
        if state["seed"] != self.seed or state["n_rows"] != len(self.indices):
            raise DataError(f"data state was saved for seed {state['seed']} with "
                            f"{state['n_rows']} rows; this stream has seed {self.seed} with "
                            f"{len(self.indices)} rows. Resume with the same corpus and seed.")
        self.position = int(state["position"])


class LengthBucketedStream(SequenceStream):
    """A :class:`SequenceStream` whose consecutive ``batch_size`` rows have similar lengths.

    Padded rows of very different lengths waste most of a batch's compute on padding (GLUE
    sentences: 17 real tokens a row against a longest row of ~50 in a random batch of 32, so
    ~2.2x the work). Each epoch's seeded permutation is cut into chunks of
    ``batch_size * chunk_batches`` rows; each chunk is sorted by length, cut into batches, and
    its batches are shuffled (seeded by ``(seed, epoch)``). Every row is still served exactly
    once per epoch, in an order fixed by the seed, so position-based resume is unchanged.
    Serve it with a constant ``batch_size`` for the batches to line up with the buckets (from
    position 0 or a multiple of ``batch_size``).
    """

    def __init__(self, rows: np.ndarray, *, seed: int, lengths: np.ndarray, batch_size: int,
                 indices: np.ndarray | None = None, position: int = 0,
                 chunk_batches: int = 64) -> None:
        """Create a stream; ``lengths`` ``(N,)``: real tokens of each of the ``N`` rows."""
        super().__init__(rows, seed=seed, indices=indices, position=position)
        self.lengths = np.asarray(lengths)
        if self.lengths.shape != (len(self.rows),):
            raise DataError(f"lengths must have one entry per row ({len(self.rows)}), got shape "
                            f"{self.lengths.shape}")
        if batch_size < 1 or chunk_batches < 1:
            raise DataError(f"batch_size ({batch_size}) and chunk_batches ({chunk_batches}) "
                            "must be >= 1")
        self.batch_size, self.chunk_batches = int(batch_size), int(chunk_batches)

    def arrange(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """The plain stream's permutation, bucketed by length chunk by chunk (class docstring)."""
        shuffled = super().arrange(epoch, rng)
        chunk = self.batch_size * self.chunk_batches
        # The first ``head`` rows complete the batch the previous epoch's last rows began, so
        # this epoch's buckets line up with the batches served.
        head = -epoch * len(self.indices) % self.batch_size
        parts = [shuffled[:head]]
        for start in range(head, len(shuffled), chunk):
            rows = shuffled[start:start + chunk]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            parts.extend(batches[i] for i in rng.permutation(len(batches)))
        return np.concatenate(parts)


class PackedBatches(torch.utils.data.IterableDataset):
    """Endless (or ``max_batches``-long) iterator of fixed-size batches from a stream.

    Use with ``DataLoader(..., batch_size=None, num_workers=0)`` or iterate directly; the
    stream's ``position`` stays the resumable state.
    """

    def __init__(self, stream: SequenceStream, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None) -> None:
        super().__init__()
        self.stream, self.batch_size = stream, batch_size
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yield ``int64`` tensors of shape ``(batch_size // world_size, seq_len)``."""
        count = itertools.count() if self.max_batches is None else range(self.max_batches)
        for _ in count:
            yield self.stream.next_batch(self.batch_size, rank=self.rank,
                                         world_size=self.world_size)
