"""Shared pieces of the training tests: the tiny pretraining run and how to launch it.

The tiny run: ``tests/fixtures/train_model.json`` (2 layers, d 64, FFF 1x5, vocab 1,024,
sequences of 32), the fixture corpus and tokenizer (``tests/fixtures/make_train_fixtures.py``),
8 optimizer steps, batch ramped from 8 to 16 sequences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "pretrain_golden.json"
RUN_ARGS = (
    "--config", str(FIXTURES / "train_model.json"),
    "--corpus", str(FIXTURES / "train_corpus.txt"),
    "--tokenizer", str(FIXTURES / "train_tokenizer.json"),
    "--seq-len", "32", "--max-steps", "8", "--micro-batch", "8", "--batch-size", "16",
    "--seed", "0", "--heldout-rows", "32", "--no-progress",
)


def run_args(out: Path, cache: Path, *extra: str) -> list[str]:
    """The tiny run's arguments into ``out``; ``extra`` flags are appended (last one wins)."""
    return [*RUN_ARGS, "--out", str(out), "--cache-dir", str(cache), *extra]


def losses(out: Path) -> list[float]:
    """Per-step losses of ``out/metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment of child runs: fixed threads, the package importable."""
    src = str(Path(__file__).parent.parent / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def cli_command(*args: str) -> list[str]:
    """``python -m ultrafastbert.cli.pretrain ARGS`` with this interpreter."""
    return [sys.executable, "-m", "ultrafastbert.cli.pretrain", *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the command to completion in a child process; fail the test on a non-zero exit."""
    proc = subprocess.run(cli_command(*args), env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_DONE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run, once per session, in this process with 2 threads (as the stored losses).

    Test modules import this fixture, which gives each module its own fixture definition;
    ``_DONE`` makes them share one run.
    """
    import torch

    from ultrafastbert.cli.pretrain import main

    if "out" not in _DONE:
        torch.set_num_threads(2)
        root = tmp_path_factory.mktemp("tiny_run")
        assert main(run_args(root / "out", root / "cache")) == 0
        _DONE["out"] = root / "out"
    return _DONE["out"]
