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
    errno.ENOSPC: "free some space on that disk, or choose a --out on another disk",
    errno.EDQUOT: "free some space within your disk quota, or choose a --out on another disk",
    errno.EFBIG: "the file is larger than this file system (or a ulimit) allows; choose a "
                 "--out on another disk",
    errno.EROFS: "that file system is read-only; choose a --out you can write to",
    errno.EACCES: "you lack permission to write there; choose a --out you can write to",
    errno.EPERM: "you lack permission to write there; choose a --out you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another --out",
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
        where = f"{what} {Path(path)}" if what else str(Path(path))
        message = f"cannot write {where}: {os_error_message(err)}; {advice(err)}."
        raise ResourceError(message + (f" {note}" if note else "")) from err
