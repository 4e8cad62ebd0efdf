"""The errors the server answers with (apart from the library's own)."""

from __future__ import annotations

from collections.abc import Mapping


class ServeError(Exception):
    """A request the server refuses: HTTP ``status``, a message that says what to do, a short
    machine-readable ``code``, the request field at fault (``param``) and extra response
    ``headers`` (``Retry-After``)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed its connection before its answer was ready (nothing is sent back)."""
