"""What the server does, apart from HTTP: checks a request, tokenizes it, batches it, runs it.

The model is reached only through :class:`~ultrafastbert.infer.Predictor` (``tasks``,
``tokenize``, ``pad``, ``embed_ids``, ``classify_ids``, ``fill_mask_ids``), so every model
directory ``Predictor`` loads can be served. Tokenizing happens on the event loop (one thread);
the model runs on the batcher's worker thread, or in model processes (:mod:`.modelproc`) that
the worker threads hand their batches to. Admission (:mod:`.admission`) bounds what waits
for the model; a request whose client leaves, or whose queue deadline passes, is cancelled and
its texts are not computed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import torch

from ..errors import ConfigError, InputError, ResourceError
from .admission import Admission, Limits, size_limits
from .batcher import Batcher, BatchStats, Job, JobCancelled, Ticket
from .config import ServeConfig
from .errors import ClientGone, ServeError
from .metrics import Metrics
from .modelproc import Loader, ModelProcesses, ModelProcessGone, run_batch

logger = logging.getLogger(__name__)

__all__ = ["ClientGone", "ServeError", "Service"]

#: Rows and words of the batch timed at start to size the queue bounds.
SPEED_ROWS, SPEED_WORDS = 16, 30


class Service:
    """One model behind the server: its limits, its batcher, its metrics."""

    def __init__(self, predictor: Any, config: ServeConfig, metrics: Metrics | None = None,
                 model_loader: Loader | None = None):
        config.check_model_length(predictor.max_length)
        if config.model_processes and model_loader is None:
            raise ConfigError("model_processes needs a model loader (a picklable callable "
                              "that returns the Predictor in the child process)")
        self.predictor, self.config, self.model_loader = predictor, config, model_loader
        self.processes: ModelProcesses | None = None
        self.batcher = Batcher(self._run_batch, max_batch_tokens=config.max_batch_tokens,
                               max_wait_s=config.max_wait_ms / 1000.0,
                               workers=config.workers,
                               nice=0 if config.model_processes else config.model_nice)
        self.metrics = metrics or Metrics(queue_depth=lambda: self.batcher.pending)
        self.admission = Admission(lambda: self.batcher.queued_tokens,
                                   on_reject=self.metrics.observe_rejection)
        self.metrics.watch(self.admission)
        self.batcher.observer = self._observe_batch
        self.batcher.on_cancel = self.metrics.observe_skipped
        self.batcher.on_wasted = self.metrics.observe_wasted
        self.tasks: tuple[str, ...] = tuple(predictor.tasks)
        self.max_length: int = predictor.max_length
        self.dimensions: int | None = None
        self.created = int(time.time())

    # --------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Run the model once (fails early on a broken model, learns its width), then start
        the batch worker."""
        # One request's texts are few: the tokenizer's thread pool would only spin on the
        # cores the model needs (measured: 0.4-2.5 CPU-s per 15-s level under overload). A
        # value the user set is kept.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        rows = self.predictor.tokenize(["warm up"])
        vectors = self.predictor.embed_ids(*self.predictor.pad(rows))
        self.dimensions = int(vectors.shape[-1])
        limits = size_limits(self.config, self._measure_speed(), self.max_length)
        self.admission.set_limits(limits)
        if self.config.model_processes and self.model_loader is not None:
            self.processes = ModelProcesses(self.model_loader, self.config.workers,
                                            torch.get_num_threads(), self.config.model_nice)
            logger.info("the model runs in %d child process(es): %s", len(self.processes.pids),
                        ", ".join(map(str, self.processes.pids)))
        freeze_heap()
        self.batcher.start()
        logger.info("serving %s: tasks %s, max length %d, embedding width %d",
                    self.config.model_name, ", ".join(self.tasks), self.max_length,
                    self.dimensions)
        logger.info("admission: at most %d queued tokens, %d requests, %.0f ms in the queue "
                    "(model speed at start %.0f tokens/s%s)", limits.max_queue_tokens,
                    limits.max_concurrent_requests, limits.max_queue_s * 1000,
                    limits.tokens_per_s,
                    f"; sized from it: {', '.join(limits.sized)}" if limits.sized else "")

    def _measure_speed(self) -> float:
        """The model's tokens/s on a batch of 16 texts of about 30 words (best of 3 calls;
        none when both queue bounds are given)."""
        if self.config.max_queue_tokens is not None and \
                self.config.max_concurrent_requests is not None:
            return 0.0
        rows = self.predictor.tokenize([" ".join(["word"] * SPEED_WORDS)] * SPEED_ROWS)
        ids, mask = self.predictor.pad(rows)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            self.predictor.embed_ids(ids, mask)
            best = min(best, time.perf_counter() - start)
        return sum(len(r) for r in rows) / max(best, 1e-6)

    @property
    def limits(self) -> Limits | None:
        """The admission bounds in force (None before :meth:`start`)."""
        return self.admission.limits

    def sample_drain(self) -> None:
        """Feed the admission's drain rate (call often, from the event loop)."""
        self.admission.drain.sample(time.perf_counter(), self.batcher.started_tokens,
                                    self.batcher.queued_tokens > 0)

    def drain(self) -> None:
        """Refuse new model requests (503) from now on; the admitted ones are still answered."""
        self.admission.draining = True

    def close(self) -> None:
        """Answer every queued text, then stop the worker."""
        self.drain()
        self.batcher.close(self.config.graceful_timeout_s)
        if self.processes is not None:
            self.processes.close()

    def _observe_batch(self, stats: BatchStats) -> None:
        self.metrics.observe_batch(stats)
        if not stats.failed:
            self.admission.observe(stats.real_tokens, stats.seconds)

    # ------------------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        """A request naming another model is refused (404), one naming none is served."""
        if name is not None and name != self.config.model_name:
            raise ServeError(404, f"model {name!r} is not served here; this server serves "
                                  f"{self.config.model_name!r} (see GET /v1/models)",
                             "model_not_found", "model")

    def require(self, task: str) -> None:
        """Refuse (404) a task the model has no head for."""
        if task not in self.tasks:
            kind = type(self.predictor.model).__name__
            raise ServeError(404, f"this model ({kind}) does not do {task}; it serves: "
                                  f"{', '.join(self.tasks)}", "task_not_supported")

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None
                 ) -> list[list[int]]:
        """Token ids per text within the limits: too many texts or tokens is 413; a text
        longer than the model takes is cut (``truncate``) or refused with 413."""
        if len(texts) > self.config.max_inputs:
            raise ServeError(413, f"{len(texts)} inputs in one request; the limit is "
                                  f"{self.config.max_inputs}: split the request",
                             "too_many_inputs", "input")
        if pairs is not None and len(pairs) != len(texts):
            raise ServeError(422, f"{len(texts)} inputs but {len(pairs)} pairs: give one pair "
                                  "per input", "pair_count", "pair")
        rows = self.predictor.tokenize(texts, pairs, truncate=False)
        rows = self._fit_length(rows, texts, pairs)
        total = sum(len(row) for row in rows)
        if total > self.config.max_request_tokens:
            raise ServeError(413, f"the request has {total} tokens; the limit is "
                                  f"{self.config.max_request_tokens}: split the request",
                             "too_many_tokens", "input")
        return rows

    def _fit_length(self, rows: list[list[int]], texts: Sequence[str],
                    pairs: Sequence[str] | None) -> list[list[int]]:
        long = [i for i, row in enumerate(rows) if len(row) > self.max_length]
        if not long:
            return rows
        if not self.config.truncate:
            i = long[0]
            raise ServeError(413, f"input {i} has {len(rows[i])} tokens; this model takes at "
                                  f"most {self.max_length}: shorten it (this server refuses "
                                  "long texts instead of cutting them)", "input_too_long", "input")
        cut = self.predictor.tokenize([texts[i] for i in long],
                                      None if pairs is None else [pairs[i] for i in long])
        for i, row in zip(long, cut, strict=True):
            rows[i] = row
        self.metrics.truncated.inc(len(long))
        return rows

    # --------------------------------------------------------------------------- running
    async def run(self, key: Hashable, rows: Sequence[Sequence[int]],
                  payloads: Sequence[Any] | None = None,
                  receive: Callable[[], Awaitable[Any]] | None = None) -> list[Any]:
        """Admit the rows (jobs of one request), queue them, wait for all; a failed job fails
        the request (422 for bad input, 503 when shutting down, anything else is a server
        error). Refused beyond the queue bounds (429); given the request's ASGI ``receive``,
        a client that disconnects cancels its jobs (:class:`ClientGone`)."""
        tokens = sum(len(row) for row in rows)
        self.admission.check_tokens(tokens)
        limits = self.admission.limits
        deadline = time.perf_counter() + limits.max_queue_s if limits is not None else None
        admitted = time.perf_counter()
        ticket = self.batcher.ticket(deadline, tokens)
        try:
            futures = self.batcher.submit(key, rows, payloads, ticket)
        except ResourceError as err:
            ticket.cancel("closed")
            raise ServeError(503, str(err), "shutting_down") from err
        results = await self._wait(futures, ticket, receive)
        for result in results:
            if isinstance(result, JobCancelled):
                raise self._cancelled(result.reason) from result
            if isinstance(result, InputError):
                raise ServeError(422, str(result), "invalid_input", "input") from result
            if isinstance(result, ModelProcessGone):
                raise ServeError(503, str(result), "model_unavailable") from result
            if isinstance(result, BaseException):
                raise result
        if ticket.started_at is not None:
            self.metrics.request_queue.observe(ticket.started_at - admitted)
        return list(results)

    async def _wait(self, futures: list[asyncio.Future], ticket: Ticket,
                    receive: Callable[[], Awaitable[Any]] | None) -> list[Any]:
        """The jobs' results, unless the client leaves (cancel, :class:`ClientGone`) or the
        deadline passes before the first model call (cancel, 429)."""
        gathered = asyncio.gather(*futures, return_exceptions=True)
        watcher = asyncio.ensure_future(_disconnect(receive)) if receive is not None else None
        waiting: set[asyncio.Future] = {gathered} if watcher is None else {gathered, watcher}
        timeout = None if ticket.deadline is None else ticket.deadline - time.perf_counter()
        try:
            while True:
                done, _ = await asyncio.wait(waiting, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if gathered in done:
                    return list(gathered.result())
                if watcher is not None and watcher in done:
                    ticket.cancel("disconnected")
                    raise self._cancelled("disconnected")
                if ticket.cancel("expired"):
                    raise self._cancelled("expired")
                timeout = None  # started in time: wait for the end
        finally:
            if watcher is not None:
                watcher.cancel()
            if not gathered.done():
                gathered.cancel()
                gathered.add_done_callback(_retrieve)  # its CancelledError is expected

    def _cancelled(self, reason: str) -> Exception:
        """The error for a request cancelled for ``reason`` (counted once, here)."""
        self.metrics.observe_cancelled(reason)
        if reason == "disconnected":
            return ClientGone()
        if reason == "expired":
            return self.admission.expired()
        return ServeError(503, "the server is shutting down: retry on another instance",
                          "shutting_down")

    def _run_batch(self, key: Any, jobs: list[Job]) -> Sequence[Any]:
        """One model call for jobs of one key (on the worker thread; in a model process when
        there are some)."""
        rows, payloads = [job.ids for job in jobs], [job.payload for job in jobs]
        if self.processes is not None:
            return self.processes.run(key, rows, payloads)
        return run_batch(self.predictor, key, rows, payloads)


def freeze_heap() -> int:
    """Collect garbage once, then keep every object alive now out of later collections
    (``gc.freeze``): the model, torch and the libraries are some 400,000 objects that a full
    collection walks while every Python thread waits (measured: 370-400 ms on a busy 2-core
    machine with the converted MiniLM loaded; 0 ms after the freeze). Returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client disconnects (the ASGI ``http.disconnect`` message; the body was
    read already, so nothing else arrives)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


def _retrieve(future: asyncio.Future) -> None:
    """Read a cancelled gather's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
