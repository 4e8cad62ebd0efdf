"""Corpus readers: stream texts from the demo corpus, text files, JSON Lines, Parquet, HF datasets.

Every reader is a generator over documents (``str``): nothing reads a whole file into memory, so
corpora larger than RAM work. What counts as a document:

- plain text (``.txt``, ``.txt.gz``, ``.txt.xz``): one non-empty line, or with
  ``text_unit="paragraph"`` one blank-line separated paragraph (line breaks become spaces);
- JSON Lines (``.jsonl``, ``.ndjson``, ``.json``, optionally ``.gz``/``.xz``): one object per line,
  the document is its ``text_field`` (default ``"text"``);
- Parquet (``.parquet``): one row of the ``text_field`` column, read in record batches;
- a Hugging Face dataset saved with ``save_to_disk``: one row of ``text_field`` (memory-mapped);
- a folder: every supported file below it (recursively, sorted, hidden entries skipped), unless
  the folder itself is a saved Hugging Face dataset;
- ``"demo"`` (or ``None``): the built-in demo corpus shipped in the package.

Optional dependencies (``pyarrow``, ``datasets``) are imported only by the readers that need them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

from ..errors import DataError

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_RESOURCE = ("demo_corpus", "demo_corpus.txt.xz")
Format = Literal["text", "jsonl", "parquet", "hf"]
TextUnit = Literal["line", "paragraph"]
# A line (or paragraph) longer than this is emitted in pieces, so one giant line cannot exhaust
# memory. Packing concatenates documents anyway; the only effect is an extra separator token.
MAX_DOC_CHARS = 1 << 20
READER_VERSION = 1  # bump when what a reader yields changes: it is part of every cache key

_SUFFIXES: dict[str, Format] = {
    ".txt": "text", ".txt.gz": "text", ".txt.xz": "text",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.xz": "jsonl",
    ".ndjson": "jsonl", ".json": "jsonl", ".json.gz": "jsonl",
    ".parquet": "parquet",
}
_HF_MARKERS = ("dataset_dict.json", "state.json")


class CorpusError(DataError):
    """The corpus cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus and the reader that handles it."""

    path: Path
    format: Format


@dataclass(frozen=True)
class Corpus:
    """A re-iterable stream of documents (``str``) from one source.

    Build it with :func:`open_corpus`. Iterating yields non-empty documents in a fixed order and
    raises :class:`CorpusError` at the end if there were none.
    """

    source: str
    kind: Literal["demo", "files", "hf"]
    files: tuple[CorpusFile, ...] = ()
    text_field: str = "text"
    split: str = "train"
    text_unit: TextUnit = "line"
    encoding_errors: str = "strict"
    hf_dir: Path | None = None

    def __iter__(self) -> Iterator[str]:
        count = 0
        for doc in self._documents():
            count += 1
            yield doc
        if count == 0:
            raise CorpusError(
                f"corpus {self.source!r} contains no text (every document is empty). "
                f"Point --corpus at files with text in them{self._field_hint()}."
            )

    def batches(self, batch_size: int = 1024) -> Iterator[list[str]]:
        """Yield lists of up to ``batch_size`` documents (the last list may be shorter)."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[str] = []
        for doc in self:
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever the documents may change (cache keys).

        Files are identified by path, size and modification time (hashing a corpus larger than
        RAM on every run would be too slow); the demo corpus by the sha256 of its bytes.
        """
        ident: dict[str, Any] = {
            "kind": self.kind, "reader_version": READER_VERSION, "text_field": self.text_field,
            "text_unit": self.text_unit, "encoding_errors": self.encoding_errors,
        }
        if self.kind == "demo":
            ident["sha256"] = demo_corpus_sha256()
        elif self.kind == "hf":
            ident["split"] = self.split
            ident["files"] = _stat_files(sorted(p for p in self.hf_dir.rglob("*") if p.is_file()))
        else:
            ident["files"] = _stat_files([f.path for f in self.files])
            ident["formats"] = [f.format for f in self.files]
        return ident

    def _documents(self) -> Iterator[str]:
        if self.kind == "demo":
            with demo_corpus_resource().open("rb") as raw, lzma.open(raw, "rb") as xz:
                f = io.TextIOWrapper(xz, encoding="utf-8", errors=self.encoding_errors)
                yield from _text_documents(f, "the demo corpus", self.text_unit)
        elif self.kind == "hf":
            yield from _hf_documents(self.hf_dir, self.text_field, self.split)
        else:
            for f in self.files:
                yield from _file_documents(f, self)

    def _field_hint(self) -> str:
        if self.kind == "files" and all(f.format == "text" for f in self.files):
            return ""
        return f", or choose the text field/column with text_field (now {self.text_field!r})"


# --------------------------------------------------------------------------- opening


def open_corpus(
    source: str | os.PathLike[str] | None = None,
    *,
    text_field: str = "text",
    split: str = "train",
    file_format: Format | None = None,
    text_unit: TextUnit = "line",
    encoding_errors: str = "strict",
) -> Corpus:
    """Open a corpus for streaming.

    Args:
        source: ``None`` or ``"demo"`` for the built-in demo corpus, else a file or folder path.
        text_field: JSON key / Parquet column / dataset column holding the text.
        split: split to read when ``source`` is a saved ``datasets.DatasetDict``.
        file_format: force the reader for a single file (``"text"``, ``"jsonl"``, ``"parquet"``,
            ``"hf"``); by default it is chosen from the file suffix.
        text_unit: for plain text, whether a document is a ``"line"`` or a ``"paragraph"``.
        encoding_errors: ``"strict"`` (default: non-UTF-8 bytes are an error) or ``"replace"``.

    Raises:
        CorpusError: the path does not exist, or a folder holds no supported file.
    """
    opts = dict(text_field=text_field, split=split, text_unit=text_unit,
                encoding_errors=encoding_errors)
    _check_choice("text_unit", text_unit, ("line", "paragraph"))
    _check_choice("file_format", file_format, (None, "text", "jsonl", "parquet", "hf"))
    _check_choice("encoding_errors", encoding_errors, ("strict", "replace", "ignore"))
    if source is None or str(source) == DEMO:
        return Corpus(source=DEMO, kind="demo", **opts)
    path = Path(source).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {str(path)!r} does not exist. Pass an existing file or "
                          "folder (text, JSON Lines, Parquet, saved HF dataset) or 'demo'.")
    if file_format == "hf" or (path.is_dir() and _is_hf_dataset_dir(path)):
        return Corpus(source=str(path), kind="hf", hf_dir=path.resolve(), **opts)
    files = _discover(path, file_format)
    log.info("corpus %s: %d file(s)", path, len(files))
    return Corpus(source=str(path), kind="files", files=files, **opts)


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise CorpusError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _discover(path: Path, file_format: Format | None) -> tuple[CorpusFile, ...]:
    if path.is_file():
        fmt = file_format or _format_of(path)
        if fmt is None:
            raise CorpusError(
                f"cannot tell the format of {str(path)!r} from its suffix. Rename it "
                f"({', '.join(sorted(_SUFFIXES))}) or pass file_format='text'|'jsonl'|'parquet'."
            )
        return (CorpusFile(path.resolve(), fmt),)
    found = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if p.is_file() and not any(part.startswith(".") for part in rel):
            fmt = file_format or _format_of(p)
            if fmt is not None:
                found.append(CorpusFile(p.resolve(), fmt))
    if not found:
        raise CorpusError(f"folder {str(path)!r} holds no corpus file (looked recursively for "
                          f"{', '.join(sorted(_SUFFIXES))}). Add text files or point at another "
                          "folder.")
    return tuple(found)


def _format_of(path: Path) -> Format | None:
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _HF_MARKERS)


def _stat_files(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------- demo corpus


def packaged_file(parts: tuple[str, ...]) -> Any | None:
    """A file shipped in ``ultrafastbert.data`` (an ``importlib.resources`` Traversable), or
    None when the installed package lacks it."""
    res = resources.files("ultrafastbert.data")
    for part in parts:
        res = res / part
    return res if res.is_file() else None


def demo_corpus_resource() -> Any:
    """The packaged demo corpus file (an ``importlib.resources`` Traversable)."""
    res = packaged_file(DEMO_RESOURCE)
    if res is None:
        raise CorpusError("the demo corpus is missing from the installed package "
                          f"({'/'.join(DEMO_RESOURCE)}). Reinstall ultrafastbert, or rebuild it "
                          "with scripts/build_demo_corpus.py, or pass --corpus PATH.")
    return res


def demo_corpus_sha256() -> str:
    """sha256 of the packaged (compressed) demo corpus file."""
    digest = hashlib.sha256()
    with demo_corpus_resource().open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



# --------------------------------------------------------------------------- readers


def _open_text(path: Path, encoding_errors: str) -> IO[str]:
    """Open a possibly compressed text file for streaming UTF-8 reading (BOM tolerated)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=encoding_errors)
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8-sig", errors=encoding_errors)
    return open(path, encoding="utf-8-sig", errors=encoding_errors)


