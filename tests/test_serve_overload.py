"""``ultrafastbert serve`` under overload and faults, as real server processes on 127.0.0.1
with a stub model that records every text it computes (``servestub.py``) and can be held busy:
admission (429 with Retry-After), a client that leaves, the queue deadline, API keys, SIGTERM
while overloaded. No timing is asserted: only who gets which answer and what is computed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from servecheck import HOST, ServerProcess, metric  # noqa: E402

STUB = Path(__file__).parent / "servestub.py"
SRC = Path(__file__).parent.parent / "src"


class StubServer(ServerProcess):
    """``servestub.py`` (the CLI with a stub model) with ``args``; ``gate`` holds the model
    while it exists (for a batch with the word ``hold``), ``calls`` lists what it computed."""

    def __init__(self, folder: Path, *args: str, env: dict[str, str] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.calls, self.gate = folder / "calls.txt", folder / "gate"
        self.calls.touch()
        self.log_file = folder / "log"
        import subprocess

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "UFB_STUB_CALLS": str(self.calls),
               "UFB_STUB_GATE": str(self.gate),
               "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
        cmd = [sys.executable, str(STUB), "--host", HOST, "--port", "0", "--threads", "1",
               *args]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        self.port = self._wait_ready(120)

    def computed(self) -> list[str]:
        """Every text the model computed so far, in order."""
        return self.calls.read_text().splitlines()

    def hold(self, pool: ThreadPoolExecutor, text: str = "hold") -> Future:
        """Close the gate and send ``text`` (with the word hold); returns once it is in the
        model."""
        self.gate.touch()
        answer = pool.submit(self.post, "/v1/embeddings", {"input": text})
        wait_for(lambda: text in self.computed(), "the held request never reached the model")
        return answer

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)

    def health(self) -> dict:
        return self.request("GET", "/health").json

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.request("GET", "/metrics").body.decode(), name, **labels)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    """At most 3 model requests and 40 queued tokens; a long queue deadline."""
    server = StubServer(tmp_path_factory.mktemp("stub"), "--max-concurrent-requests", "3",
                        "--max-queue-tokens", "40", "--max-queue-ms", "30000")
    yield server
    server.release()
    server.stop()


def _assert_overload_error(answer, code: str) -> None:
    assert answer.status == 429, answer
    assert int(answer.headers["retry-after"]) >= 1
    error = answer.json["error"]
    assert error["code"] == code and error["type"] == "rate_limit_error"
    assert "retry after" in error["message"] and error["param"] is None


# ------------------------------------------------------------------------------ admission
def test_a_full_server_refuses_at_once_with_429_and_retry_after(stub):
    twelve = " ".join(f"w{i}" for i in range(12))  # 14 tokens each
    with ThreadPoolExecutor(4) as pool:
        held = stub.hold(pool, "hold full")
        queued = pool.submit(stub.post, "/v1/embeddings", {"input": "queued one"})  # 4 tokens
        wait_for(lambda: stub.health()["requests_in_flight"] == 2, "never queued")
        assert stub.health()["queued_tokens"] == 4
        # 4 queued + 44 > 40 tokens: refused while the model is still held.
        big = stub.post("/v1/embeddings", {"input": [twelve, twelve + " a", twelve + " b"]})
        _assert_overload_error(big, "queue_full")
        small = pool.submit(stub.post, "/v1/embeddings", {"input": "small"})
        wait_for(lambda: stub.health()["requests_in_flight"] == 3, "never admitted")
        fourth = stub.post("/v1/embeddings", {"input": "one more"})  # 3 requests in flight
        _assert_overload_error(fourth, "too_many_requests")
        health = stub.health()
        assert health["status"] == "overloaded" and health["limits"]["max_queue_tokens"] == 40
        assert not held.done()  # both refusals came while the model was busy
        stub.release()
        answers = [held.result(), queued.result(), small.result()]
    assert [a.status for a in answers] == [200, 200, 200]
    computed = stub.computed()
    assert "queued one" in computed and "small" in computed  # control: admitted work runs
    assert not any(t.startswith(twelve) for t in computed) and "one more" not in computed
    assert stub.metric("ultrafastbert_rejected_requests_total", reason="queue_tokens") == 1
    assert stub.metric("ultrafastbert_rejected_requests_total", reason="concurrency") == 1
    assert stub.metric("ultrafastbert_requests_total", endpoint="/v1/embeddings",
                       status="429") == 2
    assert stub.health()["queued_tokens"] == 0 and stub.health()["requests_in_flight"] == 0


def test_a_request_bigger_than_the_queue_bound_runs_when_nothing_waits(stub):
    text = " ".join(f"x{i}" for i in range(12))
    before = stub.metric("ultrafastbert_rejected_requests_total", reason="queue_tokens")
    with ThreadPoolExecutor(2) as pool:
        held = stub.hold(pool, "hold big")  # in the model: nothing queued
        big = pool.submit(stub.post, "/v1/embeddings",
                          {"input": [text, text + " y", text + " z"]})  # 44 tokens > 40
        wait_for(lambda: stub.health()["queued_tokens"] == 44, "never admitted")
        # The queue is over its bound: refused at the gate, whatever the request's size.
        _assert_overload_error(stub.post("/v1/embeddings", {"input": "tiny"}), "queue_full")
        stub.release()
        assert held.result().status == 200
        assert big.result().status == 200  # alone: run, not refused forever
    assert text in stub.computed() and "tiny" not in stub.computed()
    assert stub.metric("ultrafastbert_rejected_requests_total",
                       reason="queue_tokens") == before + 1


# ---------------------------------------------------------------------- a client that leaves
def _send_and_leave(port: int, text: str) -> socket.socket:
    """Send a complete embeddings request on a raw socket (the caller closes it)."""
    body = json.dumps({"input": text}).encode()
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_the_text_of_a_client_that_left_is_not_computed(stub):
    before = stub.metric("ultrafastbert_cancelled_requests_total", reason="disconnected")
    with ThreadPoolExecutor(2) as pool:
        held = stub.hold(pool, "hold gone")
        sock = _send_and_leave(stub.port, "victim text")
        wait_for(lambda: stub.health()["requests_in_flight"] == 2, "never admitted")
        sock.close()  # the client gives up while its text waits for the model
        wait_for(lambda: stub.metric("ultrafastbert_cancelled_requests_total",
                                     reason="disconnected") == before + 1, "not noticed")
        stays = pool.submit(stub.post, "/v1/embeddings", {"input": "stays here"})
        wait_for(lambda: stub.health()["requests_in_flight"] == 2, "never admitted")
        stub.release()
        assert held.result().status == 200 and stays.result().status == 200
    computed = stub.computed()
    assert "stays here" in computed  # control: the same wait, a client that stayed
    assert "victim text" not in computed
    assert stub.metric("ultrafastbert_skipped_inputs_total", reason="disconnected") >= 1
    assert stub.metric("ultrafastbert_requests_total", endpoint="/v1/embeddings",
                       status="499") >= 1
    assert "ERROR" not in stub.log()  # a cancelled request is routine, not an error


# --------------------------------------------------------------------------- the deadline
def test_a_request_past_its_queue_deadline_is_answered_and_not_computed(tmp_path):
    server = StubServer(tmp_path / "s", "--max-queue-ms", "300", "--max-queue-tokens", "100",
                        "--max-concurrent-requests", "8")
    try:
        with ThreadPoolExecutor(2) as pool:
            held = server.hold(pool)
            late = server.post("/v1/embeddings", {"input": "too late"})
            _assert_overload_error(late, "queue_timeout")
            assert "300 ms" in late.json["error"]["message"]
            assert not held.done()  # answered at its deadline, not when the model was free
            server.release()
            # The held request started within its deadline: it runs to its end.
            assert held.result().status == 200
        assert server.post("/v1/embeddings", {"input": "in time"}).status == 200  # control
        computed = server.computed()
        assert "in time" in computed and "too late" not in computed
        assert server.metric("ultrafastbert_cancelled_requests_total", reason="expired") == 1
        wait_for(lambda: server.metric("ultrafastbert_skipped_inputs_total",
                                       reason="expired") == 1, "never dropped")
        assert server.metric("ultrafastbert_request_queue_seconds_count") >= 2
        assert "ERROR" not in server.log()
    finally:
        server.release()
        server.stop()


# ------------------------------------------------------------------------------- API keys
def test_api_keys_are_required_everywhere_but_health(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# a comment\nfile-key-1\n\nfile-key-2\n")
    server = StubServer(tmp_path / "s", "--api-key-file", str(keys), "--api-key", "argv-key",
                        env={"ULTRAFASTBERT_API_KEY": "env-key"})
    try:
        body = {"input": "hello"}
        for key in ("file-key-1", "file-key-2", "env-key", "argv-key"):
            ok = server.post("/v1/embeddings", body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status == 200, (key, ok)
        assert server.post("/v1/embeddings", body,
                           headers={"Authorization": "bearer env-key"}).status == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "env-key"},
                        {"Authorization": "Basic env-key"},
                        {"Authorization": "Bearer file-key-1x"}):
            refused = server.post("/v1/embeddings", body, headers=headers)
            assert refused.status == 401, (headers, refused)
            assert refused.json["error"]["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
        for method, path in (("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/nowhere")):
            assert server.request(method, path).status == 401, path
        assert server.request("GET", "/health").status == 200
        assert server.request("GET", "/metrics",
                              headers={"Authorization": "Bearer env-key"}).status == 200
        assert "hello" in server.computed()
    finally:
        status, out = server.stop()
    assert status == 0
    log = server.log()
    assert "--api-key puts the key where every user" in log
    assert not any(k in log + out for k in ("file-key", "env-key", "wrong"))


def test_an_empty_key_file_is_refused(tmp_path, capsys):
    from ultrafastbert.cli import main as cli_main

    (tmp_path / "keys").write_text("# no key here\n\n")
    assert cli_main(["serve", str(tmp_path), "--api-key-file", str(tmp_path / "keys")]) == 2
    assert "holds no key" in capsys.readouterr().err


# ------------------------------------------------------------------------------- shutdown
def _read_reply(sock: socket.socket) -> str:
    """One HTTP answer read off a raw socket (to the end of its body), then the socket closed."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    return data.decode()


