"""Test configuration: deterministic, quiet, fixed threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels are tested in its CPU interpreter, which Triton reads once at
# import time; set it before any test module (or transformers) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The native kernel's knobs autotuning measures ~1-2 s per new shape on first pack: off for the
# suite (fixed defaults; knobs never change results). tests/test_native_tuning.py turns it on.
os.environ.setdefault("ULTRAFASTBERT_AUTOTUNE", "0")
# Where tests turn tuning on, its caching must not depend on how busy the test machine is
# (tests/test_native_tuning.py checks the busy rule itself).
os.environ.setdefault("ULTRAFASTBERT_TUNE_WHEN_BUSY", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random sentence-transformers BERT directory (tests/convertcheck.py), per module."""
    from convertcheck import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("src") / "bert", sentence_transformers=True)


@pytest.fixture(scope="module")
def source(bert_dir):
    """``bert_dir`` loaded as a conversion source."""
    from ultrafastbert.convert.source import load_source

    return load_source(bert_dir)
