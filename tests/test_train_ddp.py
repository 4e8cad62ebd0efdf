"""Data-parallel training: 2 CPU processes under torchrun (gloo) match one process with the
same global batch, step for step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import losses, run_args, subprocess_env, tiny_run  # noqa: F401

#: Float rounding only: gradients are summed over ranks in another order.
DDP_ATOL = 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                           "torch.distributed.run"]
    return [*launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "ultrafastbert.cli.pretrain", *args]


@pytest.mark.slow  # integration: CI runs it (make test-slow)
def test_two_processes_match_one(tiny_run: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "ddp"
    proc = subprocess.run(_torchrun(*run_args(out, tmp_path / "cache")), env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = losses(tiny_run), losses(out)
    assert len(ddp) == len(single) == 8
    assert ddp == pytest.approx(single, abs=DDP_ATOL)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [8, 8, 8, 8, 8, 16, 16, 16]  # global batch
    assert (out / "config.json").is_file() and (out / "summary.json").is_file()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # rank 0 wrote, cleanly


def test_ddp_check_can_fail(tiny_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """Negative control: a single-process run with half the global batch differs."""
    from ultrafastbert.cli.pretrain import main

    out = tmp_path / "half"
    args = run_args(out, tmp_path / "cache", "--micro-batch", "4", "--batch-size", "8",
                    "--max-steps", "8", "--heldout-rows", "0")
    assert main(args) == 0
    assert losses(out) != pytest.approx(losses(tiny_run), abs=100 * DDP_ATOL)
    shutil.rmtree(out)
