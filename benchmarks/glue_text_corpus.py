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
project.

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
    texts = train_texts(args.glue_dir, tasks, args.min_words)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    words = sum(len(t.split()) for t in texts)
    print(f"{args.out}: {len(texts)} texts, {words} words from the train splits of "
          f"{', '.join(tasks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
