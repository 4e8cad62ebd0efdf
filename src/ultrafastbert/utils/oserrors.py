"""Operating-system errors as the library's errors: a full disk, a read-only or unwritable folder.

``with writing(path, "the checkpoint"):`` turns an ``OSError`` raised while writing ``path`` into
a :class:`~ultrafastbert.errors.ResourceError` that names the file, the cause and what to do;
other exceptions pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ResourceError

#: errno -> what the user should do about it.
_ADVICE = {
    errno.ENOSPC: "free some space on that disk, or write to another disk",
    errno.EDQUOT: "free some space within your disk quota, or write to another disk",
    errno.EFBIG: "the file is larger than this file system (or a ulimit) allows; write to "
                 "another disk",
    errno.EROFS: "that file system is read-only; write somewhere else",
    errno.EACCES: "you lack permission to write there; write somewhere else",
    errno.EPERM: "you lack permission to write there; write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a directory; write somewhere else",
}


def os_error_message(err: OSError) -> str:
    """``No space left on device`` (the errno's text, without the path)."""
    return err.strerror or os.strerror(err.errno or 0) or type(err).__name__


def advice(err: OSError) -> str:
    """What to do about ``err`` (a generic hint for errnos without specific advice)."""
    return _ADVICE.get(err.errno or 0, "check that the disk is writable and has space")


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "", note: str = "") -> Iterator[None]:
    """Turn an ``OSError`` inside the block into a ``ResourceError`` about writing ``path``.

    Converted: a full disk, a quota, a read-only file system, and permission errors on
    ``path``'s folder; other ``OSError`` (reading an input file...) pass through.

    Args:
        path: the file or folder being written.
        what: what it is (``"the checkpoint"``), put before the path in the message.
        note: a sentence appended to the message, e.g. which earlier files are intact.
    """
    try:
        yield
    except ResourceError:
        raise
    except OSError as err:
        if not _about_writing(err, Path(path)):
            raise
        where = f"{what} {Path(path)}" if what else str(Path(path))
        message = f"cannot write {where}: {os_error_message(err)}; {advice(err)}."
        raise ResourceError(message + (f" {note}" if note else "")) from err


#: Errors that only writing causes; others (EACCES...) count when they name a path written.
_WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _about_writing(err: OSError, path: Path) -> bool:
    """Whether ``err`` is a failure to write ``path`` (not, say, to read an input file)."""
    if err.errno in _WRITE_ONLY:
        return True
    if err.errno not in _ADVICE:
        return False
    if err.filename is None:
        return True
    failed = Path(os.fsdecode(err.filename)).absolute()
    folder = path.absolute() if path.is_dir() else path.absolute().parent
    return failed == folder or folder in failed.parents


def as_os_error(err: BaseException, path: str | os.PathLike) -> BaseException:
    """The ``OSError`` behind a library's write error, else ``err`` itself.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; the ``OSError`` is its context when it wrote to a
    Python file, and a nearly full file system tells otherwise.
    """
    if isinstance(err, OSError):
        return err
    if isinstance(err.__context__, OSError):
        return err.__context__
    try:
        stat = os.statvfs(Path(path).parent)
    except OSError:
        return err
    if stat.f_bavail * stat.f_frsize < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return err


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` with a full disk raised as ``OSError(ENOSPC)``."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as err:
        cause = as_os_error(err, path)
        if cause is err:
            raise
        raise cause from err
