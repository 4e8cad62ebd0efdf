"""Checkpoints: our format round trips, the released crammedBERT format, strict loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modelcheck import mini
from ultrafastbert.model import (
    DenseFF,
    FFFSpec,
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    UltraFastBertModel,
    from_pretrained,
)
from ultrafastbert.model.checkpoint import checkpoint_tensors


def inputs():
    ids = torch.tensor([[9, 20, 33, 47, 11, 5, 8, 60], [12, 13, 14, 15, 0, 0, 0, 0]])
    return ids, (ids != 0).long()


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(ids, mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


# ------------------------------------------------------------------------------ our format
@pytest.mark.parametrize("cls", [UltraFastBertForMaskedLM, UltraFastBertForSequenceClassification,
                                 UltraFastBertModel])
def test_round_trip_gives_identical_outputs(tmp_path, cls):
    torch.manual_seed(0)
    model = cls(mini(num_labels=3, label_names=("x", "y", "z"))).eval()
    model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left behind
    loaded = from_pretrained(tmp_path / "ck")  # the class comes from config.json
    assert type(loaded) is cls and loaded.config == model.config and not loaded.training
    ids, mask = inputs()
    assert torch.equal(outputs(loaded, ids, mask), outputs(model, ids, mask))
    assert type(cls.from_pretrained(tmp_path / "ck")) is cls


def test_saved_files_use_the_checkpoint_names(tmp_path):
    model = UltraFastBertForMaskedLM(mini())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "decoder.weight" not in tensors  # tied: stored once
    assert "encoder.layers.1.attn.self_attention.query_key_value.weight" in tensors
    assert tensors["encoder.layers.0.ffn.linear_in.weight"].shape == (2 * 15, 32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ultrafastbert"
    assert config["architectures"] == ["UltraFastBertForMaskedLM"]
    assert config["ff"] == {"kind": "fff", "n_trees": 2, "depth": 3}
    bare = load_file(_save(UltraFastBertModel(mini()), tmp_path / "bare") / "model.safetensors")
    assert set(bare) == set(tensors)  # the bare encoder uses the same encoder.* names


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_saving_replaces_a_checkpoint_but_not_a_foreign_directory(tmp_path):
    first, second = UltraFastBertForMaskedLM(mini()), UltraFastBertForMaskedLM(mini())
    first.save_pretrained(tmp_path / "ck")
    second.save_pretrained(tmp_path / "ck")
    ids, mask = inputs()
    assert torch.equal(outputs(from_pretrained(tmp_path / "ck"), ids, mask),
                       outputs(second.eval(), ids, mask))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        first.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "run"]


def test_tokenizer_travels_with_the_model(tmp_path):
    from ultrafastbert.data.tokenizer import save_tokenizer, train_tokenizer

    tok = save_tokenizer(train_tokenizer(["the cat sat on the mat"] * 5, vocab_size=60),
                         tmp_path / "tok")
    model = UltraFastBertForMaskedLM(mini())
    model.save_pretrained(tmp_path / "a", tokenizer_file=tok)
    tok_config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert tok_config["mask_token"] == "<mask>" and tok_config["pad_token"] == "<pad>"
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # the tokenizer it was loaded with is kept
    assert (tmp_path / "b" / "tokenizer.json").read_text() == Path(tok).read_text()


def test_pretrained_encoder_starts_a_classifier(tmp_path):
    torch.manual_seed(0)
    mlm = UltraFastBertForMaskedLM(mini()).eval()
    mlm.save_pretrained(tmp_path)
    clf = UltraFastBertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert clf.head.weight.shape == (5, 24) and clf.config.num_labels == 5
    ids, mask = inputs()
    assert torch.equal(outputs(clf.encoder, ids, mask), outputs(mlm.encoder, ids, mask))
    # and a classifier's own head must then match its shape: the error names key and shapes
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match=r"head.weight has shape \(5, 24\).*expects \(2, 24\)"):
        UltraFastBertForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=2)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("encoder.layers.1.norm2.weight"),
     ["1 missing", "missing encoder.layers.1.norm2.weight (32,)"]),
    (lambda t: t.update({"encoder.layers.1.extra": torch.zeros(3)}),
     ["1 unexpected", "unexpected encoder.layers.1.extra (3,)"]),
    (lambda t: t.update({"encoder.layers.0.ffn.linear_in.weight": torch.zeros(31, 32)}),
     ["encoder.layers.0.ffn.linear_in.weight has shape (31, 32)", "expects (30, 32)"]),
    (lambda t: t.pop("head.bias"), ["part of the head", "head.bias"]),
])
def test_missing_unexpected_and_misshaped_tensors_are_errors(tmp_path, edit, words):
    model = UltraFastBertForSequenceClassification(mini())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path)
    for word in words:
        assert word in str(err.value)


def test_torch_weights_load_only_with_weights_only(tmp_path):
    model = UltraFastBertForMaskedLM(mini()).eval()
    model.save_pretrained(tmp_path)
    torch.save(checkpoint_tensors(model), tmp_path / "model.pt")
    (tmp_path / "model.safetensors").unlink()
    ids, mask = inputs()
    assert torch.equal(outputs(from_pretrained(tmp_path), ids, mask), outputs(model, ids, mask))
    torch.save({"weights": object()}, tmp_path / "model.pt")  # a pickle that is not tensors
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        from_pretrained(tmp_path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------- released format
def released_arch(config: ModelConfig, **changes) -> dict:
    """The crammed ``arch`` dict as the released config.json spells it."""
    ff = config.ff
    arch = {
        "architectures": ["ScriptableCrammedBERT"], "num_transformer_layers": config.n_layers,
        "hidden_size": config.d_model, "hidden_dropout_prob": 0.1, "norm": "LayerNorm",
        "norm_eps": 1e-12, "norm_scheme": "pre", "nonlin": "GELU", "tie_weights": True,
        "decoder_bias": False, "sparse_prediction": 0.25, "loss": "cross-entropy",
        "objective_layout": "MLM",
        "embedding": {"vocab_size": config.vocab_size, "pos_embedding": "scaled-sinusoidal",
                      "dropout_prob": 0.1, "pad_token_id": 0,
                      "max_seq_length": config.max_seq_len, "embedding_dim": config.d_model,
                      "normalization": True, "stable_low_precision": False},
        "attention": {"type": "self-attention", "causal_attention": False,
                      "num_attention_heads": config.n_heads, "dropout_prob": 0.1,
                      "skip_output_projection": False, "qkv_bias": False,
                      "rotary_embedding": False, "seq_op_in_fp32": False,
                      "sequence_op": "torch-softmax"},
        "init": {"type": "normal", "std": 0.02}, "ffn_layer_frequency": 1,
        "skip_head_transform": True, "use_bias": False, "final_norm": True, "num_labels": None,
        "classification_head": {"pooler": "zero_index", "include_ff_layer": True,
                                "head_dim": config.classifier_width, "nonlin": "Tanh",
                                "classifier_dropout": 0.1},
    }
    if isinstance(ff, FFFSpec):
        arch.update(intermed_type="fff", intermed_size=ff.n_trees, intermed_depth=ff.depth)
    else:
        arch.update(intermed_size=ff.width)  # the original dense crammedBERT has no intermed_type
    for key, value in changes.items():
        node = arch
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return arch


def write_released(folder: Path, model, architecture="ScriptableLMForPreTraining", **changes):
    """A directory exactly like pbelcak/UltraFastBERT-1x11-long, from one of our models."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    arch = released_arch(config, **changes)
    (folder / "config.json").write_text(json.dumps(
        {"arch": arch, "architectures": [architecture], "model_type": "crammedBERT",
         "torch_dtype": "float32", "transformers_version": "4.35.2"}, indent=2))
    model_config = json.loads(json.dumps(arch))
    model_config["embedding"]["vocab_size"] = None
    (folder / "model_config.json").write_text(json.dumps(model_config))
    tensors = {}
    for key, value in checkpoint_tensors(model).items():
        if isinstance(config.ff, DenseFF):
            key = key.replace(".ffn.linear_in.", ".ffn.dense_in.")
            key = key.replace(".ffn.linear_out.", ".ffn.dense_out.")
        tensors[key] = value.clone()
    for i in range(config.n_layers):  # the original's registered buffer
        tensors[f"encoder.layers.{i}.attn.self_attention.norm_factor"] = torch.tensor(
            config.head_dim).rsqrt()
    if architecture == "ScriptableLMForPreTraining":  # the tied matrix, stored a second time
        tensors["decoder.weight"] = tensors["encoder.embedding.word_embedding.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("ff", [FFFSpec(2, 3), FFFSpec(1, 4), DenseFF(24)])
def test_released_format_loads_with_identical_outputs(tmp_path, ff):
    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(mini(ff=ff)).eval()
    folder = write_released(tmp_path / "released", model)
    loaded = from_pretrained(folder)
    assert type(loaded) is UltraFastBertForMaskedLM
    assert loaded.config.ff == ff and loaded.config.pooler == "first"
    ids, mask = inputs()
    assert torch.equal(outputs(loaded, ids, mask), outputs(model, ids, mask))
    loaded.save_pretrained(tmp_path / "ours")  # converts to our format
    assert torch.equal(outputs(from_pretrained(tmp_path / "ours"), ids, mask),
                       outputs(model, ids, mask))


def test_released_classifier_loads(tmp_path):
    torch.manual_seed(0)
    model = UltraFastBertForSequenceClassification(mini(num_labels=3, pooler="first")).eval()
    folder = write_released(tmp_path, model, "ScriptableLMForSequenceClassification",
                            num_labels=3)
    loaded = from_pretrained(folder)
    assert type(loaded) is UltraFastBertForSequenceClassification
    ids, mask = inputs()
    assert torch.equal(outputs(loaded, ids, mask), outputs(model, ids, mask))


def test_released_model_config_without_vocab_size(tmp_path):
    model = UltraFastBertForMaskedLM(mini())
    folder = write_released(tmp_path, model)
    config = json.loads((folder / "config.json").read_text())
    del config["arch"]  # only model_config.json (vocab_size null) describes the network
    (folder / "config.json").write_text(json.dumps(config))
    assert from_pretrained(folder).config.vocab_size == 64


@pytest.mark.parametrize("change, words", [
    ({"attention.rotary_embedding": True}, ["arch.attention.rotary_embedding = True",
                                            "only False"]),
    ({"nonlin": "GELUglu"}, ["arch.nonlin = 'GELUglu'", "GeGLU"]),
    ({"norm": "RMSNorm"}, ["arch.norm = 'RMSNorm'", "only 'LayerNorm'"]),
    ({"intermed_type": "moe"}, ["arch.intermed_type = 'moe'", "['ff', 'fff']"]),
    ({"classification_head.pooler": "lse"}, ["pooler = 'lse'", "avg", "zero_index"]),
])
def test_released_options_we_do_not_implement_are_refused(tmp_path, change, words):
    folder = write_released(tmp_path, UltraFastBertForMaskedLM(mini()), **change)
    with pytest.raises(ValueError) as err:
        from_pretrained(folder)
    for word in words:
        assert word in str(err.value)


def test_released_inconsistent_tensors_are_refused(tmp_path):
    folder = write_released(tmp_path, UltraFastBertForMaskedLM(mini()))
    tensors = load_file(folder / "model.safetensors")
    tensors["decoder.weight"] = tensors["decoder.weight"] + 1.0
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="decoder.weight differs"):
        from_pretrained(folder)
    tensors["decoder.weight"] = tensors["encoder.embedding.word_embedding.weight"].clone()
    tensors["encoder.layers.0.attn.self_attention.norm_factor"] = torch.tensor(0.25)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm_factor = 0.25.*1/sqrt\(head_dim\)"):
        from_pretrained(folder)


