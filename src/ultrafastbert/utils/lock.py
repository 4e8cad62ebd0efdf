"""An exclusive lock on an output directory, held for the whole of a run.

Two runs writing into one ``--out`` would rewrite each other's ``metrics.jsonl`` and
checkpoints. A run therefore holds ``DIR/.ultrafastbert.lock`` with ``fcntl.flock``; a second
run is refused with a message naming the holder (pid, host, command, start time, written into
the file). The kernel drops the lock when its process dies, ``kill -9`` included, so a crashed
run never leaves a stale lock behind. The file is removed on release; acquiring checks that the
locked file is still the one at the path, so a removal racing with a new run is safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InputError, ResourceError
from .oserrors import os_error_message

log = logging.getLogger(__name__)

LOCK_FILE = ".ultrafastbert.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no locking (logged once per lock)
    fcntl = None  # type: ignore[assignment]


class DirectoryLock:
    """Exclusive lock of ``directory`` (created if missing) for one run.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. ``what`` names the run in
    the holder's record (e.g. ``"pretrain"``).

    Raises (on acquiring):
        InputError: ``directory`` exists and is not a directory.
        ResourceError: another run holds the lock (the message names it), or the directory
            cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise; see the class docstring."""
        if self._fd is not None:
            return self
        self._created = _make_directory(self.directory)
        if fcntl is None:
            log.warning("no file locking on this platform: nothing stops a second run from "
                        "writing into %s", self.directory)
            return self
        while self._fd is None:
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ResourceError(self._busy_message()) from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the holder removed the file between our open and our lock: try again
                os.close(fd)
        self._write_holder()
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent). A directory that acquiring
        created and that is still empty (the run failed at once) is removed too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as err:  # the lock still drops with the descriptor
            log.debug("could not remove %s: %s", self.path, err)
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.directory.rmdir()

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write_holder(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                  "command": " ".join(sys.argv), "started_unix": int(time.time())}
        data = (json.dumps(record) + "\n").encode("utf-8")
        assert self._fd is not None  # called right after the lock was taken
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as err:
            self.release()
            raise ResourceError(f"cannot write {self.path} "
                                f"({os_error_message(err)}); choose another --out") from err

    def _busy_message(self) -> str:
        holder = read_holder(self.path)
        return (f"output directory {self.directory} is in use by another run "
                f"({describe_holder(holder)}); wait for it to finish, or choose another --out. "
                "Nothing in the directory was changed.")


def _make_directory(directory: Path) -> bool:
    """Create ``directory`` (and its parents); True when it did not exist before."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--out {directory} is a file, not a directory; give the path of a "
                         "new or empty directory (or of the run to --resume)")
    try:
        if directory.is_dir():
            return False
        directory.mkdir(parents=True, exist_ok=True)
        return True
    except OSError as err:
        raise ResourceError(f"cannot create the output directory {directory} "
                            f"({os_error_message(err)}); choose a --out you can write to"
                            ) from err


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ResourceError(f"cannot write into {path.parent} ({os_error_message(err)}); "
                            "choose a --out you can write to") from err


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def read_holder(path: str | os.PathLike) -> dict[str, Any]:
    """The holder's record in a lock file (empty when unreadable, e.g. still being written)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h, started 2026-12-01 11:20:03 UTC: ultrafastbert pretrain ...``."""
    if not holder:
        return "its details are not written yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                            time.gmtime(holder.get("started_unix", 0)))
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"
    command = holder.get("command")
    return f"{text}: {command}" if command else text
