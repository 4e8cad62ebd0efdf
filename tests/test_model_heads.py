"""MLM and classification heads: losses against hand computation, pooling, label checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelcheck import mini
from ultrafastbert.model import (
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
)
from ultrafastbert.model.heads import pool


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 64, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    ids[2, 6:] = 0
    return ids, mask


def test_mlm_logits_and_sparse_loss_match_hand_computation():
    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(mini()).eval()
    ids, mask = batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 7], labels[2, 1] = 11, 30, 63
    with torch.no_grad():
        full = model(ids, mask).logits
        hidden = model.encoder(ids, mask).last_hidden_state
        out = model(ids, mask, labels=labels)
    assert full.shape == (3, 10, 64)
    torch.testing.assert_close(full, hidden @ model.encoder.embedding.word_embedding.weight.T)
    picked = full[labels != -100]
    assert out.logits.shape == (3, 64)  # only the labelled positions, row-major order
    torch.testing.assert_close(out.logits, picked)
    targets = torch.tensor([11, 30, 63])
    hand = -torch.log_softmax(picked, -1)[torch.arange(3), targets].mean()
    torch.testing.assert_close(out.loss, hand)


def test_mlm_decoder_is_tied_and_has_no_bias():
    model = UltraFastBertForMaskedLM(mini())
    assert model.decoder.weight is model.encoder.embedding.word_embedding.weight
    assert model.decoder.bias is None


def test_mlm_without_targets_gives_a_zero_loss_that_backpropagates():
    model = UltraFastBertForMaskedLM(mini())
    ids, mask = batch()
    out = model(ids, mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.logits.shape == (0, 64)
    out.loss.backward()


def test_mlm_label_errors():
    model = UltraFastBertForMaskedLM(mini())
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"labels shape \(3, 9\) must equal"):
        model(ids, mask, labels=torch.zeros(3, 9, dtype=torch.long))
    bad = torch.full_like(ids, -100)
    bad[0, 0] = 64
    with pytest.raises(ValueError, match=r"\[0, 64\) or -100, got 64"):
        model(ids, mask, labels=bad)


@pytest.mark.parametrize("pooler", ["first", "mean"])
def test_classification_logits_and_loss_match_hand_computation(pooler):
    torch.manual_seed(0)
    model = UltraFastBertForSequenceClassification(mini(num_labels=3, pooler=pooler)).eval()
    ids, mask = batch()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
        hidden = model.encoder(ids, mask).last_hidden_state
    if pooler == "first":
        pooled = hidden[:, 0]
    else:  # mean over real tokens only
        pooled = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(3)])
    hand_logits = model.head(torch.tanh(model.pooler.dense(pooled)))
    torch.testing.assert_close(out.logits, hand_logits)
    hand_loss = -torch.log_softmax(hand_logits, -1)[torch.arange(3), labels].mean()
    torch.testing.assert_close(out.loss, hand_loss)


def test_regression_uses_mse_on_one_output():
    torch.manual_seed(0)
    model = UltraFastBertForSequenceClassification(mini(num_labels=1)).eval()
    ids, mask = batch()
    target = torch.tensor([0.5, 3.0, -1.0])
    with torch.no_grad():
        out = model(ids, mask, labels=target)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - target) ** 2).mean())


def test_classification_label_errors():
    model = UltraFastBertForSequenceClassification(mini(num_labels=3))
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        model(ids, mask, labels=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 class labels"):
        model(ids, mask, labels=torch.zeros(3))


def test_classifier_head_shapes_follow_the_paper():
    model = UltraFastBertForSequenceClassification(ModelConfig.from_preset("tiny-fff"))
    assert model.pooler.dense.weight.shape == (1024, 256) and model.pooler.dense.bias is not None
    assert model.head.weight.shape == (2, 1024) and model.head.bias is not None
    assert isinstance(model.pooler.activation, torch.nn.Tanh)


def test_mean_pooling_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = pool(hidden, mask, "mean")
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    torch.testing.assert_close(pool(hidden, None, "first"), hidden[:, 0])
    assert F.mse_loss(pool(hidden, None, "mean"), hidden.mean(1)) == 0