def test_released_qkv_layout_is_megatron_not_hugging_face(tmp_path):
    """A hand-made attention case that a ``[q | k | v]`` reading of the fused matrix gets wrong.

    d_model 4, two heads of width 2, one layer, the FF contributing nothing, no positions.
    Megatron/NeoX rows are ``[head][q, k, v][2]``: queries are all zero, so attention is uniform
    and each position receives the mean over the sequence of its head's values, which are the
    normalised inputs themselves. Output = final_norm(x + mean_s(norm1(x))), by hand.
    """
    config = ModelConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=2, max_seq_len=4,
                         ff=DenseFF(1), classifier_width=4)
    model = UltraFastBertForMaskedLM(config).eval()
    emb = torch.tensor([[0.0, 0, 0, 0], [1.0, -2, 0.5, 3], [-1.0, 0, 2, 1], [0.3, 1.2, -2, 0.1],
                        [2.0, 1, -1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    key_rows = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    qkv = torch.zeros(12, 4)
    for head in range(2):  # rows head*6 + [q0 q1 k0 k1 v0 v1]
        qkv[head * 6 + 2: head * 6 + 4] = 3.0 * key_rows[2 * head: 2 * head + 2]  # keys
        qkv[head * 6 + 4: head * 6 + 6] = key_rows[2 * head: 2 * head + 2]  # values: identity
    with torch.no_grad():
        model.encoder.embedding.word_embedding.weight.copy_(emb)
        model.encoder.embedding.pos_embedding.scale_factor.zero_()
        layer = model.encoder.layers[0]
        layer.attn.self_attention.query_key_value.weight.copy_(qkv)
        layer.attn.dense.weight.copy_(torch.eye(4))
        layer.ffn.linear_out.weight.zero_()
    folder = write_released(tmp_path, model)
    loaded = from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got = loaded.encoder(ids).last_hidden_state[0]

    def ln(t):
        return F.layer_norm(t, (4,), eps=1e-12)

    x = ln(emb[ids[0]])
    h = ln(x)
    assert torch.allclose(got, ln(x + h.mean(0, keepdim=True)), atol=1e-5)
    # The same matrix read as [q | k | v] (Hugging Face BERT) gives something else:
    q, k, v = (h @ qkv[i * 4:(i + 1) * 4].T for i in range(3))
    heads = [torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(2), -1) @ v[:, s]
             for s in (slice(0, 2), slice(2, 4))]
    hf_reading = ln(x + torch.cat(heads, dim=1))
    assert (got - hf_reading).abs().max() > 0.1


# ------------------------------------------------------------------------- class registry
def test_model_classes_register_themselves_and_declare_their_layout(tmp_path):
    from ultrafastbert.model.checkpoint import MODEL_CLASSES, checkpoint_tensors_of
    from ultrafastbert.model.pretrained import PretrainedMixin

    for cls in (UltraFastBertModel, UltraFastBertForMaskedLM,
                UltraFastBertForSequenceClassification):
        assert MODEL_CLASSES[cls.__name__] is cls
    encoder_keys = set(checkpoint_tensors_of(UltraFastBertModel(mini())))
    mlm_keys = set(checkpoint_tensors_of(UltraFastBertForMaskedLM(mini())))
    assert all(k.startswith("encoder.") for k in encoder_keys)  # checkpoint_prefix
    assert mlm_keys == encoder_keys  # tied_keys: the decoder is the token embedding, not stored

    class MyEncoder(UltraFastBertModel):  # a subclass registers too, and loads by its name
        pass

    assert issubclass(MyEncoder, PretrainedMixin) and MODEL_CLASSES["MyEncoder"] is MyEncoder
    MyEncoder(mini()).save_pretrained(tmp_path / "mine")
    assert type(from_pretrained(tmp_path / "mine")) is MyEncoder
    del MODEL_CLASSES["MyEncoder"]
