"""Corpus readers: formats, folders, the demo corpus, streaming, and bad input."""

from __future__ import annotations

import gzip
import json
import lzma
import re
from pathlib import Path

import pytest

from ultrafastbert.data import corpus as corpus_mod
from ultrafastbert.data.corpus import CorpusError, open_corpus


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------- plain text


def test_text_file_one_document_per_nonempty_line(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "  first line  \n\n\nsecond\r\n   \nthird")
    assert list(open_corpus(f)) == ["first line", "second", "third"]


def test_text_paragraph_mode_joins_lines(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "one\ntwo\n\nthree\n  \n\nfour\nfive\n")
    assert list(open_corpus(f, text_unit="paragraph")) == ["one two", "three", "four five"]


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello\n")
    assert list(open_corpus(f)) == ["hello"]


def test_compressed_text_files(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz one\ngz two\n")
    with lzma.open(tmp_path / "b.txt.xz", "wt", encoding="utf-8") as f:
        f.write("xz one\n")
    assert list(open_corpus(tmp_path)) == ["gz one", "gz two", "xz one"]


def test_folder_is_recursive_sorted_and_skips_hidden_and_unknown(tmp_path: Path) -> None:
    write(tmp_path / "b" / "deep" / "z.txt", "deep\n")
    write(tmp_path / "a.txt", "top\n")
    write(tmp_path / "b" / "c.jsonl", json.dumps({"text": "json"}) + "\n")
    write(tmp_path / ".git" / "x.txt", "hidden dir\n")
    write(tmp_path / ".hidden.txt", "hidden file\n")
    write(tmp_path / "notes.md", "not a corpus file\n")
    corpus = open_corpus(tmp_path)
    assert [f.format for f in corpus.files] == ["text", "jsonl", "text"]
    assert list(corpus) == ["top", "json", "deep"]


def test_overlong_line_is_split_into_bounded_pieces(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "MAX_DOC_CHARS", 10)
    line = "abcdefghij" * 3 + "xyz"
    f = write(tmp_path / "long.txt", line + "\nshort\n")
    docs = list(open_corpus(f))
    assert all(len(d) <= 10 for d in docs)
    assert "".join(docs[:-1]) == line and docs[-1] == "short"


def test_reading_is_lazy(tmp_path: Path) -> None:
    # Valid text first, invalid bytes ~1 MB later: the first document must arrive before the
    # reader reaches the bad bytes, i.e. the file is not read (or decoded) in one go.
    f = tmp_path / "big.txt"
    f.write_bytes(b"first document\n" + b"x" * 100 + b"\n" * 1_000_000 + b"\xff\n")
    it = iter(open_corpus(f))
    assert next(it) == "first document"
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(it)


# --------------------------------------------------------------------------- JSON Lines


def test_jsonl_default_and_custom_field(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "body": "x"}, {"text": " ", "body": "y"},
                                           {"text": None, "body": "z"}, {"text": "b", "body": ""}])
    assert list(open_corpus(f)) == ["a", "b"]
    assert list(open_corpus(f, text_field="body")) == ["x", "y", "z"]


