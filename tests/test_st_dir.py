"""A converted sentence-transformers model is a sentence-transformers directory: the real
``SentenceTransformer`` loads it and gives ``Predictor.embed``'s vectors, normalisation included."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

from convertcheck import tiny_bert, tiny_corpus  # noqa: E402

TEXTS = ["the king saw the queen.", "a dog ran by the river at night.", "water and fire"]


def _convert(src, out, corpus):
    from ultrafastbert.convert.pipeline import ConvertSettings, run

    run(ConvertSettings(source=src, out=out, fff="2x3", budget_s=3.0, corpus=str(corpus),
                        init_tokens=400, batch_size=8, progress=False))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    src = tiny_bert(root / "src", sentence_transformers=True)
    return src, _convert(src, root / "out", tiny_corpus(root / "c.txt", 200))


def _encode(directory) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    import ultrafastbert  # noqa: F401  (registers the converted classes with transformers)

    model = SentenceTransformer(str(directory), device="cpu")
    return model.encode(TEXTS, convert_to_tensor=True).float()


def test_sentence_transformer_gives_the_predictors_vectors(converted):
    from ultrafastbert.infer import Predictor

    src, out = converted
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert (out / "1_Pooling" / "config.json").read_bytes() == \
        (src / "1_Pooling" / "config.json").read_bytes()
    got = _encode(out)
    want = Predictor.from_pretrained(out).embed(TEXTS)
    assert got.shape == want.shape == (3, 32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)  # normalised
    # the converted model, not the dense source, is what sentence-transformers ran
    assert not torch.allclose(got, _encode(src), atol=1e-3)


def test_without_the_module_files_vectors_are_not_normalised(converted, tmp_path):
    """Negative control (the state before the module files were written): sentence-transformers
    falls back to a bare mean pooling, whose vectors are not the Predictor's."""
    from ultrafastbert.infer import Predictor

    _, out = converted
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for name in ("modules.json", "1_Pooling", "2_Normalize", "sentence_bert_config.json"):
        path = bare / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    got = _encode(bare)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-3)
    want = Predictor.from_pretrained(out).embed(TEXTS)
    assert not torch.allclose(got, want, atol=1e-3)


def test_a_plain_transformers_source_gets_no_module_files(tmp_path):
    src = tiny_bert(tmp_path / "src")
    out = _convert(src, tmp_path / "out", tiny_corpus(tmp_path / "c.txt", 200))
    assert (out / "config.json").is_file() and not (out / "modules.json").exists()
