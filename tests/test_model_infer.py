"""The inference API and ``ultrafastbert predict``: fill-mask, embeddings, classification."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import modelcheck

pytest.importorskip("tokenizers")

from ultrafastbert.cli import predict as predict_cli  # noqa: E402
from ultrafastbert.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from ultrafastbert.infer import Predictor  # noqa: E402
from ultrafastbert.model import (  # noqa: E402
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
)

TEXT = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song"] * 3


def mini(**changes) -> ModelConfig:
    return modelcheck.mini(**{"vocab_size": 128, **changes})


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return save_tokenizer(train_tokenizer(TEXT, vocab_size=128), folder)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer_file):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mlm") / "ck"
    UltraFastBertForMaskedLM(mini()).save_pretrained(folder, tokenizer_file=tokenizer_file)
    return folder


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, tokenizer_file):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("clf") / "ck"
    model = UltraFastBertForSequenceClassification(
        mini(num_labels=2, label_names=("negative", "positive"), pooler="first"))
    model.save_pretrained(folder, tokenizer_file=tokenizer_file)
    return folder


def test_fill_mask_ranks_the_model_logits(mlm_dir):
    p = Predictor.from_pretrained(mlm_dir)
    result = p.fill_mask("the cat [MASK] on the <mask>", top_k=4)
    assert len(result.candidates) == 2 and all(len(c) == 4 for c in result.candidates)
    ids, mask = p.encode(["the cat <mask> on the <mask>"])
    with torch.no_grad():
        logits = p.model(ids, mask).logits[0]
    positions = (ids[0] == p.tokenizer.token_to_id("<mask>")).nonzero().squeeze(1)
    for candidates, pos in zip(result.candidates, positions, strict=True):
        probs = logits[pos].softmax(-1)
        assert [c.token_id for c in candidates] == probs.topk(4).indices.tolist()
        assert candidates[0].probability == pytest.approx(probs.max().item(), rel=1e-5)
        assert candidates[0].probability >= candidates[-1].probability
    assert "<mask>" not in result.filled


def test_fill_mask_needs_a_mask_and_an_mlm(mlm_dir, clf_dir):
    with pytest.raises(ValueError, match="no <mask> in the text"):
        Predictor.from_pretrained(mlm_dir).fill_mask("the cat sat")
    with pytest.raises(ValueError, match="fill-mask needs a UltraFastBertForMaskedLM"):
        Predictor.from_pretrained(clf_dir).fill_mask("the <mask> sat")


def test_embeddings_do_not_depend_on_batch_padding(mlm_dir):
    p = Predictor.from_pretrained(mlm_dir)
    alone = p.embed(["the cat"])
    batched = p.embed(["the cat", "a dog ran in the park and the bird sang a song"])
    assert alone.shape == (1, 32) and alone.dtype == torch.float32
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)
    first = p.embed(["the cat"], pooling="first")
    assert not torch.allclose(first, alone)
    with pytest.raises(ValueError, match="pooling must be"):
        p.embed(["x"], pooling="max")


def test_classification_and_bf16(clf_dir):
    p = Predictor.from_pretrained(clf_dir)
    results = p.classify(["the cat sat", "the dog ran"], pairs=["a song", "the park"])
    assert [r.label in ("negative", "positive") for r in results] == [True, True]
    assert sum(results[0].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    low = Predictor.from_pretrained(clf_dir, dtype="bfloat16").classify(["the cat sat"],
                                                                          ["a song"])
    assert low[0].probabilities["positive"] == pytest.approx(
        results[0].probabilities["positive"], abs=0.05)


def test_regression_reports_a_value(tmp_path, tokenizer_file):
    model = UltraFastBertForSequenceClassification(mini(num_labels=1))
    model.save_pretrained(tmp_path, tokenizer_file=tokenizer_file)
    [result] = Predictor.from_pretrained(tmp_path).classify(["the cat"])
    assert result.label is None and isinstance(result.value, float)


def test_long_texts_are_truncated_to_the_position_table(mlm_dir):
    p = Predictor.from_pretrained(mlm_dir)
    ids, _ = p.encode(["the cat sat on the mat " * 10])
    assert ids.shape == (1, 16)
    assert p.embed(["the cat sat on the mat " * 10]).shape == (1, 32)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    predict_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_predict_cli(mlm_dir, clf_dir, capsys, tmp_path):
    assert run_cli(["predict", "fill-mask", str(mlm_dir), "the cat <mask>", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert len(row["candidates"][0]) == 5
    assert run_cli(["predict", "embed", str(mlm_dir), "a dog", "the cat",
                    "--out", str(tmp_path / "e.npy")]) == 0
    assert "(2, 32)" in capsys.readouterr().out
    assert run_cli(["predict", "classify", str(clf_dir), "the cat", "--pair", "a song"]) == 0
    assert "the cat" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--pair once per text"):
        run_cli(["predict", "classify", str(clf_dir), "a", "b", "--pair", "x"])


def test_batch_methods_match_the_text_api(mlm_dir, clf_dir):
    """tokenize/pad/*_ids (what the server uses) give what the text methods give."""
    p = Predictor.from_pretrained(mlm_dir)
    texts = ["the cat <mask> on the mat", "a <mask> ran", "the bird sang a <mask> " * 9]
    rows = p.tokenize(texts)
    ids, mask = p.encode(texts)
    torch.testing.assert_close(p.pad(rows), (ids, mask), rtol=0, atol=0)
    assert [len(r) for r in rows] == mask.sum(1).tolist() and len(rows[2]) == 16
    full = p.tokenize(texts, truncate=False)
    assert len(full[2]) > 16 and full[:2] == rows[:2]
    assert p.tokenize(texts) == rows  # a truncate=False call leaves truncation to the next one
    batched = p.fill_mask_ids(texts, ids, mask, top_k=3)
    for text, got in zip(texts, batched, strict=True):
        alone = p.fill_mask(text, top_k=3)
        assert got.filled == alone.filled and got.text == text
        for a, b in zip(got.candidates, alone.candidates, strict=True):
            assert [c.probability for c in a] == pytest.approx([c.probability for c in b],
                                                               abs=1e-5)
    with pytest.raises(ValueError, match="no <mask> in the text 'x y'"):
        p.fill_mask_ids(["a <mask>", "x y"], *p.encode(["a <mask>", "x y"]))
    torch.testing.assert_close(p.embed_ids(ids, mask), p.embed(texts), atol=1e-5, rtol=1e-5)
    assert p.tasks == ("embed", "fill-mask")
    assert p.with_mask_token("a [MASK] b <mask>") == "a <mask> b <mask>"
    c = Predictor.from_pretrained(clf_dir)
    assert c.tasks == ("embed", "classify")
    assert c.classify_ids(*c.encode(["the cat", "a dog"])) == c.classify(["the cat", "a dog"])
