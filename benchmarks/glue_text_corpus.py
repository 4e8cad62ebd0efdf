#!/usr/bin/env python3
"""Unlabeled distillation text from the GLUE *training* splits, as JSON Lines ``{"text": ...}``.

The demo corpus is archaic English (the KJV Bible, Shakespeare, WordNet glosses); a sentence
encoder distilled on it alone fits modern sentences badly (all-MiniLM-L6-v2 8x7, init alone:
STS-B 69.5 from the demo corpus against 82.2 from this text without STS-B). This script writes
the sentences of the GLUE train splits found in ``--glue-dir`` (labels dropped, duplicates and
texts under three words skipped), so a conversion can distil on modern English that is not the
evaluation data: dev splits are never read. ``--exclude STS-B`` (the default) leaves out the
task the quality benchmark scores, so the distillation text shares no split *and* no source
with it. The file is written at run time into a work folder; GLUE text is not shipped with the
project. ``--longest-phrases`` keeps SST-2's sentences and drops their sub-phrases (SST-2 is
67k overlapping phrases of ~6.9k sentences: 87% of the texts otherwise); ``--augment N`` adds N
altered copies of every text made from the texts' own words (:func:`augment`), for more varied
inputs from the same text.

    .venv/bin/python benchmarks/glue_text_corpus.py --glue-dir ../shared/glue \\
        --out runs/corpora/glue_train_nostsb.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("CoLA", "SST-2", "MRPC", "RTE", "STS-B", "WNLI")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue-dir", type=Path, default=Path("../shared/glue"))
    p.add_argument("--out", type=Path, required=True, help="JSON Lines file to write")
    p.add_argument("--exclude", default="STS-B",
                   help="comma list of tasks to leave out (default STS-B: the scored task); "
                        "'' keeps all")
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--longest-phrases", action="store_true",
                   help="keep only the SST-2 phrases no other SST-2 phrase contains (its ~6.9k "
                        "sentences instead of their ~60k overlapping sub-phrases)")
    p.add_argument("--augment", type=int, default=0, metavar="N",
                   help="add N altered copies of every text (:func:`augment`; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of --augment")
    return p.parse_args(argv)


def train_texts(glue_dir: Path, tasks: list[str], min_words: int = 3) -> list[str]:
    """Every distinct text (each side of a pair) of the train splits of ``tasks``, in order."""
    from ultrafastbert.glue.data import find_task_dir, read_tsv
    from ultrafastbert.glue.tasks import get_task

    seen: set[str] = set()
    texts: list[str] = []
    for name in tasks:
        task = get_task(name)
        split = read_tsv(find_task_dir(glue_dir, task) / "train.tsv", task, "train")
        for example in split.examples:
            for text in (example.text_a, example.text_b):
                text = (text or "").strip()
                if len(text.split()) >= min_words and text not in seen:
                    seen.add(text)
                    texts.append(text)
    return texts


def longest_only(texts: list[str]) -> list[str]:
    """``texts`` without those contained in a longer one of them (order kept)."""
    by_length = sorted(set(texts), key=len, reverse=True)
    kept: list[str] = []
    for text in by_length:
        if not any(text in longer for longer in kept):
            kept.append(text)
    keep = set(kept)
    return [t for t in texts if t in keep]


def augment(texts: list[str], copies: int, seed: int = 0, swap: float = 0.3) -> list[str]:
    """``copies`` altered versions of every text, each made one of two ways at random: every
    word replaced with probability ``swap`` by a word drawn from all the texts' words (their
    frequencies), or the start of the text joined to the end of another text. The words and
    texts are the input's own: no other text comes in."""
    import random

    rng = random.Random(seed)
    split = [t.split() for t in texts]
    words = [w for ws in split for w in ws]
    out = []
    for _ in range(copies):
        for ws in split:
            if rng.random() < 0.5 or len(ws) < 2:
                new = [rng.choice(words) if rng.random() < swap else w for w in ws]
            else:
                other = split[rng.randrange(len(split))]
                new = ws[:rng.randrange(1, len(ws))] + other[rng.randrange(len(other)):]
            out.append(" ".join(new))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ultrafastbert.glue.data import available_tasks
    from ultrafastbert.utils.io import atomic_write_text

    excluded = {t.strip().upper() for t in args.exclude.split(",") if t.strip()}
    present = {t.upper() for t in available_tasks(args.glue_dir)}
    tasks = [t for t in TASKS if t.upper() not in excluded and t.upper() in present]
    if not tasks:
        raise SystemExit(f"no GLUE train split to read in {args.glue_dir} (looked for {TASKS} "
                         f"minus {sorted(excluded)})")
    texts = train_texts(args.glue_dir, [t for t in tasks if not (args.longest_phrases
                                                                and t == "SST-2")],
                        args.min_words)
    if args.longest_phrases and "SST-2" in tasks:
        texts += longest_only(train_texts(args.glue_dir, ["SST-2"], args.min_words))
    texts += augment(texts, args.augment, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    words = sum(len(t.split()) for t in texts)
    print(f"{args.out}: {len(texts)} texts, {words} words from the train splits of "
          f"{', '.join(tasks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
