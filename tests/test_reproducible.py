"""Same seed + same corpus = same run, with the tokenizer trained afresh each time (issue 13,
item 4): ``tokenizers``' WordPiece trainer is not deterministic by itself."""

from __future__ import annotations

import json
from pathlib import Path

from train_helpers import FIXTURES, run_cli
from ultrafastbert.data import tokenizer_fingerprint, train_tokenizer

TEXTS = (FIXTURES / "train_corpus.txt").read_text(encoding="utf-8").splitlines()


def test_tokenizer_training_is_deterministic() -> None:
    prints = {tokenizer_fingerprint(train_tokenizer(TEXTS, vocab_size=600)) for _ in range(6)}
    assert len(prints) == 1


def test_plain_wordpiece_training_is_not() -> None:
    """Negative control: the same training without the seeded continuation pieces varies."""
    from tokenizers import trainers

    from ultrafastbert.data.tokenizer import SPECIAL_TOKENS, new_tokenizer

    prints = set()
    for _ in range(6):
        tok = new_tokenizer()
        tok.train_from_iterator(TEXTS, trainer=trainers.WordPieceTrainer(
            vocab_size=600, special_tokens=list(SPECIAL_TOKENS), show_progress=False))
        prints.add(tokenizer_fingerprint(tok))
    assert len(prints) > 1


def _run(out: Path, cache: Path) -> list[float]:
    run_cli("--config", str(FIXTURES / "train_model.json"), "--corpus",
            str(FIXTURES / "train_corpus.txt"), "--seq-len", "32", "--max-steps", "4",
            "--micro-batch", "8", "--batch-size", "16", "--seed", "3", "--heldout-rows", "0",
            "--no-progress", "--out", str(out), "--cache-dir", str(cache))
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_fresh_runs_are_identical(tmp_path: Path) -> None:
    """Two processes, each training its own tokenizer (no --tokenizer), separate caches."""
    first = _run(tmp_path / "a", tmp_path / "cache_a")
    second = _run(tmp_path / "b", tmp_path / "cache_b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first == second and len(first) == 4
