"""utils.io.atomic_directory: all or nothing, durable (fsync), permissions from the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ultrafastbert.utils import io


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fill(tmp: Path) -> None:
    (tmp / "a.json").write_text("{}")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(b"\0" * 10)
    tool = tmp / "tool.so"
    tool.write_bytes(b"x")
    tool.chmod(0o755)


@pytest.mark.parametrize("mask, dirs, files, execs", [
    (0o022, 0o755, 0o644, 0o755), (0o077, 0o700, 0o600, 0o700), (0o002, 0o775, 0o664, 0o775)])
def test_writes_everything_with_umask_modes(tmp_path, umask, mask, dirs, files, execs):
    umask(mask)
    target = tmp_path / "out" / "ckpt"
    with io.atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        _fill(tmp)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "a.json", "sub", "sub/b.bin", "tool.so"]
    assert (_mode(target), _mode(target / "sub")) == (dirs, dirs)
    assert (_mode(target / "a.json"), _mode(target / "sub" / "b.bin")) == (files, files)
    assert _mode(target / "tool.so") == execs  # exec bits kept
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]  # no temporary left


def test_fsyncs_every_file_the_folder_and_its_parent(tmp_path, monkeypatch):
    synced: list[Path] = []
    real = io._fsync
    monkeypatch.setattr(io, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    target = tmp_path / "ckpt"
    with io.atomic_directory(target) as tmp:
        _fill(tmp)
    names = {p.relative_to(tmp_path).as_posix().replace(tmp.name, "TMP") for p in synced}
    assert names == {"TMP", "TMP/a.json", "TMP/sub", "TMP/sub/b.bin", "TMP/tool.so", "."}
    assert synced[-1] == tmp_path  # the rename is made durable last


def test_an_error_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_directory(target, replace=True) as tmp:
        (tmp / "new").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in target.iterdir()] == ["old"]


def test_replace_swaps_an_existing_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("gone")
    with io.atomic_directory(target, replace=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_without_replace_a_full_target_is_an_error(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("keep")
    with pytest.raises(OSError), io.atomic_directory(target) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_temporary_name_is_the_callers(tmp_path):
    target = tmp_path / "native-abc"
    with io.atomic_directory(target, prefix="native-abc.tmp-", suffix="") as tmp:
        assert tmp.name.startswith("native-abc.tmp-") and not tmp.name.endswith(".tmp")
    with io.atomic_directory(tmp_path / "x") as tmp:
        assert tmp.name.startswith(".x.") and tmp.name.endswith(".tmp")
