"""Packing, the on-disk cache (keys, atomic writes), deterministic order and exact resumption."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultrafastbert.data import packing
from ultrafastbert.data import tokenizer as tokenizer_mod
from ultrafastbert.data.corpus import CorpusError, open_corpus
from ultrafastbert.data.packing import (
    LengthBucketedStream,
    PackedBatches,
    SequenceStream,
    cache_key,
    load_packed,
    pack_corpus,
    prepare_data,
    split_indices,
    token_dtype,
)
from ultrafastbert.data.tokenizer import (
    TokenizerError,
    demo_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from ultrafastbert.errors import DataError

pytest.importorskip("tokenizers")

WORDS = ("red", "green", "blue", "small", "large", "quick", "slow", "fox", "dog", "cat", "bird",
         "runs", "sleeps", "sings")
SEQ = 16


def make_corpus_file(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer([" ".join(WORDS)] * 5, vocab_size=80)


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    return make_corpus_file(tmp_path / "corpus.txt")


def reference_rows(path: Path, tok: Any, seq_len: int) -> np.ndarray:
    """Pack by hand: encode each line with its <sep>, concatenate, cut, drop the tail."""
    ids = [i for line in path.read_text().splitlines() if line.strip()
           for i in tok.encode(line.strip()).ids]
    n = len(ids) // seq_len
    return np.array(ids[: n * seq_len]).reshape(n, seq_len)


# --------------------------------------------------------------------------- packing and cache


def test_pack_matches_hand_packing(tok: Any, corpus_file: Path, tmp_path: Path) -> None:
    packed = pack_corpus(open_corpus(corpus_file), tok, tmp_path / "cache", SEQ, batch_size=7)
    expected = reference_rows(corpus_file, tok, SEQ)
    arr = packed.array()
    assert arr.dtype == np.uint16 and arr.shape == expected.shape == (len(packed), SEQ)
    np.testing.assert_array_equal(arr, expected)
    sep = tok.token_to_id("<sep>")
    assert (arr == sep).sum() >= len(expected) * SEQ // 15  # documents are <sep>-separated
    m = packed.manifest
    assert m["n_documents"] == 300 and m["seq_len"] == SEQ and m["vocab_size"] == 80
    assert m["n_tokens"] == m["n_sequences"] * SEQ + m["dropped_tokens"]
    assert m["special_token_ids"]["pad"] == 0 and m["special_token_ids"]["mask"] == 6


def test_batch_size_does_not_change_the_result(tok: Any, corpus_file: Path,
                                               tmp_path: Path) -> None:
    a = pack_corpus(open_corpus(corpus_file), tok, tmp_path / "a", SEQ, batch_size=1)
    b = pack_corpus(open_corpus(corpus_file), tok, tmp_path / "b", SEQ, batch_size=1000)
    np.testing.assert_array_equal(a.array(), b.array())
    assert a.manifest["sha256"] == b.manifest["sha256"]


def test_cache_is_reused_without_reencoding(tok: Any, corpus_file: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(packing, "_write_rows", fail)
    again = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ)
    assert again.data_path == first.data_path
    np.testing.assert_array_equal(again.array(), first.array())
    with pytest.raises(AssertionError, match="should have used the cache"):
        pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ, rebuild=True)


def test_cache_key_tracks_corpus_tokenizer_and_seq_len(tok: Any, corpus_file: Path,
                                                       tmp_path: Path) -> None:
    base = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ).key
    assert pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ * 2).key != base
    other_tok = train_tokenizer([" ".join(WORDS)] * 5, vocab_size=60)
    assert pack_corpus(open_corpus(corpus_file), other_tok, tmp_path, SEQ).key != base
    make_corpus_file(corpus_file, seed=1)
    assert pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ).key != base
    ident = open_corpus(corpus_file).identity()
    assert cache_key(ident, "t", SEQ) == cache_key(json.loads(json.dumps(ident)), "t", SEQ)


def test_interrupted_write_leaves_nothing_visible(tok: Any, corpus_file: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    real_encode = packing._encode_batch
    calls = {"n": 0}

    def encode_then_crash(tokenizer: Any, docs: list[str]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 3:  # some rows are already on disk by now
            raise KeyboardInterrupt("simulated crash mid-write")
        return real_encode(tokenizer, docs)

    monkeypatch.setattr(packing, "_encode_batch", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pack_corpus(open_corpus(corpus_file), tok, cache, SEQ, batch_size=50)
    assert list(cache.iterdir()) == []  # no manifest, no data, no temp file
    monkeypatch.setattr(packing, "_encode_batch", real_encode)
    packed = pack_corpus(open_corpus(corpus_file), tok, cache, SEQ, batch_size=50)
    np.testing.assert_array_equal(packed.array(), reference_rows(corpus_file, tok, SEQ))


def test_entry_exists_only_with_a_consistent_manifest(tok: Any, corpus_file: Path,
                                                      tmp_path: Path) -> None:
    packed = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ)
    manifest_path = packed.data_path.with_suffix(".json")
    assert load_packed(tmp_path, packed.key) is not None
    with open(packed.data_path, "ab") as f:  # a torn data file must not be trusted
        f.write(b"\0\0")
    assert load_packed(tmp_path, packed.key) is None
    rebuilt = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ)
    assert rebuilt.data_path.stat().st_size == rebuilt.n_sequences * SEQ * 2
    manifest_path.unlink()  # data without a manifest (crash between the two renames)
    assert load_packed(tmp_path, packed.key) is None


def test_too_short_and_empty_corpora(tok: Any, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("red fox\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"short\.txt' yields \d+ tokens, fewer than one sequence "
                                          r"of 16\. Add more text or use a shorter sequence"):
        pack_corpus(open_corpus(short), tok, tmp_path / "c1", SEQ)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="contains no text"):
        pack_corpus(open_corpus(empty), tok, tmp_path / "c2", SEQ)
    assert list((tmp_path / "c1").iterdir()) == [] and list((tmp_path / "c2").iterdir()) == []


def test_token_dtype() -> None:
    assert token_dtype(32_768) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_demo_tokenizer_packs_demo_text(tmp_path: Path) -> None:
    tok = demo_tokenizer()
    assert tok.get_vocab_size() == 32_768 and tok.token_to_id("<pad>") == 0
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n" * 40)
    packed = pack_corpus(open_corpus(text), tok, tmp_path / "c", 128)
    assert packed.n_sequences == 40 * 12 // 128 and packed.array().max() < 32_768


def test_prepare_data_trains_saves_and_then_reuses_the_tokenizer(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = prepare_data(open_corpus(corpus_file), out, cache, vocab_size=60, seq_len=SEQ)
    assert first.tokenizer_path == out / "tokenizer.json" and first.tokenizer_path.is_file()
    assert first.packed.seq_len == SEQ and first.tokenizer.get_vocab_size() <= 60

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed run must not retrain its tokenizer")

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", no_training)
    again = prepare_data(open_corpus(corpus_file), out, cache, vocab_size=60, seq_len=SEQ)
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert again.packed.key == first.packed.key


def test_prepare_data_refuses_a_different_tokenizer_in_out_dir(tok: Any, corpus_file: Path,
                                                               tmp_path: Path) -> None:
    other = save_tokenizer(train_tokenizer([" ".join(WORDS)] * 5, vocab_size=50), tmp_path / "o")
    prepare_data(open_corpus(corpus_file), tmp_path / "run", tmp_path / "c",
                 tokenizer_path=save_tokenizer(tok, tmp_path / "t"), seq_len=SEQ)
    with pytest.raises(TokenizerError, match="holds a different tokenizer"):
        prepare_data(open_corpus(corpus_file), tmp_path / "run", tmp_path / "c",
                     tokenizer_path=other, seq_len=SEQ)


def test_demo_corpus_uses_the_shipped_tokenizer(tmp_path: Path) -> None:
    chosen = packing._choose_tokenizer(open_corpus(), tmp_path / "tokenizer.json", None, 32_768)
    assert tokenizer_fingerprint(chosen) == tokenizer_fingerprint(demo_tokenizer())


# --------------------------------------------------------------------------- order and batches


def rows(n: int = 10, seq: int = 4) -> np.ndarray:
    return np.arange(n * seq, dtype=np.uint16).reshape(n, seq)


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    stream = SequenceStream(rows(10), seed=3)
    epoch0 = stream.next_batch(10)[:, 0] // 4
    epoch1 = stream.next_batch(10)[:, 0] // 4
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(10))
    assert epoch0.tolist() != epoch1.tolist() and epoch0.tolist() != list(range(10))
    assert stream.epoch == 2 and stream.position == 20


def test_same_seed_same_order_other_seed_differs() -> None:
    a = [SequenceStream(rows(50), seed=7).next_batch(50) for _ in range(2)]
    b = SequenceStream(rows(50), seed=8).next_batch(50)
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_batches_are_the_right_rows_and_dtype() -> None:
    data = rows(10)
    stream = SequenceStream(data, seed=0)
    batch = stream.next_batch(3)
    assert batch.dtype == torch.int64 and batch.shape == (3, 4)
    expected = data[stream.rows_at(0, 3)]
    np.testing.assert_array_equal(batch.numpy(), expected)


def test_resume_from_position_continues_identically() -> None:
    sizes = [3, 5, 8, 8, 13, 2, 21]  # varying batch sizes (the batch ramp), across epochs
    full = SequenceStream(rows(17), seed=11)
    uninterrupted = [full.next_batch(b) for b in sizes]
    first = SequenceStream(rows(17), seed=11)
    for b in sizes[:3]:
        first.next_batch(b)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = SequenceStream(rows(17), seed=11)
    resumed.load_state_dict(state)
    for b, expected in zip(sizes[3:], uninterrupted[3:], strict=True):
        assert torch.equal(resumed.next_batch(b), expected)
    assert resumed.position == full.position == sum(sizes)
    fresh = SequenceStream(rows(17), seed=11, position=state["position"])
    assert torch.equal(fresh.next_batch(sizes[3]), uninterrupted[3])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 20), sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_any_batch_split_serves_the_same_row_sequence(n: int, sizes: list[int],
                                                      seed: int) -> None:
    data = rows(n, 2)
    stream = SequenceStream(data, seed=seed)
    served = torch.cat([stream.next_batch(b) for b in sizes])
    expected = np.concatenate([data[SequenceStream(data, seed=seed).order(e)]
                               for e in range(sum(sizes) // n + 1)])[: sum(sizes)]
    np.testing.assert_array_equal(served.numpy(), expected)


def test_resume_refuses_another_seed_or_corpus() -> None:
    state = SequenceStream(rows(10), seed=1).state_dict()
    with pytest.raises(ValueError, match="same corpus and seed"):
        SequenceStream(rows(10), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="same corpus and seed"):
        SequenceStream(rows(11), seed=1).load_state_dict(state)


def test_rank_shards_concatenate_to_the_global_batch() -> None:
    single = SequenceStream(rows(13), seed=5)
    ranks = [SequenceStream(rows(13), seed=5) for _ in range(4)]
    for _ in range(5):
        expected = single.next_batch(8)
        shares = [s.next_batch(8, rank=r, world_size=4) for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat(shares), expected)
    assert {s.position for s in ranks} == {single.position}
    with pytest.raises(ValueError, match="multiple of world_size"):
        single.next_batch(6, world_size=4)


def test_split_indices_and_restricted_stream() -> None:
    train, held = split_indices(100, 10, split_seed=0)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(100))
    assert np.array_equal(held, split_indices(100, 10, split_seed=0)[1])
    assert not np.array_equal(held, split_indices(100, 10, split_seed=1)[1])
    stream = SequenceStream(rows(100), seed=0, indices=train)
    served = stream.next_batch(90)[:, 0] // 4
    assert sorted(served.tolist()) == sorted(train.tolist())
    with pytest.raises(ValueError, match="keep at least one"):
        split_indices(10, 10)


def test_packed_batches_iterates_from_the_stream(tok: Any, corpus_file: Path,
                                                 tmp_path: Path) -> None:
    packed = pack_corpus(open_corpus(corpus_file), tok, tmp_path, SEQ)
    stream = SequenceStream(packed, seed=0, position=5)
    loader = torch.utils.data.DataLoader(PackedBatches(stream, 4, max_batches=3),
                                         batch_size=None)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(4, SEQ)] * 3 and stream.position == 17
    check = SequenceStream(packed, seed=0, position=5)
    assert all(torch.equal(b, check.next_batch(4)) for b in batches)


# --------------------------------------------------------------------------- length buckets


def _ragged(n: int, seq: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows padded with 0 to ``seq``, random real lengths 1..seq; and those lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, n)
    data = np.zeros((n, seq), dtype=np.int32)
    for i, n_real in enumerate(lengths):
        data[i, :n_real] = i + 1  # row i's tokens are i + 1: the row can be read back
    return data, lengths


def _padded_work(batches: list[torch.Tensor]) -> float:
    """Share of a batch cut to its longest row that is real tokens."""
    real = sum(int((b != 0).sum()) for b in batches)
    cut = sum(int((b != 0).sum(1).max()) * b.shape[0] for b in batches)
    return real / cut


def test_length_buckets_serve_every_row_once_per_epoch_with_little_padding() -> None:
    data, lengths = _ragged(1003)  # not a multiple of the batch size: epochs straddle batches
    bucketed = LengthBucketedStream(data, seed=5, lengths=lengths, batch_size=16,
                                    chunk_batches=8)
    plain = SequenceStream(data, seed=5)
    n_batches = 3 * 1003 // 16
    got = [bucketed.next_batch(16) for _ in range(n_batches)]
    rows_served = torch.cat(got)[:, 0].numpy() - 1
    for epoch in range(2):
        assert sorted(rows_served[epoch * 1003:(epoch + 1) * 1003]) == list(range(1003))
    assert not np.array_equal(rows_served[:1003], rows_served[1003:2006])
    # the negative control: the same rows in a plain shuffle waste far more on padding, and so
    # would the bucketed stream's later epochs if their buckets did not line up with batches
    later = got[1003 // 16 + 1:]
    assert _padded_work(later) > 0.85 > 0.6 > _padded_work(
        [plain.next_batch(16) for _ in range(n_batches)])


def test_length_buckets_resume_and_checks() -> None:
    data, lengths = _ragged(200)
    full = LengthBucketedStream(data, seed=2, lengths=lengths, batch_size=8)
    uninterrupted = [full.next_batch(8) for _ in range(40)]
    resumed = LengthBucketedStream(data, seed=2, lengths=lengths, batch_size=8)
    resumed.load_state_dict(json.loads(json.dumps({**full.state_dict(), "position": 17 * 8})))
    for expected in uninterrupted[17:]:
        assert torch.equal(resumed.next_batch(8), expected)
    other = LengthBucketedStream(data, seed=3, lengths=lengths, batch_size=8)
    assert not torch.equal(other.next_batch(8), uninterrupted[0])
    with pytest.raises(DataError, match="one entry per row"):
        LengthBucketedStream(data, seed=0, lengths=lengths[:-1], batch_size=8)
    with pytest.raises(DataError, match="must be >= 1"):
        LengthBucketedStream(data, seed=0, lengths=lengths, batch_size=0)
