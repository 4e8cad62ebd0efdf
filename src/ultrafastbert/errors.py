"""The library's own error types: one hierarchy, so the CLI can report them in one line.

Every error the library raises on purpose (bad input, a bad file, a bad config, a missing
resource) is an :class:`UltraFastBertError`. Each subclass also derives from the builtin type
that callers already catch (``ValueError``, ``RuntimeError``, ...), so ``except ValueError``
keeps working. Anything else that escapes is a bug and shows a traceback.
"""

from __future__ import annotations


class UltraFastBertError(Exception):
    """Base of every error the library raises on purpose; the message says what to do."""


class InputError(UltraFastBertError, ValueError):
    """A bad argument or input value (a flag, a text, a tensor shape, a KxD spec)."""


class InputTypeError(UltraFastBertError, TypeError):
    """An argument of the wrong type (a string for a list, integer ids for a float tensor)."""


class ConfigError(UltraFastBertError, ValueError):
    """A configuration that cannot be used (a field's value, an unknown key)."""


class DataError(UltraFastBertError, ValueError):
    """A file whose content cannot be used (a corrupt checkpoint, a corpus with no text)."""


class NotFoundError(UltraFastBertError, FileNotFoundError):
    """A file or directory the caller named does not exist."""


class OutputExistsError(UltraFastBertError, FileExistsError):
    """The output path already holds something the library must not overwrite."""


class ResourceError(UltraFastBertError, RuntimeError):
    """Something the run needs is not there (a device, disk space, a lock held by another run)."""


class RunError(UltraFastBertError, RuntimeError):
    """A run cannot go on (a non-finite loss, a checkpoint that does not fit, a failed check)."""


class Interrupted(UltraFastBertError):
    """The user stopped a run (Ctrl-C); the message says what was saved and how to go on.

    Not a failure: the command line exits with status 130 (as for SIGINT), without a traceback.
    """
