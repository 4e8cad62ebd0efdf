"""The GLUE-sane protocol, the classifier built from a model directory, fine-tuning on the
shared training loop, evaluation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from modelcheck import GLUE_TINY as TINY
from ultrafastbert.data import demo_tokenizer, save_tokenizer
from ultrafastbert.glue import (
    TASKS,
    GlueExample,
    GlueProtocol,
    GlueSplit,
    encode_split,
    evaluate,
    load_classifier,
    predict,
)
from ultrafastbert.glue import finetune as ft
from ultrafastbert.glue.finetune import finetune
from ultrafastbert.model import UltraFastBertForMaskedLM
from ultrafastbert.train import Trainer, WarmupCosineSchedule


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = save_tokenizer(demo_tokenizer(), root / "tok" / "tokenizer.json")
    torch.manual_seed(0)
    UltraFastBertForMaskedLM(TINY).save_pretrained(root / "model", tokenizer_file=tokenizer)
    return root / "model"


def sentiment_split(n: int, seed: int = 0) -> GlueSplit:
    """Label 1 iff the sentence starts with "good" (the pooled first token)."""
    rng = random.Random(seed)
    nouns = ["movie", "meal", "book", "song", "trip", "game", "show", "day"]
    examples = []
    for i in range(n):
        label = i % 2
        words = ["good" if label else "bad", rng.choice(nouns), "and", rng.choice(nouns)]
        examples.append(GlueExample(" ".join(words), None, label))
    return GlueSplit("SST-2", "train", tuple(examples), "synthetic")


# ---------------------------------------------------------------------------- protocol
def test_protocol_defaults_are_glue_sane():
    p = GlueProtocol()
    assert (p.epochs, p.lr, p.batch_size, p.betas, p.eps, p.weight_decay) == (
        5, 4e-5, 16, (0.9, 0.98), 1e-6, 0.0)
    assert (p.warmup, p.max_length, p.pooler, p.dropout, p.grad_clip) == (
        0.1, 128, "first", 0.1, None)
    assert p.seeds == (0, 1, 2, 3, 4)
    assert p.max_train_examples is None and p.max_eval_examples is None


@pytest.mark.parametrize("changes, field", [
    ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"warmup": 1.0}, "warmup"),
    ({"pooler": "max"}, "pooler"), ({"seeds": ()}, "seeds"), ({"seeds": (1, 1)}, "seeds"),
    ({"betas": (0.9, 1.5)}, "betas"), ({"max_train_examples": 0}, "max_train_examples"),
])
def test_protocol_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GlueProtocol(**changes)


def test_protocol_overrides_and_steps():
    p = GlueProtocol().replace(epochs=2, lr=None, seeds=(7,))
    assert (p.epochs, p.lr, p.seeds) == (2, 4e-5, (7,))
    assert GlueProtocol().steps(33) == 5 * 3
    assert GlueProtocol().to_dict()["betas"] == [0.9, 0.98]


# -------------------------------------------------------------------------- classifier
def test_classifier_takes_the_encoder_and_a_seeded_new_head(model_dir):
    protocol = GlueProtocol()
    a = load_classifier(model_dir, TASKS["MNLI"], protocol, seed=0)
    b = load_classifier(model_dir, TASKS["MNLI"], protocol, seed=0)
    c = load_classifier(model_dir, TASKS["MNLI"], protocol, seed=1)
    saved = UltraFastBertForMaskedLM.from_pretrained(model_dir)
    for key, value in saved.encoder.state_dict().items():
        assert torch.equal(a.encoder.state_dict()[key], value), key
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    cfg = a.config
    assert (cfg.num_labels, cfg.label_names, cfg.pooler) == (
        3, ("entailment", "neutral", "contradiction"), "first")
    assert {cfg.embedding_dropout, cfg.attention_dropout, cfg.hidden_dropout,
            cfg.classifier_dropout} == {0.1}
    stsb = load_classifier(model_dir, TASKS["STS-B"], protocol, seed=0)
    assert stsb.config.num_labels == 1 and stsb.config.label_names is None


def test_classifier_from_a_fine_tuned_directory_of_another_task(model_dir, tmp_path):
    rte = load_classifier(model_dir, TASKS["RTE"], GlueProtocol(), seed=0)
    rte.save_pretrained(tmp_path / "rte", tokenizer_file=model_dir / "tokenizer.json")
    stsb = load_classifier(tmp_path / "rte", TASKS["STS-B"], GlueProtocol(), seed=0)
    assert stsb.config.num_labels == 1
    assert torch.equal(stsb.encoder.embedding.word_embedding.weight,
                       rte.encoder.embedding.word_embedding.weight)


def test_max_length_beyond_the_model_is_refused(model_dir):
    with pytest.raises(ValueError, match="max_length 256 exceeds.*--max-length 128"):
        load_classifier(model_dir, TASKS["RTE"], GlueProtocol(max_length=256), seed=0)


# ---------------------------------------------------------------------------- training
def test_finetune_runs_on_the_shared_loop_with_warmup_cosine(model_dir, monkeypatch):
    made = []

    class Spy(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ft, "Trainer", Spy)
    protocol = GlueProtocol(epochs=2, batch_size=8, lr=1e-3)
    train = encode_split(sentiment_split(20), demo_tokenizer(), 128)
    model = load_classifier(model_dir, TASKS["SST-2"], protocol, seed=0)
    result = finetune(model, train, protocol, seed=0)
    assert len(made) == 1 and result.steps == protocol.steps(20) == 6
    schedule = WarmupCosineSchedule(warmup=0.1)
    expected = [1e-3 * schedule.lr_factor(i / 6) for i in range(6)]
    assert result.lrs == pytest.approx(expected)
    assert not model.training


def test_finetuning_learns_a_separable_task_and_is_reproducible(model_dir):
    protocol = GlueProtocol(epochs=4, batch_size=8, lr=3e-3, dropout=0.0)
    tok = demo_tokenizer()
    train = encode_split(sentiment_split(32), tok, 128)
    heldout = encode_split(sentiment_split(32, seed=1), tok, 128)
    runs = []
    for _ in range(2):
        model = load_classifier(model_dir, TASKS["SST-2"], protocol, seed=3)
        runs.append(finetune(model, train, protocol, seed=3))
    assert runs[0].losses == runs[1].losses  # same seed, same run
    assert runs[0].train_loss < 0.5 * runs[0].losses[0]
    metrics = evaluate(runs[0].model, TASKS["SST-2"], {"dev": heldout})
    assert metrics["dev"]["accuracy"] >= 0.9
    untrained = load_classifier(model_dir, TASKS["SST-2"], protocol, seed=3)
    # negative control: the same head before training is at chance
    assert evaluate(untrained, TASKS["SST-2"], {"dev": heldout})["dev"]["accuracy"] <= 0.75


def test_predict_returns_input_order_and_regression_values(model_dir):
    tok = demo_tokenizer()
    split = sentiment_split(10)
    enc = encode_split(split, tok, 128)
    model = load_classifier(model_dir, TASKS["STS-B"], GlueProtocol(), seed=0)
    values = predict(model, enc, batch_size=3)
    assert values.dtype == np.float64 and values.shape == (10,)
    one_by_one = [predict(model, encode_split(GlueSplit("x", "x", (e,), "x"), tok, 128))[0]
                  for e in split.examples]
    assert values == pytest.approx(one_by_one, abs=1e-5)
