"""ModelConfig: presets, parameter counts, JSON, validation errors."""

from __future__ import annotations

import json

import pytest
import torch

from ultrafastbert.model import (
    PRESETS,
    DenseFF,
    FFFSpec,
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    preset_names,
)
from ultrafastbert.model.config import PAPER_FFF_SHAPES


def expected_parameters(c: ModelConfig) -> int:
    """Closed form of the encoder's unique parameters (the tied decoder adds none)."""
    d = c.d_model
    # dense: two bias-free matrices; FFF: w_in rows with their biases, w_out columns
    ff = 2 * d * c.ff.width if isinstance(c.ff, DenseFF) else c.ff.neurons * (2 * d + 1)
    layer = 2 * 2 * d + 3 * d * d + d * d + ff  # two LayerNorms, fused QKV, output projection
    return c.vocab_size * d + 1 + 2 * d + c.n_layers * layer + 2 * d


def meta_model(name: str, cls=UltraFastBertForMaskedLM):
    with torch.device("meta"):
        return cls(ModelConfig.from_preset(name))


def test_every_paper_configuration_has_a_preset():
    names = set(preset_names())
    assert {"crammedbert-3072", "crammedbert-4095", "ultrafastbert-1x11-long", "tiny-dense",
            "tiny-fff"} <= names
    assert {f"ultrafastbert-{k}x{d}" for k, d in PAPER_FFF_SHAPES} <= names
    assert len(PAPER_FFF_SHAPES) == 12


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_matches_the_architecture(name):
    model = meta_model(name)
    assert model.num_parameters() == expected_parameters(model.config)


def test_released_and_baseline_parameter_counts():
    # 163,671,025: the unique parameters of pbelcak/UltraFastBERT-1x11-long (tied decoder once).
    assert meta_model("ultrafastbert-1x11").num_parameters() == 163_671_025
    assert meta_model("ultrafastbert-1x11-long").num_parameters() == 163_671_025
    assert meta_model("crammedbert-4095").num_parameters() == 163_605_505
    assert meta_model("crammedbert-3072").num_parameters() == 138_464_257


def test_tied_decoder_counts_once_and_classifier_adds_its_head():
    mlm = meta_model("tiny-fff")
    assert mlm.decoder.weight is mlm.encoder.embedding.word_embedding.weight
    cls = meta_model("tiny-fff", UltraFastBertForSequenceClassification)
    c = cls.config
    head = c.d_model * c.classifier_width + c.classifier_width + c.classifier_width * 2 + 2
    assert cls.num_parameters() == mlm.num_parameters() + head


def test_presets_describe_the_paper():
    c = ModelConfig.from_preset("ultrafastbert-1x11")
    assert (c.n_layers, c.d_model, c.n_heads, c.vocab_size, c.max_seq_len) == (16, 768, 12,
                                                                              32768, 128)
    assert c.ff == FFFSpec(1, 11) and c.ff.neurons == 4095 and c.ff.active_neurons == 12
    assert ModelConfig.from_preset("crammedbert-4095").ff == DenseFF(4095)
    tiny = ModelConfig.from_preset("tiny-fff")
    assert (tiny.n_layers, tiny.d_model, tiny.n_heads, tiny.vocab_size) == (4, 256, 4, 8192)
    assert tiny.ff.neurons == 1023 and tiny.ff.active_neurons == 10
    assert ModelConfig.from_preset("tiny-dense").ff == DenseFF(1023)
    for k, d in PAPER_FFF_SHAPES:
        assert 3072 <= PRESETS[f"ultrafastbert-{k}x{d}"].ff.neurons <= 4608


def test_json_round_trip_and_overrides():
    c = ModelConfig.from_preset("tiny-dense", num_labels=3, label_names=("a", "b", "c"),
                                pooler="first")
    data = json.loads(json.dumps(c.to_dict()))
    assert data["ff"] == {"kind": "dense", "width": 1023}
    assert ModelConfig.from_dict(data) == c
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ModelConfig().d_model = 3


@pytest.mark.parametrize("changes, words", [
    ({"d_model": 0}, ["d_model", "0", ">= 1"]),
    ({"n_heads": 5}, ["d_model=768", "n_heads=5", "divisible"]),
    ({"pooler": "max"}, ["pooler", "'max'", "('first', 'mean')"]),
    ({"hidden_dropout": 1.5}, ["hidden_dropout", "1.5", "[0.0, 1.0)"]),
    ({"pad_token_id": 40000}, ["pad_token_id", "40000", "32767"]),
    ({"num_labels": 2, "label_names": ("a",)}, ["label_names", "2 strings"]),
    ({"ff": {"kind": "moe", "width": 3}}, ["ff.kind", "'moe'", "['dense', 'fff']"]),
    ({"ff": {"kind": "fff", "n_trees": 1}}, ["missing ['depth']"]),
    ({"ff": {"kind": "fff", "n_trees": 1, "depth": 30}}, ["ff.depth", "30", "[0, 20]"]),
    ({"ff": {"kind": "dense", "width": 8, "depth": 1}}, ["unexpected ['depth']"]),
    ({"n_layers": True}, ["n_layers", "True"]),
])
def test_validation_errors_name_field_value_and_allowed(changes, words):
    with pytest.raises(ValueError) as err:
        ModelConfig().replace(**changes)
    for word in words:
        assert word in str(err.value)


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown model config keys 'hidden_size'"):
        ModelConfig.from_dict({"hidden_size": 768})
    with pytest.raises(ValueError, match="unknown preset 'bert'.*tiny-fff"):
        ModelConfig.from_preset("bert")