def test_jsonl_missing_field_names_file_line_and_fields(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text key"}])
    with pytest.raises(CorpusError, match=r"d\.jsonl, line 2: no field 'text' .*\['content'\]"):
        list(open_corpus(f))


def test_jsonl_bad_json_and_wrong_types(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 2: not valid JSON"):
        list(open_corpus(bad))
    array = write(tmp_path / "array.json", json.dumps([{"text": "a"}]) + "\n")
    with pytest.raises(CorpusError, match="expected a JSON object, got list"):
        list(open_corpus(array))
    number = write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(CorpusError, match="is int, not a string"):
        list(open_corpus(number))


# --------------------------------------------------------------------------- Parquet and HF


def test_parquet_column_in_batches(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}" for i in range(10_000)] + ["", None]
    table = pa.table({"id": list(range(len(texts))), "content": texts})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    docs = list(open_corpus(tmp_path / "t.parquet", text_field="content"))
    assert docs == texts[:10_000]
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: \['id', 'content'\]\)"):
        list(open_corpus(tmp_path / "t.parquet"))
    with pytest.raises(CorpusError, match="column 'id' has type int64, not string"):
        list(open_corpus(tmp_path / "t.parquet", text_field="id"))


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one", "", "two"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(open_corpus(tmp_path / "ds")) == ["one", "two"]
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(open_corpus(tmp_path / "dd", split="validation")) == ["two"]
    with pytest.raises(CorpusError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        list(open_corpus(tmp_path / "dd", split="test"))
    with pytest.raises(CorpusError, match="column 'n' has type .*int64.*, not string"):
        list(open_corpus(tmp_path / "ds", text_field="n"))


# --------------------------------------------------------------------------- demo corpus


def test_demo_corpus_is_the_default_and_matches_its_license_notes() -> None:
    corpus = open_corpus()
    assert corpus.kind == "demo" and open_corpus("demo").kind == "demo"
    first = next(iter(corpus))
    assert first.startswith("In the beginning God created the heaven and the earth.")
    notes = (Path(corpus_mod.__file__).parent / "demo_corpus" / "LICENSES.md").read_text()
    assert f"sha256: `{corpus_mod.demo_corpus_sha256()}`" in notes
    n_docs = int(re.search(r"documents: ([\d,]+);", notes).group(1).replace(",", ""))
    assert sum(1 for _ in corpus) == n_docs > 100_000


# --------------------------------------------------------------------------- identity


def test_identity_is_stable_and_tracks_changes(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "hello\n")
    first = open_corpus(tmp_path).identity()
    assert open_corpus(tmp_path).identity() == first
    write(tmp_path / "a.txt", "hello again\n")
    assert open_corpus(tmp_path).identity() != first
    assert open_corpus(f, text_field="x").identity() != open_corpus(f).identity()


# --------------------------------------------------------------------------- bad input


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist.*or 'demo'"):
        open_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "readme.md", "x")
    with pytest.raises(CorpusError, match="holds no corpus file"):
        open_corpus(tmp_path / "empty")


def test_unknown_suffix_needs_file_format(tmp_path: Path) -> None:
    f = write(tmp_path / "data.csv", "line one\n")
    with pytest.raises(CorpusError, match="cannot tell the format.*file_format="):
        open_corpus(f)
    assert list(open_corpus(f, file_format="text")) == ["line one"]


def test_empty_corpus_error_names_the_source(tmp_path: Path) -> None:
    f = write(tmp_path / "blank.txt", "\n   \n\t\n")
    with pytest.raises(CorpusError, match=r"blank\.txt' contains no text"):
        list(open_corpus(f))
    with pytest.raises(CorpusError, match="contains no text"):
        list(open_corpus(tmp_path).batches(4))


def test_non_utf8_error_names_file_and_line_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    with pytest.raises(CorpusError) as err:
        list(open_corpus(f))
    message = str(err.value)
    assert "latin1.txt" in message and "not UTF-8" in message and "byte 0xef" in message
    assert "iconv" in message and "encoding_errors='replace'" in message
    assert list(open_corpus(f, encoding_errors="replace")) == ["caf\u00e9", "na\ufffdve"]


def test_batches_group_documents(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "".join(f"d{i}\n" for i in range(7)))
    sizes = [len(b) for b in open_corpus(f).batches(3)]
    assert sizes == [3, 3, 1]
    with pytest.raises(ValueError, match="batch_size"):
        list(open_corpus(f).batches(0))


def test_invalid_options_name_the_allowed_values(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "x\n")
    with pytest.raises(CorpusError, match=r"text_unit must be one of \['line', 'paragraph'\]"):
        open_corpus(f, text_unit="sentence")
    with pytest.raises(CorpusError, match="file_format must be one of"):
        open_corpus(f, file_format="csv")
    with pytest.raises(CorpusError, match="encoding_errors must be one of"):
        open_corpus(f, encoding_errors="bogus")
