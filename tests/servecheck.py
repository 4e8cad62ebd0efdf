"""Test helpers for ``ultrafastbert serve``: a real server process on 127.0.0.1 and a client.

Servers listen on a free port of 127.0.0.1 only (``--port 0``; the port is read from the
ready line the server prints). Nothing here talks to any other address.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
_READY = re.compile(r" on http://127\.0\.0\.1:(\d+) ")


class ServerProcess:
    """``ultrafastbert serve MODEL_DIR --port 0 ...`` in a child process; its log (stderr) goes
    to ``log_file``."""

    def __init__(self, model_dir: Path, *args: str, log_file: Path, timeout: float = 120.0):
        self.log_file = log_file
        cmd = [sys.executable, "-m", "ultrafastbert.cli", "serve", str(model_dir),
               "--host", HOST, "--port", "0", "--threads", "1", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_file, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        self.port = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        seen = b""
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.5):
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            seen += line
            match = _READY.search(line.decode())
            if match:
                return int(match.group(1))
        self.proc.kill()
        raise RuntimeError(f"the server did not start: {seen.decode()}\n{self.log()}")

    def log(self) -> str:
        """What the server logged so far."""
        return self.log_file.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
        """Send ``sig``, wait for the exit; (exit status, the rest of its stdout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out.decode(errors="replace")

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        """One request on a new connection (see :func:`request`)."""
        return request(self.port, method, path, body, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)


class Response:
    """Status, headers and body of one answer; ``json`` parsed when it is JSON."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body
        kind = headers.get("content-type", "")
        self.json = json.loads(body) if kind.startswith("application/json") else None

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:300]!r})"


def request(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Response:
    """Send ``body`` as JSON (or the ``raw`` bytes as they are) to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        sent = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        head = {"Content-Type": "application/json"} if raw is None and body is not None else {}
        head.update(headers or {})
        conn.request(method, path, body=sent, headers=head)
        answer = conn.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                        answer.read())
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
