"""The model in child processes: the HTTP front and the model stop sharing one interpreter lock.

In one process the event loop (HTTP parsing, admission, JSON) and the batch worker (the
model's Python code between torch calls) take turns on the interpreter lock, so each slows
the other: a refusal waits for the worker's Python steps, a batch waits for the loop's.
With ``model_processes`` the worker threads stay (collecting, planning, cancelling, as before)
but each hands its batches to its own child process over a pipe and waits on it without the
lock; the child loads the model itself (``loader``, a picklable callable returning a
:class:`~ultrafastbert.infer.Predictor`), computes and sends the results back.

Costs: a second copy of the model in memory per child; a result crosses a pipe (pickled,
about 1.5 KB per embedding of width 384); a child that dies fails its batch (500) and the
ones after it, and is reported in the log.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import ResourceError

logger = logging.getLogger(__name__)

Loader = Callable[[], Any]


class ModelProcessGone(ResourceError):
    """The model process a batch was sent to has stopped (answered 503)."""


class Encoded(NamedTuple):
    """An embedding and its JSON text (what ``json.dumps(vector.tolist())`` writes), made
    where the model runs so that the server's event loop only joins bytes: the JSON of a
    16-text answer of width 384 takes about 3.5 ms, and a batch answers many at once."""

    vector: np.ndarray
    json: bytes


def run_batch(predictor: Any, key: Hashable, rows: Sequence[Sequence[int]],
              payloads: Sequence[Any], encode_json: bool = False) -> list[Any]:
    """One model call of one key (``(task, options...)``) on token-id ``rows``: one result
    per row (an embedding as a numpy array, or an :class:`Encoded` with ``encode_json``; a
    classification; a fill-mask result)."""
    ids, mask = predictor.pad(rows)
    task, *options = key if isinstance(key, tuple) else (key,)
    if task == "embed":
        vectors = list(predictor.embed_ids(ids, mask).numpy())
        if encode_json:
            return [Encoded(v, json.dumps(v.tolist(), separators=(",", ":"),
                                          allow_nan=False).encode()) for v in vectors]
        return vectors
    if task == "classify":
        return list(predictor.classify_ids(ids, mask))
    if task == "fill-mask":
        return list(predictor.fill_mask_ids(list(payloads), ids, mask, top_k=options[0]))
    raise ValueError(f"unknown task {task!r}")


class ModelProcesses:
    """``count`` child processes, each with its own copy of the model; :meth:`run` sends a
    batch to a free one and waits (without the interpreter lock) for its results."""

    def __init__(self, loader: Loader, count: int, threads: int | None = None,
                 nice: int = 0, start_timeout_s: float = 600.0):
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        self._free: queue.Queue = queue.Queue()
        self._children: list[tuple[Any, Any]] = []
        for i in range(count):
            ours, theirs = context.Pipe()
            child = context.Process(target=_child, args=(theirs, loader, threads, nice),
                                    name=f"ufb-model-{i}", daemon=True)
            child.start()
            theirs.close()
            self._children.append((child, ours))
        for child, conn in self._children:  # loading in parallel, then each says it is ready
            if not conn.poll(start_timeout_s):
                self.close()
                raise ResourceError(f"the model process {child.name} did not start within "
                                    f"{start_timeout_s:.0f} s")
            try:
                status, detail = conn.recv()
            except EOFError:
                status, detail = "error", f"it exited with status {child.exitcode}"
            if status != "ready":
                self.close()
                raise ResourceError(f"the model process {child.name} failed to load the "
                                    f"model: {detail}")
            self._free.put(conn)
        self.pids = [child.pid for child, _ in self._children]

    def run(self, key: Hashable, rows: Sequence[Sequence[int]],
            payloads: Sequence[Any]) -> list[Any]:
        """One batch in a free child: its results, or the exception it raised there."""
        conn = self._free.get()
        try:
            conn.send((key, [list(r) for r in rows], list(payloads)))
            status, value = conn.recv()
        except (EOFError, OSError) as err:
            raise ModelProcessGone(f"the model process stopped ({err or type(err).__name__})"
                                   "; restart the server") from err
        finally:
            self._free.put(conn)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Tell every child to stop, then wait for it (kill after 10 s)."""
        for _, conn in self._children:
            with contextlib.suppress(OSError):  # gone already
                conn.send(None)
        for child, conn in self._children:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
            conn.close()
        self._children = []


def _child(conn: Any, loader: Loader, threads: int | None, nice: int) -> None:
    """A model process: load, say ready, then run batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the
    try:                                          # server decides when its children stop
        import torch

        if nice > 0:
            os.nice(nice)
        if threads:
            torch.set_num_threads(threads)
        predictor = loader()
        for texts in (["warm up"], [" ".join(["word"] * 30)] * 16):  # first calls build caches
            run_batch(predictor, ("embed",), predictor.tokenize(texts), [None] * len(texts))
        gc.collect()
        gc.freeze()  # as the server does (service.freeze_heap): no long full collections
    except BaseException as err:  # the parent reports it
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message is None:
            return
        key, rows, payloads = message
        try:
            conn.send(("ok", run_batch(predictor, key, rows, payloads, encode_json=True)))
        except Exception as err:  # sent back: the batcher runs the jobs one by one
            conn.send(("error", _picklable(err)))


def _picklable(err: Exception) -> Exception:
    """``err`` itself when it crosses a pipe, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
