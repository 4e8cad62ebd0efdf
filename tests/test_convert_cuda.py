"""``convert --device cuda``: the two phases on a GPU give the model the CPU gives, up to
float rounding and the routes it changes (``make test-gpu``; skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from convertcheck import tiny_bert, tiny_corpus  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _convert(src: Path, out: Path, corpus: Path, device: str) -> dict:
    from ultrafastbert.cli import main

    assert main(["convert", str(src), "--fff", "2x3", "--out", str(out), "--budget", "10m",
                 "--steps", "6", "--corpus", str(corpus), "--init-tokens", "600",
                 "--batch-size", "8", "--no-progress", "--device", device]) == 0
    return json.loads((out / "conversion.json").read_text())


def test_cuda_phases_match_the_cpu(tmp_path: Path) -> None:
    import ultrafastbert

    src = tiny_bert(tmp_path / "bert", sentence_transformers=True)
    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    cpu = _convert(src, tmp_path / "cpu", corpus, "cpu")
    cuda = _convert(src, tmp_path / "cuda", corpus, "cuda")
    assert (cpu["device"], cuda["device"]) == ("cpu", "cuda:0")
    assert cpu["init_error"] == pytest.approx(cuda["init_error"])  # the init runs on the CPU
    for phase in ("layerwise", "end-to-end"):
        assert cpu["phases"][phase]["steps"] == cuda["phases"][phase]["steps"] == 6
        assert cpu["phases"][phase]["tokens"] == cuda["phases"][phase]["tokens"]
        assert cuda["phases"][phase]["last_loss"] == pytest.approx(
            cpu["phases"][phase]["last_loss"], rel=0.05)
    assert cuda["heldout"]["pooled_cosine"] == pytest.approx(
        cpu["heldout"]["pooled_cosine"], abs=0.02)
    model = ultrafastbert.from_pretrained(tmp_path / "cuda")  # saved from the CPU, loads there
    assert next(model.parameters()).device.type == "cpu"
