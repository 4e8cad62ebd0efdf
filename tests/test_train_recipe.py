"""The crammed recipe against hand computation: lr factor, batch ramp, weight-decay groups."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from ultrafastbert.cli.pretrain import parse_duration, parse_save_every
from ultrafastbert.model import ModelConfig, UltraFastBertForMaskedLM
from ultrafastbert.train import CrammedRecipe, LoopConfig, WarmupCosineSchedule, parameter_groups


# ------------------------------------------------------------------------ learning rate
@pytest.mark.parametrize(("progress", "factor"), [
    (0.0, 0.25),    # 0.25 + 0     vs 4
    (0.25, 0.5),    # 0.25 + 0.25  vs 3
    (0.5, 0.75),    # 0.75         vs 2
    (0.75, 1.0),    # the peak: 1.0 = 4 - 3
    (0.8, 0.8),     # 1.05         vs 4 - 3.2 = 0.8
    (0.9, 0.4),     # 1.15         vs 0.4
    (1.0, 0.0),
    (1.5, 0.0),     # progress is clipped to [0, 1]
    (-0.5, 0.25),
])
def test_lr_factor_matches_hand_computation(progress: float, factor: float) -> None:
    assert CrammedRecipe().schedule().lr_factor(progress) == pytest.approx(factor, abs=1e-12)


def test_lr_factor_negative_control() -> None:
    schedule = CrammedRecipe().schedule()
    assert schedule.lr_factor(0.75) != pytest.approx(schedule.lr_factor(0.6))
    assert max(schedule.lr_factor(p / 1000) for p in range(1001)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ batch ramp
@pytest.mark.parametrize(("progress", "accumulation"), [
    (0.0, 1),       # the micro-batch: 128 sequences
    (0.15, 16),     # 128 + 8064 * 0.25 = 2144 -> 16.75 -> 16 micro-batches
    (0.3, 32),      # 128 + 8064 * 0.5  = 4160 -> 32.5  -> 32
    (0.45, 48),     # 128 + 8064 * 0.75 = 6176 -> 48.25 -> 48
    (0.6, 64),      # the target: 8192 = 64 x 128
    (0.9, 64),
    (1.0, 64),
])
def test_batch_ramp_full_scale(progress: float, accumulation: int) -> None:
    schedule = CrammedRecipe().schedule()  # micro 128, target 8192, ramp over 60%
    assert schedule.accumulation(progress) == accumulation
    assert schedule.batch_size(progress) == 128 * accumulation


def test_batch_ramp_small() -> None:
    """The settings of the golden run (micro 8, target 16, 8 steps): 1,1,1,1,1,2,2,2."""
    schedule = CrammedRecipe(micro_batch=8, target_batch=16).schedule()
    assert [schedule.accumulation(s / 8) for s in range(8)] == [1, 1, 1, 1, 1, 2, 2, 2]
    # step 4: p = 0.5 -> 8 + 8 * 0.8333 = 14.67 -> 1; step 5: p = 0.625 -> 16 -> 2


def test_target_must_be_a_multiple_of_micro_batch() -> None:
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        CrammedRecipe(micro_batch=96, target_batch=8192)


@pytest.mark.parametrize("field", ["lr", "eps", "grad_clip", "micro_batch"])
def test_recipe_rejects_nonpositive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CrammedRecipe(**{field: 0})


def test_recipe_defaults_are_the_paper() -> None:
    r = CrammedRecipe()
    assert (r.lr, r.betas, r.eps, r.weight_decay, r.grad_clip) == (1e-3, (0.9, 0.98), 1e-12,
                                                                    0.01, 0.5)
    assert (r.target_batch, r.ramp_fraction) == (8192, 0.6)


# --------------------------------------------------------------------------- weight decay
def _tiny_mlm() -> UltraFastBertForMaskedLM:
    return UltraFastBertForMaskedLM(ModelConfig(vocab_size=50, d_model=16, n_layers=1,
                                                n_heads=2, max_seq_len=8, ff={"kind": "fff",
                                                "n_trees": 1, "depth": 2}))


def test_no_decay_on_norms_biases_scalars() -> None:
    groups = {g["weight_decay"]: set(g["names"]) for g in parameter_groups(_tiny_mlm(), 0.01)}
    no_decay, decay = groups[0.0], groups[0.01]
    assert {"encoder.embedding.norm.weight", "encoder.embedding.norm.bias",
            "encoder.layers.0.norm1.weight", "encoder.layers.0.ffn.linear_in.bias",
            "encoder.embedding.pos_embedding.scale_factor",
            "encoder.final_norm.weight"} <= no_decay
    assert {"encoder.embedding.word_embedding.weight", "encoder.layers.0.ffn.linear_in.weight",
            "encoder.layers.0.attn.self_attention.query_key_value.weight"} <= decay
    assert not no_decay & decay
    assert "decoder.weight" not in decay | no_decay  # tied to the embedding: listed once


def test_decay_groups_behave_in_adamw() -> None:
    """With zero gradients AdamW only decays: matrices shrink by lr*wd, the rest stay put."""
    model = _tiny_mlm()
    recipe = CrammedRecipe(lr=0.1, weight_decay=0.5)
    opt = recipe.optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    matrix = "encoder.layers.0.attn.dense.weight"
    torch.testing.assert_close(after[matrix], before[matrix] * (1 - 0.1 * 0.5))
    norm = "encoder.layers.0.norm2.weight"
    torch.testing.assert_close(after[norm], before[norm], rtol=0, atol=0)
    assert not torch.equal(after[matrix], before[matrix])  # negative control


def test_groups_skip_frozen_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    names = [n for g in parameter_groups(model, 0.01) for n in g["names"]]
    assert names == ["0.bias", "1.weight", "1.bias"]


# ------------------------------------------------------------------- other schedules, config
def test_warmup_cosine() -> None:
    s = WarmupCosineSchedule(warmup=0.1)
    assert s.lr_factor(0.0) == 0.0
    assert s.lr_factor(0.05) == pytest.approx(0.5)
    assert s.lr_factor(0.1) == pytest.approx(1.0)
    assert s.lr_factor(0.55) == pytest.approx(0.5)
    assert s.lr_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    assert s.accumulation(0.3) == 1


def test_loop_config_needs_exactly_one_length() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LoopConfig()
    with pytest.raises(ValueError, match="exactly one"):
        LoopConfig(max_steps=10, budget_s=60)
    assert LoopConfig(max_steps=10).progress(5, 1e9) == 0.5
    assert LoopConfig(budget_s=60).progress(10**6, 30) == 0.5


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("24h", 86400),
                                               ("1h30m", 5400), ("1.5h", 5400), ("2d", 172800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text", ["0s", "0m", "5", "abc", "5x", "", "m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_parse_save_every() -> None:
    assert parse_save_every("500") == (500, None)
    assert parse_save_every("30m") == (None, 1800.0)
