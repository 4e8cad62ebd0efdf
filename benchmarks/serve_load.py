"""Bounded load test of embedding servers on 127.0.0.1: texts/s and p50/p95/p99 latency.

Starts each server in a child process on a free port of 127.0.0.1 (and nowhere else), checks
its answers before timing anything, then sends ``POST /v1/embeddings`` from 1, 8 and 64
concurrent clients (each a keep-alive connection): a fixed number of requests per level and a
time limit per level, after a short warm-up. Then it stops the server and goes on to the next.

Servers (each ``LABEL=DIR``, repeatable, measured in the order given):

- ``--serve``: ``ultrafastbert serve DIR`` (dynamic batching), any model directory
  ``Predictor`` loads (``--server-arg`` passes flags on, e.g. ``--server-arg=--dtype=bfloat16``);
- ``--plain``: the same model, one ``Predictor.embed`` call per request (``plain_server.py``);
- ``--st``: a sentence-transformers directory, one ``encode`` call per request.

Example (``--make-stand-ins`` writes random-init models; docs/serving.md has the real command):

    python benchmarks/serve_load.py --make-stand-ins /tmp/m \\
        --serve fff=/tmp/m/minilm-size-fff-8x7 --serve dense=/tmp/m/minilm-size-dense \\
        --plain dense-plain=/tmp/m/minilm-size-dense --out results/serve_load

Writes ``results.json`` (every figure, the environment, the command) and ``results.md``.

``--overload`` measures one ``--serve`` server past its capacity instead: first its capacity
(closed loop: ``--capacity-clients`` clients sending requests back to back), then open-loop
arrivals (Poisson, each request on its own connection, never retried) at ``--multiples`` of that
rate for ``--duration`` seconds each, every client giving up after ``--client-timeout`` s (it
closes its connection: the server sees it leave). Per level: goodput (texts answered 200 within
the client's timeout, per second), refusals and their latency, p50/p99 of the accepted requests,
client timeouts, the texts the server computed that reached nobody in time, the server's
peak resident memory, and where the time went (the server's event-loop lag, the load
generator's own lateness, CPU seconds per thread group). ``--compare-unbounded`` runs the same
levels again with the admission bounds lifted (the ablation); ``--client-cpus`` /
``--server-cpus`` pin either side to CPUs. See docs/serving.md, "Overload".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
_READY = re.compile(r" on http://127\.0\.0\.1:(\d+) ")


@dataclass(frozen=True)
class Target:
    kind: str  # serve, plain, st
    label: str
    path: Path


@dataclass
class Level:
    """One concurrency level's figures."""

    clients: int
    requests: int
    texts: int
    errors: int
    seconds: float
    texts_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    stopped_by: str  # "count" or "time limit"
    server_cpu_s: float | None = None  # CPU time the server process used during the level
    texts_per_cpu_s: float | None = None  # texts per CPU-second: what a text costs, load or not


# ------------------------------------------------------------------------------ the servers
def server_command(target: Target, threads: int, extra: list[str]) -> list[str]:
    if target.kind == "serve":
        return [sys.executable, "-m", "ultrafastbert.cli", "serve", str(target.path),
                "--host", HOST, "--port", "0", "--threads", str(threads), "--quiet", *extra]
    backend = "predictor" if target.kind == "plain" else "sentence-transformers"
    return [sys.executable, str(HERE / "plain_server.py"), backend, str(target.path),
            "--port", "0", "--threads", str(threads)]


