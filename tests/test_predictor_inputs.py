"""Predictor inputs (issue 13, item 11): a string or a list for every task; texts that
normalise to nothing are reported. One rule for config.json keys (item 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from train_helpers import tiny_run  # noqa: F401
from ultrafastbert.errors import ConfigError
from ultrafastbert.infer import Predictor

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ultrafastbert.model import (
        ModelConfig,
        UltraFastBertForMaskedLM,
        UltraFastBertForSequenceClassification,
    )

    config = ModelConfig.from_dict(json.loads((FIXTURES / "train_model.json").read_text()))
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    tokenizer = FIXTURES / "train_tokenizer.json"
    UltraFastBertForMaskedLM(config).save_pretrained(root / "mlm", tokenizer_file=tokenizer)
    UltraFastBertForSequenceClassification(config.replace(num_labels=3)).save_pretrained(
        root / "cls", tokenizer_file=tokenizer)
    return {"mlm": root / "mlm", "cls": root / "cls"}


def test_each_task_takes_a_string_or_a_list(model_dirs: dict[str, Path]) -> None:
    mlm = Predictor.from_pretrained(model_dirs["mlm"], batch_size=1)
    texts = ["the <mask> is here", "a [MASK] and a <mask>"]
    many = mlm.fill_mask(texts, top_k=3)
    assert isinstance(many, list) and len(many) == 2  # two batches of one
    assert [m.candidates for m in many] == [mlm.fill_mask(t, top_k=3).candidates for t in texts]
    assert len(many[1].candidates) == 2
    one = mlm.embed("the cat")
    assert one.shape == (64,)
    torch.testing.assert_close(one, mlm.embed(["the cat", "a dog"])[0])
    cls = Predictor.from_pretrained(model_dirs["cls"])
    single = cls.classify("the cat", "a dog")
    assert single == cls.classify(["the cat"], ["a dog"])[0]
    with pytest.raises(TypeError, match="a string or a list of strings, got a list holding int"):
        mlm.embed([1, 2])


def test_texts_that_normalise_to_nothing_are_reported(model_dirs: dict[str, Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    p = Predictor.from_pretrained(model_dirs["mlm"])
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.infer.predictor"):
        vectors = p.embed(["", "日本語", "the cat"])
    assert "2 text(s) have no tokens after normalisation, e.g. ''" in caplog.text
    torch.testing.assert_close(vectors[0], vectors[1])  # why it must be said: the same vector
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.infer.predictor"):
        p.embed(["the cat", "café"])  # accents are stripped, not dropped: no warning
    assert "no tokens" not in caplog.text


def test_pretrain_config_accepts_what_save_pretrained_writes(model_dirs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from ultrafastbert.cli.pretrain import model_config_file
    from ultrafastbert.model import from_pretrained

    saved = from_pretrained(model_dirs["cls"]).config
    assert model_config_file(model_dirs["cls"] / "config.json") == saved
    assert model_config_file(model_dirs["cls"]) == saved  # the directory works too
    data = json.loads((model_dirs["cls"] / "config.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**data, "n_head": 2}))
    with pytest.raises(ConfigError, match=r"unknown keys 'n_head' \(did you mean 'n_heads'\?\)"):
        model_config_file(tmp_path / "bad.json")


def test_intermediate_checkpoints_load(tiny_run: Path) -> None:  # noqa: F811
    """``OUT/checkpoints/step-N`` loads like ``OUT`` (item 13): config from OUT/run.json."""
    from ultrafastbert.model import UltraFastBertModel, from_pretrained
    from ultrafastbert.train.checkpoint import latest_checkpoint

    step = latest_checkpoint(tiny_run / "checkpoints").path
    final, intermediate = from_pretrained(tiny_run), from_pretrained(step)
    assert type(intermediate) is type(final)
    for key, value in final.state_dict().items():
        torch.testing.assert_close(intermediate.state_dict()[key], value)  # the last step
    assert intermediate.tokenizer_file == tiny_run / "tokenizer.json"
    assert UltraFastBertModel.from_pretrained(step).config.n_layers == final.config.n_layers
    result = Predictor.from_pretrained(step).fill_mask("the <mask> is here")
    assert len(result.candidates[0]) == 5


def test_saved_files_have_the_usual_permissions(model_dirs: dict[str, Path],
                                                tiny_run: Path) -> None:  # noqa: F811
    """``model.safetensors`` was 0600 while the other files were 0644 (item 9)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for folder in (model_dirs["mlm"], tiny_run):
        assert (folder.stat().st_mode & 0o777) == 0o777 & ~mask
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert ((folder / name).stat().st_mode & 0o777) == 0o666 & ~mask, name


def test_left_padding_with_first_token_pooling(model_dirs: dict[str, Path],
                                               monkeypatch) -> None:
    """First-token pooling on a left-padded batch reads position 0, a padding row; the
    feed-forward blocks skipped it, so the logits differed from the original model's (item 15).
    Position 0 is now computed for that pooler: the logits equal those with no row skipped."""
    from ultrafastbert.model import encoder as encoder_module
    from ultrafastbert.model import from_pretrained

    model = from_pretrained(model_dirs["cls"], pooler="first").eval()
    mean_model = from_pretrained(model_dirs["cls"], pooler="mean").eval()
    ids = torch.tensor([[0, 0, 0, 17, 40, 5], [23, 9, 31, 12, 8, 5]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        ours, mean = model(ids, mask).logits, mean_model(ids, mask).logits
        monkeypatch.setattr(encoder_module, "token_rows", lambda keep: None)  # no row skipped
        dense, dense_mean = model(ids, mask).logits, mean_model(ids, mask).logits
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, dense_mean, atol=1e-5, rtol=1e-5)  # mean never reads pads
