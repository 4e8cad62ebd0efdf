"""One run per output directory: a second run on a busy ``--out`` is refused, naming the holder.

The real case (issue 13, item 2): two processes on one ``--out``; before the lock the second
rewrote ``metrics.jsonl`` and the first ended with 15 of its 60 steps in it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from train_helpers import cli_command, run_args, subprocess_env
from ultrafastbert.errors import InputError, ResourceError
from ultrafastbert.utils.lock import LOCK_FILE, DirectoryLock, read_holder


def test_second_lock_is_refused_and_names_the_holder(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path / "out", "pretrain") as first:
        assert first.held and read_holder(tmp_path / "out" / LOCK_FILE)["what"] == "pretrain"
        with pytest.raises(ResourceError, match=r"in use by another run \(pid \d+ on host"):
            DirectoryLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out").exists()  # created by the lock, left empty: removed
    with DirectoryLock(tmp_path / "out"):  # released: free again (negative control)
        pass


def test_lock_keeps_a_directory_that_holds_files(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with DirectoryLock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_lock_on_a_file_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        DirectoryLock(tmp_path / "f").acquire()


def _metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def test_two_processes_on_one_out(tmp_path: Path) -> None:
    """A real second process is refused while the first trains; the first loses nothing."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_args(out, cache, "--max-steps", "400", "--save-every", "5")
    first = subprocess.Popen(cli_command(*args), env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_metrics_steps(out)) < 3:
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run wrote no metrics in 120 s"
            time.sleep(0.2)
        seen = _metrics_steps(out)
        for extra in (("--resume",), ()):
            second = subprocess.run(cli_command(*args, *extra), env=subprocess_env(),
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert "is in use by another run" in second.stderr
            assert f"pid {first.pid} " in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run ended before the check: make it longer"
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    steps = _metrics_steps(out)
    assert steps == list(range(1, 401))  # nothing lost, nothing rewritten
    assert steps[:len(seen)] == seen
    assert not (out / LOCK_FILE).exists()
