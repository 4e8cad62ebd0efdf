"""Running the app: a socket on the given address, uvicorn, and a shutdown that exits 0.

On SIGTERM or SIGINT the server stops accepting connections, refuses model requests that
reach it from then on (503), answers every request in flight (up to ``graceful_timeout_s``;
queued ones are still bounded by the queue deadline), stops the batch worker and returns; a second SIGINT forces the
exit. (uvicorn by itself re-raises the signal after a graceful shutdown, which makes the
process end by the signal instead of with status 0.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ..errors import ResourceError, RunError
from .app import create_app
from .config import ServeConfig

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port, see ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it a response's header and body writes wait ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ResourceError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port "
                      "(0 takes a free one)") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(predictor: Any, config: ServeConfig, sock: socket.socket,
          on_ready: Callable[[], None] | None = None,
          model_loader: Callable[[], Any] | None = None) -> None:
    """Serve ``predictor`` on the bound socket until SIGTERM/SIGINT; ``on_ready`` runs once
    the model is warm and the server accepts requests (``model_loader``: see
    :func:`~ultrafastbert.serve.app.create_app`)."""
    app = create_app(predictor, config, model_loader)
    uv_config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                               timeout_graceful_shutdown=math.ceil(config.graceful_timeout_s))
    server = Server(uv_config, on_ready, on_exit=app.state.service.drain)
    server.run(sockets=[sock])
    if not server.started:
        raise RunError("the server did not start (see the log above)")


class Server(uvicorn.Server):
    """uvicorn's server, with an ``on_ready`` hook and signals that end with status 0."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None = None,
                 on_exit: Callable[[], None] | None = None):
        super().__init__(config)
        self._on_ready, self._on_exit = on_ready, on_exit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, without re-raising the signal after the graceful shutdown."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.warning("signal %d: answering the requests in flight, then exiting", sig)
            if self._on_exit is not None:
                self._on_exit()
        super().handle_exit(sig, frame)