def test_sigterm_while_overloaded_answers_or_refuses_every_request(tmp_path):
    server = StubServer(tmp_path / "s", "--max-concurrent-requests", "4",
                        "--max-queue-tokens", "1000", "--max-queue-ms", "30000")
    with ThreadPoolExecutor(10) as pool:
        held = server.hold(pool)
        # A request whose body is not all sent yet: in flight when the signal comes.
        body = b'{"input": "last words"}'
        partial = socket.create_connection((HOST, server.port), timeout=30)
        partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body[:5])
        wait_for(lambda: server.health()["requests_in_flight"] == 2, "never admitted")
        burst = [pool.submit(server.post, "/v1/embeddings", {"input": f"burst {i}"})
                 for i in range(8)]
        wait_for(lambda: sum(b.done() for b in burst) == 6, "no refusals")
        assert server.health()["requests_in_flight"] == 4
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "answering the requests in flight" in server.log(), "no signal")
        partial.sendall(body[5:])
        reply = _read_reply(partial)
        server.release()
        answers = [held.result(), *(b.result() for b in burst)]
    status, out = server.stop()
    assert status == 0 and "stopped" in out, server.log()
    assert reply.startswith("HTTP/1.1 503") and '"shutting_down"' in reply, reply
    statuses = sorted(a.status for a in answers)
    assert statuses == [200, 200, 200] + [429] * 6, statuses
    computed = server.computed()
    assert sum(t.startswith("burst") for t in computed) == 2 and "last words" not in computed


