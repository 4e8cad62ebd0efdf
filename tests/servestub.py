"""``ultrafastbert serve`` with a stub model, as a real server process: the CLI's own code path
(options, API keys, signals) with a model that records every text it computes and can be held.

Run as ``python tests/servestub.py [serve options]``; environment:

- ``UFB_STUB_CALLS``: a file that gets one line per computed text (its words), written before
  the model call returns;
- ``UFB_STUB_GATE``: while this file exists, a batch holding the word ``hold`` waits (up to
  60 s), so a test can keep the model busy for as long as it needs.

With ``--model-process`` the model process loads its own stub (:func:`load_stub`); the words
the front has seen are shared through ``UFB_STUB_CALLS.vocab``.

Tokens: one per word plus two special tokens; at most 16 per text.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch


class StubPredictor:
    """What the server needs from ``Predictor`` (docs/serving.md, "In Python"), no model."""

    tasks = ("embed",)
    max_length = 16
    mask_token_id = 3

    def __init__(self, calls: Path, gate: Path | None):
        self.calls, self.gate = calls, gate
        self.model = self
        self._vocab: dict[str, int] = {}
        self._words: dict[int, str] = {}
        self._lock = threading.Lock()
        self._vocab_file = calls.with_name(calls.name + ".vocab")

    def with_mask_token(self, text: str) -> str:
        return text

    def tokenize(self, texts, pairs=None, truncate: bool = True) -> list[list[int]]:
        rows = []
        for text in texts:
            ids = [1, *(self._id(w) for w in text.split()), 2]
            rows.append(ids[:self.max_length - 1] + [2] if truncate and len(ids) > 16 else ids)
        return rows

    def _id(self, word: str) -> int:
        """A word's id: 10 + its line in the vocabulary file, which every process's stub
        shares (the server's and a model process's)."""
        with self._lock:
            if word not in self._vocab:
                self._reload()
            if word not in self._vocab:
                with open(self._vocab_file, "a") as out:
                    out.write(word + "\n")
                self._reload()
            return self._vocab[word]

    def _word(self, token: int) -> str:
        if token not in self._words:  # a word another process has seen
            with self._lock:
                self._reload()
        return self._words.get(token, "?")

    def _reload(self) -> None:
        words = self._vocab_file.read_text().splitlines() if self._vocab_file.exists() else []
        self._vocab = {w: i + 10 for i, w in enumerate(words)}
        self._words = {i: w for w, i in self._vocab.items()}

    def pad(self, rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return ids, mask

    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        texts = [" ".join(self._word(int(t)) for t, m in zip(row, keep, strict=True)
                          if m and int(t) >= 10) for row, keep in zip(ids, mask, strict=True)]
        with open(self.calls, "a") as out:
            out.write("".join(f"{t}\n" for t in texts))
        with open(self.calls.with_name(self.calls.name + ".pids"), "a") as out:
            out.write(f"{os.getpid()}\n")  # which process ran each model call
        if any("hold" in t.split() for t in texts):
            deadline = time.monotonic() + 60
            while self.gate is not None and self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        lengths = mask.sum(1, keepdim=True).float()
        return torch.cat([lengths, ids[:, 1:2].float(), torch.ones_like(lengths)], dim=1)


def load_stub(*args: object, **kwargs: object) -> StubPredictor:
    """Stands in for ``Predictor.from_pretrained``: a stub from the environment's files (a
    module-level function, so a model process can unpickle and call it too)."""
    calls = Path(os.environ["UFB_STUB_CALLS"])
    gate = Path(os.environ["UFB_STUB_GATE"]) if os.environ.get("UFB_STUB_GATE") else None
    return StubPredictor(calls, gate)


def main(argv: list[str]) -> int:
    import ultrafastbert.infer
    from ultrafastbert.cli import main as cli_main

    ultrafastbert.infer.Predictor.from_pretrained = load_stub  # type: ignore
    return cli_main(["serve", "stub", "--model-name", "stub", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
