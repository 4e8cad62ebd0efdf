"""``convert`` under torchrun: 2 CPU processes (gloo) give the model one process gives with the
same global batch, to float rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from convertcheck import tiny_bert, tiny_corpus  # noqa: E402
from train_helpers import subprocess_env  # noqa: E402

#: Float rounding only: gradients are summed over ranks in another order, and each rank's
#: share of a batch is padded to its own longest text.
DDP_ATOL = 2e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(src: Path, out: Path, corpus: Path, batch: int = 8) -> list[str]:
    return [str(src), "--fff", "2x3", "--out", str(out), "--budget", "10m", "--steps", "4",
            "--corpus", str(corpus), "--init-tokens", "600", "--batch-size", str(batch),
            "--no-progress", "--threads", "1"]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow  # two torchrun processes each import transformers: ~30 s on 2 cores
def test_two_processes_match_one(tmp_path: Path) -> None:
    from ultrafastbert.cli import main

    src = tiny_bert(tmp_path / "bert", sentence_transformers=True)
    corpus = tiny_corpus(tmp_path / "c.txt", 300)
    assert main(["convert", *_args(src, tmp_path / "one", corpus)]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                           "torch.distributed.run"]
    proc = subprocess.run([*launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(_free_port()), "-m", "ultrafastbert.cli.convert",
                           *_args(src, tmp_path / "two", corpus)],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("converted ") == 1  # rank 0 reports
    one, two = (json.loads((tmp_path / d / "conversion.json").read_text())
                for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for phase in ("layerwise", "end-to-end"):
        assert one["phases"][phase]["steps"] == two["phases"][phase]["steps"] == 4
        assert one["phases"][phase]["tokens"] == two["phases"][phase]["tokens"]
        assert two["phases"][phase]["last_loss"] == pytest.approx(
            one["phases"][phase]["last_loss"], rel=1e-4)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_diff(w1, w2) < DDP_ATOL
    # negative control: one process with half the global batch trains another model
    assert main(["convert", *_args(src, tmp_path / "half", corpus, batch=4)]) == 0
    assert _max_diff(w1, _weights(tmp_path / "half")) > 100 * DDP_ATOL
    assert not (tmp_path / "two" / "distill").exists()