def _file_documents(cf: CorpusFile, corpus: Corpus) -> Iterator[str]:
    if cf.format == "parquet":
        yield from _parquet_documents(cf.path, corpus.text_field)
        return
    with _open_text(cf.path, corpus.encoding_errors) as f:
        if cf.format == "jsonl":
            yield from _jsonl_documents(f, str(cf.path), corpus.text_field)
        else:
            yield from _text_documents(f, str(cf.path), corpus.text_unit)


def _bounded_lines(f: IO[str], where: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)``; over-long lines come in pieces; decode errors explained."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_DOC_CHARS)
        except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as err:
            raise CorpusError(
                f"{where}: the compressed file is truncated or corrupt after line {lineno} "
                f"({type(err).__name__}: {err}). Copy or download it again (`gzip -t` / `xz -t` "
                "checks a file)."
            ) from err
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{where}: bytes that are not UTF-8 at or after line {lineno + 1} ({err.reason}, "
                f"byte 0x{err.object[err.start]:02x}). Convert the file to UTF-8 (e.g. "
                "`iconv -f latin1 -t utf-8 IN > OUT`) or open the corpus with "
                "encoding_errors='replace'."
            ) from err
        if not line:
            return
        if line.endswith("\n"):
            lineno += 1
        yield lineno, line