# ------------------------------------------------------------------------ a model process
def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_model_process_computes_what_the_front_admits_and_nothing_for_a_client_gone(
        tmp_path):
    server = StubServer(tmp_path / "s", "--model-process", "--model-nice", "3",
                        "--max-queue-ms", "30000", "--max-concurrent-requests", "8")
    try:
        [child] = [int(p) for p in server.log().split("child process(es): ", 1)[1]
                   .split("\n", 1)[0].split(", ")]
        assert child != server.proc.pid
        assert _nice(child) == _nice(server.proc.pid) + 3  # the model yields to the front
        pids = server.calls.with_name("calls.txt.pids")
        calls_at_start = len(pids.read_text().splitlines())  # the warm-ups and the timing
        ok = server.post("/v1/embeddings", {"input": ["one two three", "four"]})
        assert ok.status == 200, ok
        assert [d["embedding"][0] for d in ok.json["data"]] == [5.0, 3.0]  # tokens per text
        with ThreadPoolExecutor(2) as pool:
            held = server.hold(pool)  # in the child's model call
            sock = _send_and_leave(server.port, "victim text")
            wait_for(lambda: server.health()["requests_in_flight"] == 2, "never admitted")
            sock.close()
            wait_for(lambda: server.metric("ultrafastbert_cancelled_requests_total",
                                           reason="disconnected") == 1, "not noticed")
            stays = pool.submit(server.post, "/v1/embeddings", {"input": "stays here"})
            wait_for(lambda: server.health()["requests_in_flight"] == 2, "never admitted")
            server.release()
            assert held.result().status == 200 and stays.result().status == 200
        computed = server.computed()
        assert "one two three" in computed and "stays here" in computed
        assert "victim text" not in computed
        callers = pids.read_text().splitlines()
        assert {int(p) for p in callers[:calls_at_start]} == {server.proc.pid, child}
        assert {int(p) for p in callers[calls_at_start:]} == {child}  # every request's call
        os.kill(child, signal.SIGKILL)  # the model process dies: answered, not hung
        gone = server.post("/v1/embeddings", {"input": "after the end"})
        assert gone.status == 503 and gone.json["error"]["code"] == "model_unavailable", gone
    finally:
        server.release()
        status, _ = server.stop()
    assert status == 0
    assert not Path(f"/proc/{child}").exists()  # reaped with the server
    assert "ERROR" not in server.log()
