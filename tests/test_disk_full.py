"""A full disk during pretraining: one clear error naming the file; nothing written is lost.

The real case runs the command line in a child process whose ``--out`` is a 5 MB tmpfs (a
private mount namespace, so nothing outside the test sees it); the third checkpoint no longer
fits. A simulated ``OSError(ENOSPC)`` covers the same path where mounting is not allowed.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import run_args, run_cli, subprocess_env
from ultrafastbert.errors import ResourceError
from ultrafastbert.train.checkpoint import latest_checkpoint


def _can_mount_tmpfs(tmp: Path) -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = tmp / "probe"
    probe.mkdir()
    cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _steps(out: Path) -> list[int]:
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["step"] for line in text.splitlines()]


def _losses(out: Path) -> dict[int, float]:
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


def test_full_disk_in_a_real_process(tmp_path: Path) -> None:
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs root and unshare to mount a private tmpfs; "
                    "test_simulated_enospc_keeps_the_last_checkpoint covers the same path")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    args = run_args(disk / "out", tmp_path / "cache", "--max-steps", "40", "--save-every", "2",
                    "--keep-checkpoints", "10")
    command = " ".join(shlex.quote(a) for a in
                       [sys.executable, "-m", "ultrafastbert.cli.pretrain", *args])
    script = (f"mount -t tmpfs -o size=5m tmpfs {disk} && {{ {command}; status=$?; "
              f"cp -a {disk / 'out'} {kept}; exit $status; }}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr
    latest = latest_checkpoint(kept / "checkpoints")
    assert latest is not None and latest.step >= 2
    assert f"previous checkpoint {disk / 'out' / 'checkpoints'}" in proc.stderr
    assert f"(step {latest.step}) is intact" in proc.stderr
    written = _losses(kept)
    assert sorted(written) == list(range(1, max(written) + 1)) and max(written) >= latest.step
    # With space again, --resume finishes the run from the intact checkpoint.
    run_cli(*run_args(kept, tmp_path / "cache", "--max-steps", "40", "--save-every", "2",
                      "--resume"))
    assert _steps(kept) == list(range(1, 41))
    resumed = _losses(kept)
    assert all(resumed[s] == written[s] for s in range(1, latest.step + 1))


def test_simulated_enospc_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from safetensors import torch as st

    from ultrafastbert.train import checkpoint, pretrain

    real, calls = st.save_model, []

    def save_model(model, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 3:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(model, filename, *a, **k)

    monkeypatch.setattr(st, "save_model", save_model)
    out = tmp_path / "out"
    args = run_args(out, tmp_path / "cache", "--max-steps", "20", "--save-every", "2",
                    "--keep-checkpoints", "10")
    with pytest.raises(ResourceError, match=r"cannot write the checkpoint \S+step-00000006: No "
                       r"space left on device; free some space .* previous checkpoint \S+ "
                       r"\(step 4\) is intact: continue from it .* --resume"):
        pretrain.run(_settings(args))
    latest = checkpoint.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.step == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest.json", "step-00000002", "step-00000004"]  # the torn one removed
    assert _steps(out) == list(range(1, 7))


def _settings(args: list[str]):
    import argparse

    from ultrafastbert.cli.pretrain import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return settings_from_args(parser.parse_args(["pretrain", *args]))