def _text_documents(f: IO[str], where: str, unit: TextUnit) -> Iterator[str]:
    if unit == "line":
        for _, line in _bounded_lines(f, where):
            doc = line.strip()
            if doc:
                yield doc
        return
    parts: list[str] = []
    size = 0
    for _, line in _bounded_lines(f, where):
        text = line.strip()
        if text:
            parts.append(text)
            size += len(text)
        if parts and (not text or size >= MAX_DOC_CHARS):
            yield " ".join(parts)
            parts, size = [], 0
    if parts:
        yield " ".join(parts)


def _jsonl_documents(f: IO[str], where: str, text_field: str) -> Iterator[str]:
    for lineno, line in _bounded_lines(f, where):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{where}, line {lineno}: not valid JSON ({err.msg}). JSON Lines needs one "
                "object per line; convert a JSON array with `jq -c '.[]' IN > OUT`."
            ) from err
        yield from _text_of(record, text_field, f"{where}, line {lineno}")


def _text_of(record: Any, text_field: str, where: str) -> Iterator[str]:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}. "
                          "JSON Lines needs one object per line, e.g. {\"text\": \"...\"}.")
    if text_field not in record:
        raise CorpusError(f"{where}: no field {text_field!r} (fields: {sorted(record)}). "
                          "Choose the field holding the text with text_field / --text-field.")
    value = record[text_field]
    if value is None:
        return
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(value).__name__}, not a "
                          "string. Choose a text field with text_field / --text-field.")
    if value.strip():
        yield value.strip()


def _parquet_documents(path: Path, column: str, batch_rows: int = 4096) -> Iterator[str]:
    pq = _import_optional("pyarrow.parquet", "pyarrow", "Parquet corpora")
    import pyarrow as pa

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {names}). Choose the text "
                          "column with text_field / --text-field.")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise CorpusError(f"{path}: column {column!r} has type {kind}, not string. Choose a "
                          "text column with text_field / --text-field.")
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        for value in batch.column(0).to_pylist():
            if value and value.strip():
                yield value.strip()


def _hf_documents(path: Path, column: str, split: str, batch_rows: int = 4096) -> Iterator[str]:
    ds_mod = _import_optional("datasets", "datasets", "Hugging Face dataset corpora")
    ds = ds_mod.load_from_disk(str(path))
    if isinstance(ds, ds_mod.DatasetDict):
        if split not in ds:
            raise CorpusError(f"{path}: no split {split!r} (splits: {sorted(ds)}). "
                              "Choose one with split= / --split.")
        ds = ds[split]
    if column not in ds.column_names:
        raise CorpusError(f"{path}: no column {column!r} (columns: {ds.column_names}). "
                          "Choose the text column with text_field / --text-field.")
    dtype = getattr(ds.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise CorpusError(f"{path}: column {column!r} has type {ds.features[column]}, not "
                          "string. Choose a text column with text_field / --text-field.")
    for batch in ds.select_columns([column]).iter(batch_size=batch_rows):
        for value in batch[column]:
            if isinstance(value, str) and value.strip():
                yield value.strip()


def _import_optional(module: str, package: str, purpose: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CorpusError(f"{purpose} need the optional package {package!r}: "
                          f"pip install 'ultrafastbert[train]' (or pip install {package}).") from err
