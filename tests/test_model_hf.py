"""Hugging Face interop: Auto* round trips both ways, the tokenizer, the lazy registration hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import modelcheck

transformers = pytest.importorskip("transformers")

from ultrafastbert.model import (  # noqa: E402
    ModelConfig,
    UltraFastBertForMaskedLM,
    UltraFastBertForSequenceClassification,
    from_pretrained,
)
from ultrafastbert.model.hf import (  # noqa: E402
    UltraFastBertConfig,
    load_tokenizer,
    register_with_transformers,
)


def mini(**changes) -> ModelConfig:
    return modelcheck.mini(**{"vocab_size": 96, **changes})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An MLM checkpoint of ours, with a tokenizer."""
    from ultrafastbert.data.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("hf")
    tok = save_tokenizer(train_tokenizer(["a cat and a dog sat on the mat"] * 4, vocab_size=96),
                         folder / "tok")
    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(mini()).eval()
    model.save_pretrained(folder / "mlm", tokenizer_file=tok)
    return folder / "mlm", model


IDS = torch.tensor([[9, 20, 33, 47, 11, 5], [12, 13, 14, 0, 0, 0]])
MASK = (IDS != 0).long()


def test_auto_classes_load_our_checkpoint(saved):
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    register_with_transformers()
    register_with_transformers()  # idempotent
    folder, model = saved
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, UltraFastBertConfig) and config.to_model_config() == model.config
    with torch.no_grad():
        mlm = AutoModelForMaskedLM.from_pretrained(folder).eval()
        assert mlm.decoder.weight is mlm.encoder.embedding.word_embedding.weight
        assert torch.equal(mlm(input_ids=IDS, attention_mask=MASK).logits,
                           model(IDS, MASK).logits)
        base = AutoModel.from_pretrained(folder).eval()
        assert torch.equal(base(input_ids=IDS, attention_mask=MASK).last_hidden_state,
                           model.encoder(IDS, MASK).last_hidden_state)
        clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
        assert clf(input_ids=IDS, attention_mask=MASK).logits.shape == (2, 3)
        assert torch.equal(clf.encoder(IDS, MASK).last_hidden_state,
                           model.encoder(IDS, MASK).last_hidden_state)


def test_hugging_face_saves_load_back_into_our_classes(saved, tmp_path):
    from transformers import AutoModelForSequenceClassification

    register_with_transformers()
    folder, model = saved
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    clf.save_pretrained(tmp_path / "clf")
    ours = from_pretrained(tmp_path / "clf")
    assert isinstance(ours, UltraFastBertForSequenceClassification)
    assert ours.config.num_labels == 3
    with torch.no_grad():
        assert torch.equal(ours(IDS, MASK).logits, clf(input_ids=IDS, attention_mask=MASK).logits)


def test_training_through_the_wrapper_updates_our_modules(saved):
    from transformers import AutoModelForMaskedLM

    register_with_transformers()
    mlm = AutoModelForMaskedLM.from_pretrained(saved[0])
    mlm.train()
    assert mlm.core.training and mlm.encoder.layers[0].dropout.training
    labels = torch.full_like(IDS, -100)
    labels[0, 1] = 5
    loss = mlm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    loss.backward()
    assert mlm.encoder.layers[0].ffn.linear_in.weight.grad.abs().sum() > 0


def test_tokenizer_loads_as_pretrained_tokenizer_fast(saved):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = saved[0]
    for tok in (load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)):
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert tok.mask_token == "<mask>" and tok.pad_token_id == 0
        ids = tok("a cat <mask>")["input_ids"]
        assert ids[-1] == tok.sep_token_id and tok.mask_token_id in ids


def test_config_json_is_both_ours_and_hugging_faces(saved):
    data = json.loads((saved[0] / "config.json").read_text())
    hf = UltraFastBertConfig(**{k: v for k, v in data.items() if k != "model_type"})
    assert hf.to_model_config() == saved[1].config
    assert hf.hidden_size == 32 and hf.num_hidden_layers == 2  # the usual HF attribute names
    back = UltraFastBertConfig.from_model_config(mini(num_labels=4, label_names=list("abcd")))
    assert back.num_labels == 4 and back.id2label[3] == "d"


def test_import_ultrafastbert_hook_makes_auto_classes_work(saved):
    """In a fresh interpreter: install the hook, then use transformers as a user would."""
    code = textwrap.dedent(f"""
        import sys
        import ultrafastbert
        from ultrafastbert.model.hf_hook import install_transformers_hook
        install_transformers_hook()  # a no-op when ``import ultrafastbert`` installed it already
        assert "transformers" not in sys.modules  # importing ultrafastbert did not import it
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(saved[0])!r})
        print(type(model).__name__)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HFUltraFastBertForMaskedLM"
