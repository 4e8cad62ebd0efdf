"""Operating-system properties of the calling thread: its name in ``top -H`` / ``/proc`` and
its scheduling priority (Linux; elsewhere these do nothing).

The batch workers use both: a name, so a thread's CPU time can be told apart (the threads
a worker starts, torch's OpenMP workers among them, inherit it), and a lower priority than
the event loop, so that on a machine with fewer free cores than busy threads the loop that
accepts, refuses and answers requests gets a core first (see docs/serving.md, "Overload").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

_PR_SET_NAME = 15


def set_native_name(name: str) -> bool:
    """Name the calling OS thread (at most 15 bytes are kept); True when it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def lower_priority(steps: int) -> int | None:
    """Raise the calling thread's nice value by ``steps`` (a lower priority; threads it starts
    later inherit it). Returns the new nice value, None when it cannot be set here."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:  # on Linux the nice value is per thread: PRIO_PROCESS with a thread id sets one thread
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return nice
    except OSError as err:
        logger.warning("could not lower the batch worker's priority: %s", err)
        return None
