"""WordPiece tokenizer: crammed normalisation, special tokens, templates, save/load, transformers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from ultrafastbert.data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    crammed_normalizer,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    to_transformers,
    tokenizer_fingerprint,
    train_tokenizer,
)

pytest.importorskip("tokenizers")

WORDS = ("the", "king", "queen", "castle", "river", "bright", "dark", "sword", "crown", "walk",
         "running", "jumped", "forest", "mountain", "lantern", "whisper", "thunder", "golden",
         "silver", "ancient")


def synthetic_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer(synthetic_texts(), vocab_size=200)


def test_special_tokens_come_first_in_order(tok: Any) -> None:
    ids = special_token_ids(tok)
    assert ids.all() == tuple(range(len(SPECIAL_TOKENS)))
    assert (ids.pad, ids.cls, ids.sep, ids.mask) == (0, 4, 5, 6)
    assert [tok.id_to_token(i) for i in range(7)] == list(SPECIAL_TOKENS)


def test_vocab_size_is_an_upper_bound(tok: Any) -> None:
    assert 7 < tok.get_vocab_size() <= 200
    small = train_tokenizer(synthetic_texts(), vocab_size=60)
    assert small.get_vocab_size() == 60


def test_crammed_normalisation() -> None:
    norm = crammed_normalizer()
    assert norm.normalize_str("H\u00e9llo  W\u00d6RLD ``hi''") == 'hello world "hi"'
    # Non-ASCII left after accent stripping is deleted, not mapped to <unk>.
    assert norm.normalize_str("don\u2019t \u2014 \u6771\u4eac caf\u00e9") == "dont   cafe"


def test_single_and_pair_templates(tok: Any) -> None:
    single = tok.encode("The KING walked.")
    assert single.tokens[-1] == "<sep>" and "<cls>" not in single.tokens
    assert single.tokens[0] == "the"
    pair = tok.encode("the king", "the queen")
    assert pair.tokens[0] == "<cls>" and pair.tokens.count("<sep>") == 2
    first_sep = pair.tokens.index("<sep>")
    assert pair.tokens[1:first_sep] == tok.encode("the king").tokens[:-1]
    assert set(pair.type_ids) == {0}


def test_accepts_batches_of_documents() -> None:
    texts = synthetic_texts(100)
    batched = [texts[i:i + 7] for i in range(0, len(texts), 7)]
    tok = train_tokenizer(batched, vocab_size=100)
    assert tok.get_vocab_size() == 100
    assert "<unk>" not in tok.encode(" ".join(WORDS)).tokens  # every word was seen


def test_save_load_roundtrip_is_identical(tok: Any, tmp_path: Path) -> None:
    path = save_tokenizer(tok, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp left
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    text = "the ancient golden crown"
    assert loaded.encode(text).ids == tok.encode(text).ids
    explicit = save_tokenizer(tok, tmp_path / "sub" / "my_tok.json")
    assert load_tokenizer(explicit).encode(text).ids == tok.encode(text).ids


def test_fingerprint_distinguishes_tokenizers(tok: Any) -> None:
    other = train_tokenizer(synthetic_texts(), vocab_size=120)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    # Not asserted: retraining on the same text gives the same fingerprint. The tokenizers
    # WordPiece trainer breaks count ties in hash-map order (huggingface/tokenizers#1794).


def test_load_errors(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    with pytest.raises(TokenizerError, match="no tokenizer file.*train_tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path / "junk.json")
    foreign = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(TokenizerError, match=r"lacks special tokens \['<pad>'"):
        load_tokenizer(tmp_path / "foreign.json")


def test_train_errors() -> None:
    with pytest.raises(TokenizerError, match="vocab_size must exceed"):
        train_tokenizer(["a b c"], vocab_size=7)
    with pytest.raises(TokenizerError, match="training text is empty"):
        train_tokenizer([], vocab_size=100)


def test_transformers_wrappers(tok: Any, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = save_tokenizer(tok, tmp_path)
    direct = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", cls_token="<cls>", sep_token="<sep>", mask_token="<mask>")
    for hf in (to_transformers(tok), to_transformers(path), direct):
        assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 4, 5, 6)
        assert hf("the king")["input_ids"] == tok.encode("the king").ids
        pair = hf("the king", "the queen")["input_ids"]
        assert pair == tok.encode("the king", "the queen").ids
        batch = hf(["the king", "the"], padding=True)["input_ids"]
        assert batch[1][-1] == 0
    assert to_transformers(tok, model_max_length=64).model_max_length == 64