def start_server(cmd: list[str], log: Path, timeout: float = 300.0,
                 cpus: set[int] | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` (on the CPUs ``cpus`` only, when given) and wait for its ready line;
    (process, port)."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, preexec_fn=pin)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline().decode(errors="replace")
            match = _READY.search(line)
            if match:
                return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError(f"the server did not start: {shlex.join(cmd)}\n{log.read_text()}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ the client
class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (minimal: Content-Length bodies)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next(int(h.split(":", 1)[1]) for h in lines[1:]
                      if h.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _client(conn: Connection, jobs: list[list[str]], state: dict[str, Any],
                  latencies: list[float]) -> None:
    while state["next"] < len(jobs) and time.perf_counter() < state["deadline"]:
        batch = jobs[state["next"]]
        state["next"] += 1
        start = time.perf_counter()
        try:
            status, body = await conn.post("/v1/embeddings", {"input": batch})
            ok = status == 200 and len(json.loads(body)["data"]) == len(batch)
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
            ok, conn.writer = False, None
        if ok:
            latencies.append(time.perf_counter() - start)
            state["texts"] += len(batch)
        else:
            state["errors"] += 1


async def run_level(port: int, clients: int, jobs: list[list[str]], warmup: list[list[str]],
                    time_limit: float, server_pid: int | None = None) -> Level:
    """Warm up, then send ``jobs`` from ``clients`` concurrent connections (and, given the
    server's pid, measure the CPU time it used)."""
    conns = [Connection(port) for _ in range(clients)]
    try:
        cold = {"next": 0, "deadline": time.perf_counter() + time_limit, "texts": 0,
                "errors": 0}
        await asyncio.gather(*(_client(c, warmup, cold, []) for c in conns))
        latencies: list[float] = []
        state = {"next": 0, "deadline": time.perf_counter() + time_limit, "texts": 0,
                 "errors": 0}
        cpu_start = None if server_pid is None else cpu_seconds(server_pid)
        start = time.perf_counter()
        await asyncio.gather(*(_client(c, jobs, state, latencies) for c in conns))
        seconds = time.perf_counter() - start
        cpu_end = None if server_pid is None else cpu_seconds(server_pid)
    finally:
        for c in conns:
            c.close()
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    cpu = None if cpu_start is None or cpu_end is None else round(cpu_end - cpu_start, 2)
    return Level(clients, len(latencies) + state["errors"], state["texts"], state["errors"],
                 round(seconds, 3), round(state["texts"] / seconds, 1),
                 *(round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)),
                 "count" if state["next"] >= len(jobs) else "time limit",
                 cpu, round(state["texts"] / cpu, 1) if cpu else None)


# ------------------------------------------------------------------------------- checking
def check_answers(target: Target, port: int, texts: list[str]) -> str:
    """Refuse to time a server whose embeddings are wrong; returns what was checked."""
    sample = texts[:4]

    async def ask() -> tuple[np.ndarray, list[np.ndarray]]:
        conn = Connection(port)
        try:
            status, body = await conn.post("/v1/embeddings", {"input": sample})
            assert status == 200, body[:300]
            together = np.array([d["embedding"] for d in json.loads(body)["data"]])
            alone = []
            for text in sample:
                status, body = await conn.post("/v1/embeddings", {"input": text})
                alone.append(np.array(json.loads(body)["data"][0]["embedding"]))
            return together, alone
        finally:
            conn.close()

    together, alone = asyncio.run(ask())
    if not np.isfinite(together).all() or together.shape[0] != len(sample):
        raise RuntimeError(f"{target.label}: bad embeddings, shape {together.shape}")
    exact = True
    if target.kind in ("serve", "plain"):
        from ultrafastbert.infer import Predictor

        predictor = Predictor.from_pretrained(target.path)
        exact = set(predictor.precision_choice.chosen.values()) == {"float32"}
        want = predictor.embed(sample).numpy()
        tol = 1e-3 * max(1.0, float(np.abs(want).max()))
        if np.abs(together - want).max() > tol:
            raise RuntimeError(f"{target.label}: embeddings differ from Predictor.embed by "
                               f"{np.abs(together - want).max():.2e}")
        checked = "equal to Predictor.embed"
    else:
        checked = "a text alone equals it in a batch"
    if not exact:
        # int8 activations are quantized with one scale per batch, and `auto` may run a lone
        # text and a batch at different precisions: a text's vector then depends on its batch,
        # within the accuracy rule (cosine >= 0.99, docs/precision.md), not to 1e-3.
        cosine = _min_cosine(np.stack(alone), together)
        if cosine < 0.99:
            raise RuntimeError(f"{target.label}: a text alone and in a batch: cosine {cosine:.4f}")
        return f"{checked}; alone vs batched cosine >= {cosine:.4f}, width {together.shape[1]}"
    if np.abs(np.stack(alone) - together).max() > 1e-3 * max(1.0, float(np.abs(together).max())):
        raise RuntimeError(f"{target.label}: a text's embedding depends on its batch")
    return f"{checked} (max |diff| within 1e-3), width {together.shape[1]}"


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine between ``a`` and ``b`` (both ``(n, d)``)."""
    dots = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(dots.min())


# ------------------------------------------------------------------------------ workload
def load_texts(path: Path | None, count: int) -> list[str]:
    """``count`` texts: lines of ``path`` (first tab-separated column; a header line named
    ``sentence`` is skipped), or sentences of the bundled demo corpus."""
    if path is not None:
        lines = path.read_text().splitlines()
        header = lines[0].split("\t") if lines else []
        if "sentence1" in header:  # GLUE pairs (STS-B, MRPC...): both sentences of each row
            cols = [header.index(c) for c in ("sentence1", "sentence2") if c in header]
            rows = [line.split("\t") for line in lines[1:]]
            texts = [r[c].strip() for r in rows for c in cols if len(r) > c and r[c].strip()]
        else:
            texts = [t for t in (line.split("\t")[0].strip() for line in lines)
                     if t and t != "sentence"]
    else:
        import lzma

        from ultrafastbert.data.corpus import demo_corpus_resource

        with demo_corpus_resource().open("rb") as raw, lzma.open(raw, "rt") as text:
            chunk = text.read(2_000_000)
        texts = [s.strip() + "." for s in re.split(r"(?<=[.;?!])\s+", chunk)
                 if 4 <= len(s.split()) <= 60]
    if not texts:
        raise SystemExit(f"no texts in {path}")
    return [texts[i % len(texts)] for i in range(count)]


def stand_in_configs() -> dict[str, Any]:
    """Random-init models of the sizes that matter, for when no trained one is at hand:
    tiny (4 layers, d 256) and MiniLM-L6 size (6 layers, d 384, 12 heads, FF 1536), each dense
    and FFF (MiniLM size: 8x7, the converted model's shape; 64 of 1,536 neurons per token)."""
    from ultrafastbert.model import DenseFF, FFFSpec, ModelConfig

    minilm = ModelConfig.from_preset("tiny-dense", n_layers=6, d_model=384, n_heads=12,
                                     vocab_size=32768, ff=DenseFF(1536))
    return {"tiny-fff": ModelConfig.from_preset("tiny-fff", vocab_size=32768),
            "tiny-dense": ModelConfig.from_preset("tiny-dense", vocab_size=32768),
            "minilm-size-dense": minilm, "minilm-size-fff-8x7": minilm.replace(ff=FFFSpec(8, 7))}


def make_stand_ins(folder: Path) -> None:
    """Write :func:`stand_in_configs` as MLM directories with the demo tokenizer (random
    weights: they show the server's speed, not a model's quality)."""
    import torch

    from ultrafastbert.data.tokenizer import demo_tokenizer, save_tokenizer
    from ultrafastbert.model import UltraFastBertForMaskedLM

    tok = save_tokenizer(demo_tokenizer(), folder / "tokenizer")
    for name, config in stand_in_configs().items():
        if not (folder / name / "config.json").is_file():
            torch.manual_seed(0)
            UltraFastBertForMaskedLM(config).save_pretrained(folder / name, tokenizer_file=tok)


# ---------------------------------------------------------------------------------- main
def environment(threads: int, note: str) -> dict[str, Any]:
    from ultrafastbert.bench.common import environment as base

    env = base("cpu")  # CPU model, speed flags (AVX-512, AVX512-BF16, AMX), cores, oneDNN
    env["server_threads"] = threads
    for pkg in ("fastapi", "uvicorn", "sentence-transformers", "transformers", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[pkg] = metadata.version(pkg)
    env["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    env["note"] = note
    return env


def parse_targets(args: argparse.Namespace) -> list[Target]:
    targets = []
    for kind in ("serve", "plain", "st"):
        for spec in getattr(args, kind) or []:
            label, sep, path = spec.partition("=")
            if not sep or not label or not path:
                raise SystemExit(f"--{kind} takes LABEL=DIR, got {spec!r}")
            targets.append(Target(kind, label, Path(path)))
    if not targets:
        raise SystemExit("give at least one --serve, --plain or --st LABEL=DIR")
    return targets


def _server_conditions(env: dict[str, Any]) -> str:
    """``CPU: ...; server threads N, fastapi V, uvicorn V``: the start of both reports' header."""
    from ultrafastbert.bench.common import speed_summary

    return (f"CPU: {speed_summary(env)}; server threads {env['server_threads']}, fastapi "
            f"{env.get('fastapi')}, uvicorn {env.get('uvicorn')}")


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# Serving load test ({env['timestamp']})", "",
             f"{_server_conditions(env)}, load average at start "
             f"{env['loadavg_1m_at_start']}. {env['note']}", "",
             f"Command: `{results['command']}`", "",
             f"{results['texts_per_request']} text(s) per request; "
             f"{results['requests_per_level']} requests per level (time limit "
             f"{results['time_limit_s']} s).", "",
             "| server | kind | clients | texts/s | p50 ms | p95 ms | p99 ms | errors | "
             "server CPU s | texts per CPU-second | mean rows per model call |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in results["targets"]:
        for lv in t["levels"]:
            rows = lv.get("mean_batch_rows")
            lines.append(f"| {t['label']} | {t['kind']} | {lv['clients']} | "
                         f"{lv['texts_per_s']:.1f} | {lv['p50_ms']:.1f} | {lv['p95_ms']:.1f} | "
                         f"{lv['p99_ms']:.1f} | {lv['errors']} | {_cell(lv['server_cpu_s'])} | "
                         f"{_cell(lv['texts_per_cpu_s'])} | {_cell(rows)} |")
    lines += ["", "Checks: " + "; ".join(f"{t['label']}: {t['check']}"
                                         for t in results["targets"]), ""]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _model_cpu(cpu: dict[str, float]) -> str:
    """The model's CPU seconds: its threads', or its processes' (marked ``p``)."""
    if cpu.get("model_processes"):
        return f"{cpu['model_processes']:g} p"
    return str(cpu.get("model", ""))


def _le(value: float | None) -> str:
    """A histogram bucket's upper bound as an upper bound (``<= 20``)."""
    return "" if value is None else f"<= {value:g}"


def batch_rows(port: int) -> tuple[float, float]:
    """(rows, model calls) so far, from an ultrafastbert server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    total = calls = 0.0
    for line in text.splitlines():
        if line.startswith("ultrafastbert_batch_rows_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ultrafastbert_batch_rows_count"):
            calls += float(line.rsplit(" ", 1)[1])
    return total, calls


def measure(target: Target, args: argparse.Namespace, texts: list[str], out: Path
            ) -> dict[str, Any]:
    cmd = server_command(target, args.threads, args.server_arg or [])
    proc, port = start_server(cmd, out / f"{target.label}.log")
    try:
        check = check_answers(target, port, texts)
        print(f"{target.label}: {check}", flush=True)
        levels = []
        for clients in args.clients:
            per = args.texts_per_request
            jobs = [texts[(i * per) % len(texts):(i * per) % len(texts) + per]
                    for i in range(args.requests)]
            warmup = jobs[:max(2 * clients, 8)]
            before = batch_rows(port) if target.kind == "serve" else None
            result = asyncio.run(run_level(port, clients, jobs, warmup, args.time_limit,
                                           proc.pid))
            level = asdict(result)
            if before is not None:
                after = batch_rows(port)
                calls = after[1] - before[1]
                level["mean_batch_rows"] = round((after[0] - before[0]) / calls, 2) if calls else None
            print(f"  {clients:3d} clients: {level['texts_per_s']:8.1f} texts/s  p50 "
                  f"{level['p50_ms']:7.1f}  p95 {level['p95_ms']:7.1f}  p99 "
                  f"{level['p99_ms']:7.1f} ms  errors {level['errors']}  "
                  f"{_cell(level['texts_per_cpu_s'])} texts/CPU-s", flush=True)
            levels.append(level)
    finally:
        stop_server(proc)
    return {"label": target.label, "kind": target.kind, "path": str(target.path),
            "server_command": shlex.join(cmd), "check": check, "levels": levels}


# ------------------------------------------------------------------------------- overload
#: Flags that lift the admission bounds (the ablation of --compare-unbounded).
UNBOUNDED = ["--max-queue-tokens", "100000000", "--max-concurrent-requests", "100000",
             "--max-queue-ms", "3600000"]


@dataclass
class Outcome:
    """One open-loop request: HTTP status (0: no answer), seconds to the answer or to giving
    up, and whether the client gave up (its timeout)."""

    status: int
    seconds: float
    timed_out: bool
    texts: int
    code: str = ""  # the error's code for a refusal (e.g. "queue_timeout"), else ""


async def one_request(port: int, texts: list[str], timeout: float) -> Outcome:
    """One request on its own connection; after ``timeout`` s the client closes it and
    leaves."""
    conn, start = Connection(port), time.perf_counter()
    try:
        status, body = await asyncio.wait_for(
            conn.post("/v1/embeddings", {"input": texts}), timeout)
        if status == 200 and len(json.loads(body)["data"]) != len(texts):
            status = 0
        code = str(json.loads(body)["error"].get("code") or "") if status in (429, 503) else ""
        return Outcome(status, time.perf_counter() - start, False, len(texts), code)
    except asyncio.TimeoutError:
        return Outcome(0, time.perf_counter() - start, True, len(texts))
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
        return Outcome(0, time.perf_counter() - start, False, len(texts))
    finally:
        conn.close()


async def open_loop(port: int, rate: float, seconds: float, timeout: float,
                    jobs: list[list[str]], seed: int) -> tuple[list[Outcome], list[float]]:
    """Poisson arrivals at ``rate`` requests/s for ``seconds`` s; waits for every answer (or
    its timeout). Also returns how late (s) the load generator sent each request: its own
    event loop's delay, which is not the server's."""
    rng, tasks, late = random.Random(seed), [], []
    start = time.perf_counter()
    due = start
    while True:
        due += rng.expovariate(rate)
        if due - start > seconds:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        late.append(max(0.0, time.perf_counter() - due))
        job = jobs[len(tasks) % len(jobs)]
        tasks.append(asyncio.ensure_future(one_request(port, job, timeout)))
    return list(await asyncio.gather(*tasks)), late


async def closed_loop(port: int, clients: int, seconds: float, jobs: list[list[str]]
                      ) -> tuple[int, int, float]:
    """``clients`` connections sending back to back for ``seconds``: (requests answered 200,
    texts in them, seconds)."""
    state = {"next": 0, "deadline": time.perf_counter() + seconds, "texts": 0, "errors": 0}
    conns = [Connection(port) for _ in range(clients)]
    latencies: list[float] = []
    cycle = (jobs * (1 + int(seconds * 1000) // max(len(jobs), 1)))
    start = time.perf_counter()
    try:
        await asyncio.gather(*(_client(c, cycle, state, latencies) for c in conns))
    finally:
        for c in conns:
            c.close()
    return len(latencies), state["texts"], time.perf_counter() - start


class MemorySampler:
    """The resident memory of a process and its children, sampled every 20 ms in a thread:
    the peak (bytes)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        children = child_pids(self.pid)  # model processes (--model-process) count too
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_bytes(p) for p in (self.pid, *children)))
            self._stop.wait(0.02)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (Linux), 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: The server's event-loop lag histogram (``ultrafastbert_event_loop_lag_seconds``).
LAG_BUCKET = "ultrafastbert_event_loop_lag_seconds_bucket"


def scrape(port: int) -> dict[str, float]:
    """The server's counters that the overload figures need (summed over labels; the
    event-loop lag histogram's buckets as ``LAG_BUCKET:LE``)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    wanted = ("ultrafastbert_batch_rows_sum", "ultrafastbert_skipped_inputs_total",
              "ultrafastbert_wasted_inputs_total", "ultrafastbert_rejected_requests_total",
              "ultrafastbert_cancelled_requests_total")
    totals = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
        elif name == LAG_BUCKET:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            totals[f"{LAG_BUCKET}:{le}"] = float(line.rsplit(" ", 1)[1])
    return totals


def histogram_quantile(delta: dict[str, float], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile ``q`` of the lag histogram's
    observations in ``delta`` (None without observations; inf: beyond the last bucket)."""
    buckets = sorted((float(k.split(":", 1)[1]), v) for k, v in delta.items()
                     if k.startswith(LAG_BUCKET + ":"))
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return round(le * 1000, 1)
    return None


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads so far, in groups: ``event_loop`` (the main
    thread: HTTP, admission, tokenizing, JSON), ``model`` (threads named ``ufb-batcher*`` and
    the threads they started, which inherit the name: torch's OpenMP workers), ``other``, and
    ``model_processes`` (its child processes: ``--model-process``)."""
    groups = {"event_loop": 0.0, "model": 0.0, "other": 0.0,
              "model_processes": sum(cpu_seconds(c) or 0.0 for c in child_pids(pid))}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return groups
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        group = "event_loop" if int(tid) == pid else \
            "model" if name.startswith("ufb-batcher") else "other"
        groups[group] += seconds
    return groups


def wait_idle(port: int, timeout: float = 120.0) -> None:
    """Until the server has nothing queued or in the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=30) as answer:
            health = json.loads(answer.read())
        if health["pending_inputs"] == 0 and health["requests_in_flight"] == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the server stayed busy after the level")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2) if values else None


def overload_level(port: int, pid: int, multiple: float, rate: float, args: argparse.Namespace,
                   jobs: list[list[str]]) -> dict[str, Any]:
    """One offered load: open-loop arrivals at ``rate`` requests/s for ``args.duration`` s."""
    wait_idle(port)
    before, cpu_before = scrape(port), thread_cpu(pid)
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    with MemorySampler(pid) as memory:
        outcomes, late = asyncio.run(open_loop(port, rate, args.duration, args.client_timeout,
                                               jobs, seed=int(multiple * 1000)))
        wait_idle(port)
    after, cpu_after = scrape(port), thread_cpu(pid)
    with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=30) as answer:
        bounds_after = json.loads(answer.read()).get("limits")
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    delta = {k.removeprefix("ultrafastbert_"): after[k] - before.get(k, 0.0) for k in after}
    lag = {k: v for k, v in delta.items() if k.startswith("event_loop_lag_seconds_bucket")}
    lag = {k.replace("event_loop_lag_seconds_bucket", LAG_BUCKET): v for k, v in lag.items()}
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status in (429, 503)]
    good_texts = sum(o.texts for o in ok)
    computed = int(delta["batch_rows_sum"])
    return {
        "multiple": multiple, "offered_requests_per_s": round(rate, 2),
        "requests": len(outcomes), "answered_200": len(ok), "refused_429_503": len(refused),
        "client_timeouts": sum(o.timed_out for o in outcomes),
        "other_failures": len(outcomes) - len(ok) - len(refused) - sum(o.timed_out
                                                                        for o in outcomes),
        "goodput_texts_per_s": round(good_texts / args.duration, 1),
        "accepted_p50_ms": _pct([o.seconds for o in ok], 50),
        "accepted_p99_ms": _pct([o.seconds for o in ok], 99),
        "refusal_p50_ms": _pct([o.seconds for o in refused], 50),
        "refusal_p99_ms": _pct([o.seconds for o in refused], 99),
        # refused at the gate (queue full), apart from requests that waited out their deadline
        "admission_refusals": len(gate := [o for o in refused if o.code != "queue_timeout"]),
        "admission_refusal_p99_ms": _pct([o.seconds for o in gate], 99),
        "texts_computed": computed,
        "texts_computed_not_delivered": computed - good_texts,
        "server_wasted_inputs": int(delta["wasted_inputs_total"]),
        "server_skipped_inputs": int(delta["skipped_inputs_total"]),
        "server_rejected_requests": int(delta["rejected_requests_total"]),
        "server_cancelled_requests": int(delta["cancelled_requests_total"]),
        "peak_rss_mib": round(memory.peak / 2**20, 1),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        # where the time went: the server's event loop (its lag: a timer due every 10 ms ran
        # this late, p99 as the upper bound of its histogram bucket), the load generator's own
        # delay in sending, and CPU seconds of the server's threads and of the load generator
        "server_loop_lag_p50_ms": histogram_quantile(lag, 0.5),
        "server_loop_lag_p99_ms": histogram_quantile(lag, 0.99),
        "client_send_late_p99_ms": _pct(late, 99),
        "server_cpu_s": {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_after},
        "client_cpu_s": round(client_after.ru_utime + client_after.ru_stime
                              - client_before.ru_utime - client_before.ru_stime, 2),
        "bounds_after": bounds_after,  # the queue bound follows the served rate (/health)
    }


def overload_run(target: Target, args: argparse.Namespace, jobs: list[list[str]], out: Path,
                 extra: list[str], label: str, rate: float | None) -> dict[str, Any]:
    """Start the server with ``extra`` flags, measure (or take) its capacity, run the levels."""
    cmd = server_command(target, args.threads, [*(args.server_arg or []), *extra])
    proc, port = start_server(cmd, out / f"{label}.log", cpus=args.server_cpus)
    try:
        check = check_answers(target, port, [t for job in jobs[:2] for t in job])
        print(f"{label}: {check}", flush=True)
        if args.client_cpus is not None:  # after the check: its reference model runs on
            os.sched_setaffinity(0, args.client_cpus)  # every CPU, as the server's does
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=30) as answer:
            limits = json.loads(answer.read()).get("limits")
        print(f"  bounds: {limits}", flush=True)
        capacity = None
        if rate is None:
            asyncio.run(closed_loop(port, args.capacity_clients, 2.0, jobs))  # warm-up
            capacity = measure_capacity(port, args, jobs)
            rate = capacity["requests_per_s"]
            print(f"  capacity: {rate:.1f} requests/s, {capacity['texts_per_s']:.1f} texts/s",
                  flush=True)
        levels = []
        for multiple in args.multiples:
            level = overload_level(port, proc.pid, multiple, multiple * rate, args, jobs)
            print(f"  {multiple:g}x: goodput {level['goodput_texts_per_s']:.1f} texts/s, "
                  f"200 {level['answered_200']}, refused {level['refused_429_503']}, timeouts "
                  f"{level['client_timeouts']}, p99 {level['accepted_p99_ms']} ms, refusal p99 "
                  f"{level['refusal_p99_ms']} ms (at the gate {level['admission_refusal_p99_ms']} ms), "
                  f"computed not delivered "
                  f"{level['texts_computed_not_delivered']}, peak {level['peak_rss_mib']} MiB",
                  flush=True)
            levels.append(level)
        if capacity is not None:
            # The same measurement after the levels: a 10-s sample of the machine, so the
            # ratios to it are only as steady as the machine was (docs/serving.md).
            after = measure_capacity(port, args, jobs)
            capacity["texts_per_s_after_levels"] = after["texts_per_s"]
            capacity["drift"] = round(after["texts_per_s"] / capacity["texts_per_s"] - 1, 3)
            print(f"  capacity after the levels: {after['texts_per_s']:.1f} texts/s "
                  f"({100 * capacity['drift']:+.0f}%)", flush=True)
    finally:
        stop_server(proc)
    return {"label": label, "server_command": shlex.join(cmd), "check": check,
            "bounds": limits, "capacity": capacity, "base_requests_per_s": round(rate, 2), "levels": levels}


def measure_capacity(port: int, args: argparse.Namespace, jobs: list[list[str]]
                     ) -> dict[str, Any]:
    """Closed loop: ``--capacity-clients`` clients back to back for ``--capacity-seconds``."""
    wait_idle(port)
    answered, texts, seconds = asyncio.run(
        closed_loop(port, args.capacity_clients, args.capacity_seconds, jobs))
    return {"requests_per_s": round(answered / seconds, 2),
            "texts_per_s": round(texts / seconds, 1), "clients": args.capacity_clients,
            "seconds": round(seconds, 2)}


def verdicts(run: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against one run's levels (1x is the reference)."""
    by = {lv["multiple"]: lv for lv in run["levels"]}
    base = by.get(1) or by.get(1.0)
    if base is None:
        return {}
    out: dict[str, Any] = {}
    for m, lv in by.items():
        if m < 4:
            continue
        p99 = (lv["accepted_p99_ms"] or float("inf")) / (base["accepted_p99_ms"] or float("nan"))
        out[f"{m:g}x"] = {
            "goodput_vs_1x": round(lv["goodput_texts_per_s"] / base["goodput_texts_per_s"], 3)
            if base["goodput_texts_per_s"] else None,
            "accepted_p99_vs_1x": round(p99, 2),
            "texts_computed_not_delivered": lv["texts_computed_not_delivered"],
            "peak_rss_vs_1x": round(lv["peak_rss_mib"] / base["peak_rss_mib"], 3)
            if base["peak_rss_mib"] else None,
            "refusal_p99_ms": lv["refusal_p99_ms"],
        }
    return out


def overload_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# Serving under overload ({env['timestamp']})", "",
             f"{_server_conditions(env)}; load average "
             f"{env['loadavg_1m_at_start']} at start, {env.get('loadavg_1m_at_end')} at end. "
             f"{env['note']}", "", f"Command: `{results['command']}`", "",
             f"{results['texts_per_request']} texts per request, Poisson arrivals, each request "
             f"on its own connection, client timeout {results['client_timeout_s']} s, "
             f"{results['duration_s']} s per level. Load generator on CPUs "
             f"{env.get('client_cpus')} at nice {env.get('client_nice', 0)}, server on CPUs "
             f"{env.get('server_cpus') or 'all'}.", ""]
    for run in results["runs"]:
        cap = run["capacity"]
        lines += [f"## {run['label']}", "", f"Server: `{run['server_command']}`; bounds "
                  f"(`/health`): {json.dumps(run.get('bounds'))}", "",
                  f"1x = {run['base_requests_per_s']} requests/s" + (
                      f" (capacity measured: {cap['texts_per_s']} texts/s with "
                      f"{cap['clients']} closed-loop clients; again after the levels: "
                      f"{cap.get('texts_per_s_after_levels')} texts/s)" if cap else
                      " (the capacity measured on the bounded server)"), "",
                  "| load | offered req/s | goodput texts/s | 200 | 429/503 | client timeouts | "
                  "p50 ms | p99 ms | refusal p99 ms | gate refusal p99 ms | computed, not "
                  "delivered | peak RSS MiB | server loop lag p99 ms | client late p99 ms | "
                  "CPU s: loop / model / other / client |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lv in run["levels"]:
            cpu = lv.get("server_cpu_s") or {}
            lines.append(
                f"| {lv['multiple']:g}x | {lv['offered_requests_per_s']} | "
                f"{lv['goodput_texts_per_s']} | {lv['answered_200']} | {lv['refused_429_503']} | "
                f"{lv['client_timeouts']} | {_cell(lv['accepted_p50_ms'])} | "
                f"{_cell(lv['accepted_p99_ms'])} | {_cell(lv['refusal_p99_ms'])} | "
                f"{_cell(lv.get('admission_refusal_p99_ms'))} | "
                f"{lv['texts_computed_not_delivered']} | {lv['peak_rss_mib']} | "
                f"{_le(lv.get('server_loop_lag_p99_ms'))} | "
                f"{_cell(lv.get('client_send_late_p99_ms'))} | "
                f"{cpu.get('event_loop', '')} / {_model_cpu(cpu)} / {cpu.get('other', '')} "
                f"/ {lv.get('client_cpu_s', '')} |")
        lines += ["", "Against 1x: " + json.dumps(run.get("verdicts", {})), ""]
    return "\n".join(lines)


def overload_main(args: argparse.Namespace, targets: list[Target], command: str) -> int:
    if len(targets) != 1 or targets[0].kind != "serve":
        raise SystemExit("--overload measures one --serve LABEL=DIR")
    [target] = targets
    texts = load_texts(args.texts, 4096)
    per = args.texts_per_request
    jobs = [texts[(i * per) % len(texts):(i * per) % len(texts) + per] for i in range(256)]
    jobs = [j for j in jobs if len(j) == per]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.client_nice:
        os.nice(args.client_nice)  # negative (a higher priority) needs root / CAP_SYS_NICE
    env = environment(args.threads, args.note)
    env["client_cpus"] = sorted(args.client_cpus or os.sched_getaffinity(0))
    env["client_nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    env["server_cpus"] = None if args.server_cpus is None else sorted(args.server_cpus)
    runs = [overload_run(target, args, jobs, args.out, [], target.label, None)]
    if args.compare_unbounded:
        runs.append(overload_run(target, args, jobs, args.out, UNBOUNDED,
                                 f"{target.label}-unbounded", runs[0]["base_requests_per_s"]))
    for run in runs:
        run["verdicts"] = verdicts(run)
    env["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    results = {"command": command, "environment": env, "mode": "overload",
               "texts_per_request": per, "duration_s": args.duration,
               "client_timeout_s": args.client_timeout, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(overload_markdown(results))
    print(f"wrote {args.out / 'results.json'} and results.md")
    return 0


def _cpus(text: str) -> set[int]:
    """``0,1`` or ``0-3`` -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="append", metavar="LABEL=DIR")
    p.add_argument("--plain", action="append", metavar="LABEL=DIR")
    p.add_argument("--st", action="append", metavar="LABEL=DIR")
    p.add_argument("--server-arg", action="append", metavar="ARG",
                   help="passed to every `ultrafastbert serve` (repeat)")
    p.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")],
                   default=[1, 8, 64], help="concurrency levels (default 1,8,64)")
    p.add_argument("--requests", type=int, default=1000, help="requests per level (1000)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level (60)")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--texts", type=Path, default=None,
                   help="one text per line (TSV: first column); default: demo corpus sentences")
    p.add_argument("--threads", type=int, default=2, help="server torch threads (2)")
    p.add_argument("--make-stand-ins", type=Path, default=None, metavar="DIR",
                   help="first write random-init stand-in models into DIR (tiny-fff, "
                        "tiny-dense, minilm-size-dense, minilm-size-fff-8x7)")
    p.add_argument("--note", default="", help="recorded with the figures (e.g. 'under load')")
    p.add_argument("--out", type=Path, default=Path("results/serve_load"))
    o = p.add_argument_group("overload mode")
    o.add_argument("--overload", action="store_true",
                   help="offered load at multiples of capacity, with client timeouts")
    o.add_argument("--multiples", type=lambda s: [float(m) for m in s.split(",")],
                   default=[1.0, 2.0, 4.0, 8.0], help="of capacity (default 1,2,4,8)")
    o.add_argument("--duration", type=float, default=15.0, help="seconds per level (15)")
    o.add_argument("--client-timeout", type=float, default=2.0,
                   help="a client gives up (closes its connection) after this (2 s)")
    o.add_argument("--capacity-clients", type=int, default=8,
                   help="closed-loop clients that measure capacity (8)")
    o.add_argument("--capacity-seconds", type=float, default=10.0)
    o.add_argument("--compare-unbounded", action="store_true",
                   help="run the levels again with the admission bounds lifted (ablation)")
    o.add_argument("--client-cpus", type=_cpus, default=None, metavar="LIST",
                   help="run the load generator on these CPUs only (e.g. 1; like taskset -c)")
    o.add_argument("--server-cpus", type=_cpus, default=None, metavar="LIST",
                   help="run the server on these CPUs only (e.g. 0,1)")
    o.add_argument("--client-nice", type=int, default=0, metavar="N",
                   help="add N to the load generator's nice value (negative: it runs before "
                        "the server when cores are short, so its own delays stay out of the "
                        "latencies; needs root)")
    args = p.parse_args(argv)
    if args.make_stand_ins:
        make_stand_ins(args.make_stand_ins)
    targets = parse_targets(args)
    if args.overload:
        return overload_main(args, targets, shlex.join(
            [Path(sys.argv[0]).name if argv is None else "serve_load.py",
             *(sys.argv[1:] if argv is None else argv)]))
    args.out.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.texts, max(args.requests * args.texts_per_request, 64))
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.argv[0]).name if argv is None else "serve_load.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment(args.threads, args.note),
        "requests_per_level": args.requests, "time_limit_s": args.time_limit,
        "texts_per_request": args.texts_per_request,
        "targets": [measure(t, args, texts, args.out) for t in targets],
    }
    results["environment"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(f"wrote {args.out / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
