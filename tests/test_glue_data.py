"""GLUE loaders on fixtures in the real layout (with its quirks), saved ``datasets``, errors,
tokenisation and the training batch source."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from ultrafastbert.data import demo_tokenizer, special_token_ids
from ultrafastbert.glue import (
    TASKS,
    ClassificationBatches,
    GlueDataError,
    available_tasks,
    encode_split,
    load_task,
    read_tsv,
)
from ultrafastbert.glue.data import collate, eval_batches, missing_files

MINI = Path(__file__).parent / "fixtures" / "glue_mini"
# (train, dev) example counts of the hand-written fixtures.
SIZES = {"CoLA": (4, 3), "SST-2": (3, 2), "MRPC": (3, 2), "STS-B": (3, 3), "QQP": (2, 2),
         "QNLI": (2, 2), "RTE": (3, 3), "WNLI": (2, 2)}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_task_loads_from_the_glue_layout(name):
    data = load_task(MINI, TASKS[name])
    assert (len(data.train), len(data.evals["dev"])) == SIZES[name]
    assert all(e.text_a for e in data.train.examples)
    assert all((e.text_b is not None) == TASKS[name].is_pair for e in data.train.examples)


def test_mnli_has_two_dev_sets_and_named_labels():
    data = load_task(MINI, TASKS["MNLI"])
    assert list(data.evals) == ["matched", "mismatched"]
    assert (len(data.train), len(data.evals["matched"]), len(data.evals["mismatched"])) == (3, 2, 3)
    # entailment, contradiction, neutral -> GLUE / Hugging Face order (0, 2, 1)
    assert data.train.labels().tolist() == [0, 2, 1]
    assert data.evals["mismatched"].examples[1].text_b == "We met for lunch."


def test_cola_has_no_header_row():
    train = read_tsv(MINI / "CoLA" / "train.tsv", TASKS["CoLA"], "train")
    assert train.examples[0].text_a == "The dog chased the ball across the yard."
    assert train.labels().tolist() == [1, 0, 1, 0]


def test_mrpc_header_with_byte_order_mark():
    dev = read_tsv(MINI / "MRPC" / "dev.tsv", TASKS["MRPC"], "dev")
    assert dev.labels().tolist() == [0, 1]
    assert (MINI / "MRPC" / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbf")


def test_mrpc_bom_read_as_plain_utf8_breaks_the_header(tmp_path):
    # Negative control: the BOM is really there and matters (it would hide "Quality").
    text = (MINI / "MRPC" / "dev.tsv").read_text(encoding="utf-8")
    assert text.startswith("\ufeffQuality")
    bad = tmp_path / "dev.tsv"
    bad.write_text("\ufeff" + text, encoding="utf-8-sig")  # a second BOM survives decoding
    with pytest.raises(GlueDataError, match="header lacks columns.*Quality"):
        read_tsv(bad, TASKS["MRPC"], "dev")


def test_unbalanced_quotes_stay_in_their_field():
    train = read_tsv(MINI / "RTE" / "train.tsv", TASKS["RTE"], "train")
    assert len(train) == 3
    assert train.examples[0].text_a == '"The company, founded in 1990, sells shoes.'
    assert train.labels().tolist() == [0, 1, 0]
    # Negative control: with csv's default quoting the quote swallows the following rows.
    with open(MINI / "RTE" / "train.tsv", encoding="utf-8-sig", newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) - 1 < 3


def test_stsb_scores_are_floats():
    data = load_task(MINI, TASKS["STS-B"])
    assert data.train.labels().dtype.kind == "f"
    assert data.evals["dev"].labels().tolist() == [4.5, 0.25, 3.0]


def test_subsets_are_random_deterministic_and_in_file_order():
    data = load_task(MINI, TASKS["CoLA"], max_train=2, max_eval=2, subset_seed=3)
    again = load_task(MINI, TASKS["CoLA"], max_train=2, max_eval=2, subset_seed=3)
    full = load_task(MINI, TASKS["CoLA"])
    assert data.train == again.train and len(data.train) == 2 and len(data.evals["dev"]) == 2
    positions = [full.train.examples.index(e) for e in data.train.examples]
    assert positions == sorted(positions)
    assert load_task(MINI, TASKS["CoLA"], max_train=100).train == full.train


# ----------------------------------------------------------------------------- errors
def _copy_task(tmp_path: Path, name: str) -> Path:
    shutil.copytree(MINI / name, tmp_path / name)
    return tmp_path


def test_missing_file_names_the_path(tmp_path):
    root = _copy_task(tmp_path, "RTE")
    (root / "RTE" / "dev.tsv").unlink()
    assert missing_files(root, TASKS["RTE"]) == ["dev.tsv"]
    with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv is missing.*train.tsv, dev.tsv"):
        load_task(root, TASKS["RTE"])


def test_task_not_in_the_folder_lists_the_tasks_there(tmp_path):
    root = _copy_task(tmp_path, "RTE")
    assert available_tasks(root) == ["RTE"]
    with pytest.raises(FileNotFoundError, match=r"task MRPC is not in the GLUE folder.*tasks "
                                                r"there: RTE.*drop MRPC from --tasks"):
        load_task(root, TASKS["MRPC"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(tmp_path / "nowhere", TASKS["RTE"])


def test_lowercase_task_folders_are_found(tmp_path):
    shutil.copytree(MINI / "STS-B", tmp_path / "stsb")
    assert len(load_task(tmp_path, TASKS["STS-B"]).train) == 3


def test_unknown_label_names_file_and_line(tmp_path):
    root = _copy_task(tmp_path, "RTE")
    path = root / "RTE" / "dev.tsv"
    path.write_text(path.read_text(encoding="utf-8").replace("\tentailment", "\tmaybe"),
                    encoding="utf-8")
    with pytest.raises(GlueDataError, match=r"dev.tsv, line 3: label 'maybe' is not one of"):
        load_task(root, TASKS["RTE"])


def test_short_rows_are_skipped_with_a_warning(tmp_path, caplog):
    root = _copy_task(tmp_path, "SST-2")
    with open(root / "SST-2" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("a row without a label\n")
    assert len(load_task(root, TASKS["SST-2"]).train) == 3
    assert "skipped 1 rows" in caplog.text


# ------------------------------------------------------------------ datasets save_to_disk
def _save_hf(root: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence1": datasets.Value("string"),
                                  "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment",
                                                                      "not_entailment"]),
                                  "idx": datasets.Value("int32")})
    splits = {}
    for split, file in (("train", "train.tsv"), ("validation", "dev.tsv")):
        tsv = read_tsv(MINI / "RTE" / file, TASKS["RTE"], split)
        splits[split] = datasets.Dataset.from_dict(
            {"sentence1": [e.text_a for e in tsv.examples],
             "sentence2": [e.text_b for e in tsv.examples],
             "label": [e.label for e in tsv.examples],
             "idx": list(range(len(tsv)))}, features=features)
    splits["test"] = splits["validation"].map(lambda _: {"label": -1})
    datasets.DatasetDict(splits).save_to_disk(str(root / "rte"))
    return root


def test_saved_datasets_load_like_the_tsv_files(tmp_path):
    root = _save_hf(tmp_path)
    hf, tsv = load_task(root, TASKS["RTE"]), load_task(MINI, TASKS["RTE"])
    assert hf.train.examples == tsv.train.examples
    assert hf.evals["dev"].examples == tsv.evals["dev"].examples
    assert available_tasks(root) == ["RTE"] and missing_files(root, TASKS["RTE"]) == []


def test_saved_dataset_with_other_label_names_is_refused(tmp_path):
    root = _save_hf(tmp_path)
    # WNLI's label order is (not_entailment, entailment): reading RTE as WNLI must fail.
    (root / "rte").rename(root / "wnli")
    with pytest.raises(GlueDataError, match="label names .* differ"):
        load_task(root, TASKS["WNLI"])


# -------------------------------------------------------------------- tokens and batches
def test_pairs_are_encoded_with_the_pair_template_and_truncated():
    tok = demo_tokenizer()
    special = special_token_ids(tok)
    data = load_task(MINI, TASKS["RTE"])
    enc = encode_split(data.train, tok, max_length=128)
    first = enc.ids[0]
    assert first[0] == special.cls and first[-1] == special.sep
    assert sum(i == special.sep for i in first) == 2
    short = encode_split(data.train, tok, max_length=8)
    assert max(len(r) for r in short.ids) == 8 and short.ids[0][-1] == special.sep
    assert enc.labels.dtype == torch.long and enc.labels.tolist() == [0, 1, 0]
    assert tok.truncation is None  # the caller's tokenizer is left as it was
    stsb = encode_split(load_task(MINI, TASKS["STS-B"]).train, tok, 128)
    assert stsb.labels.dtype == torch.float32


def test_collate_pads_to_the_longest_row():
    ids, mask = collate([(5, 6, 7), (8,)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_eval_batches_cover_every_example_once():
    enc = encode_split(load_task(MINI, TASKS["CoLA"]).train, demo_tokenizer(), 128)
    seen = torch.cat([index for index, _, _ in eval_batches(enc, 3, 0)])
    assert sorted(seen.tolist()) == list(range(len(enc)))


def _batches(seed: int, batch_size: int = 2) -> ClassificationBatches:
    enc = encode_split(load_task(MINI, TASKS["CoLA"]).train, demo_tokenizer(), 128)
    return ClassificationBatches(enc, batch_size, seed, pad_id=0)


def _rows(batch) -> list[tuple[int, ...]]:
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    return [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]


def test_each_epoch_serves_every_example_once_in_a_seeded_order():
    source = _batches(seed=0, batch_size=3)
    assert source.steps_per_epoch == 2
    epoch = [source.next_batch() for _ in range(2)]
    assert [b.n_targets for b in epoch] == [3, 1]  # the remainder ends the epoch
    rows = [r for b in epoch for r in _rows(b)]
    assert sorted(rows) == sorted(source.encoded.ids)
    assert source.state_dict() == {"epoch": 1, "position": 0}
    orders = {tuple(_batches(seed).order(0).tolist()) for seed in range(6)}
    assert len(orders) > 1


def test_batch_source_resumes_exactly():
    source = _batches(seed=1)
    source.next_batch()
    state = source.state_dict()
    expected = [_rows(source.next_batch()) for _ in range(3)]
    resumed = _batches(seed=1)
    resumed.load_state_dict(state)
    assert [_rows(resumed.next_batch()) for _ in range(3)] == expected


def test_batch_source_is_single_process():
    with pytest.raises(ValueError, match="one process"):
        _batches(seed=0).next_batch(rank=0, world_size=2)
