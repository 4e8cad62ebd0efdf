"""benchmarks/glue_text_corpus.py: distillation text from GLUE train splits only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_glue_cli import _write, make_glue_dir
from ultrafastbert.data.corpus import open_corpus


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "glue_text_corpus.py"
    spec = importlib.util.spec_from_file_location("glue_text_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _split_texts(glue: Path, task: str, split: str) -> set[str]:
    from ultrafastbert.glue.data import find_task_dir, read_tsv
    from ultrafastbert.glue.tasks import get_task

    t = get_task(task)
    data = read_tsv(find_task_dir(glue, t) / f"{split}.tsv", t, split)
    return {x for e in data.examples for x in (e.text_a, e.text_b) if x}


def test_train_text_only_sts_b_left_out_and_readable(tmp_path):
    glue = make_glue_dir(tmp_path / "glue")
    out = tmp_path / "c.jsonl"
    assert _script().main(["--glue-dir", str(glue), "--out", str(out)]) == 0
    texts = _texts(out)
    assert len(texts) == len(set(texts)) > 0
    train = _split_texts(glue, "RTE", "train") | _split_texts(glue, "CoLA", "train")
    assert set(texts) <= train
    dev_only = (_split_texts(glue, "RTE", "dev") | _split_texts(glue, "CoLA", "dev")) - train
    assert dev_only and not set(texts) & dev_only
    sts_only = _split_texts(glue, "STS-B", "train") - train
    assert sts_only and not set(texts) & sts_only
    assert list(open_corpus(str(out))) == texts  # the corpus readers take it as it is


def test_keeps_sts_b_when_asked_and_drops_short_texts(tmp_path):
    glue = make_glue_dir(tmp_path / "glue")
    _write(glue / "WNLI" / "train.tsv", [["index", "sentence1", "sentence2", "label"],
                                         ["0", "too short", "long enough text here", "1"]])
    out = tmp_path / "c.jsonl"
    assert _script().main(["--glue-dir", str(glue), "--out", str(out), "--exclude", ""]) == 0
    texts = set(_texts(out))
    assert _split_texts(glue, "STS-B", "train") <= texts
    assert "long enough text here" in texts and "too short" not in texts


def test_no_train_split_is_an_error(tmp_path):
    import pytest

    glue = make_glue_dir(tmp_path / "glue")
    with pytest.raises(SystemExit, match="no GLUE train split"):
        _script().main(["--glue-dir", str(glue), "--out", str(tmp_path / "c.jsonl"),
                        "--exclude", "RTE,STS-B,CoLA"])


def test_longest_only_drops_contained_phrases():
    texts = ["a good film", "good film", "a bad one .", "film", "other words"]
    assert _script().longest_only(texts) == ["a good film", "a bad one .", "other words"]


def test_augment_uses_only_the_texts_own_words_and_is_seeded():
    script = _script()
    texts = ["the cat sat on the mat", "dogs bark at night", "a quiet evening walk home"]
    words = {w for t in texts for w in t.split()}
    out = script.augment(texts, 4, seed=3)
    assert len(out) == 4 * len(texts)
    assert all(set(t.split()) <= words and t for t in out)
    assert set(out) - set(texts)  # altered, not copies
    assert out == script.augment(texts, 4, seed=3) != script.augment(texts, 4, seed=4)
    assert script.augment(texts, 0) == []
