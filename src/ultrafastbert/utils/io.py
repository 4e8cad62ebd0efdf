"""Atomic writes of files and directories: write beside the target, fsync, then rename.

A crash or ``kill -9`` at any moment leaves either the old file (directory) or the new one,
never a torn one. :func:`atomic_path` writes one file; :func:`atomic_directory` one directory
(model checkpoints, training checkpoints and the native kernel's build all use it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False,
                     prefix: str | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    On leaving the block without an error, the folder and everything in it get the usual
    permissions (``0o777``/``0o666`` less the umask; ``mkdtemp`` makes them private; exec bits
    are kept), every file and folder in it is fsynced, it is renamed to ``target``, and the
    parent folder is fsynced so the rename itself is durable. With ``replace`` an existing
    ``target`` is moved aside first and removed after the rename; without it, renaming onto an
    existing non-empty ``target`` raises ``OSError``. On an error the temporary folder is removed
    and ``target`` is untouched.

    Args:
        target: the directory to create.
        replace: swap out an existing ``target``.
        prefix, suffix: the temporary folder's name around ``mkdtemp``'s random part (default
            ``.<name>.`` and ``.tmp``), so callers can find and remove leftovers of a crash.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}." if prefix is None else prefix,
                                suffix=suffix, dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        _fsync_tree(tmp)
        _rename_into_place(tmp, target, replace)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, target: Path, replace: bool) -> None:
    if not (replace and target.exists()):
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "previous")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """``mkdtemp``/``mkstemp`` create private entries; give them the umask's permissions."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            os.chmod(path, 0o777 & ~mask)
        elif stat.S_ISREG(mode):
            os.chmod(path, ((mode & 0o777) | 0o666) & ~mask)


def _fsync_tree(folder: Path) -> None:
    """fsync every regular file and folder under ``folder``, the deepest first, then ``folder``."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
