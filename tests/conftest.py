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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
