"""Dynamic batching: texts of concurrent requests share one model call, each answered alone.

Requests arrive on the event loop as :class:`Job` s (one per text, already tokenized). A
worker thread (or several: ``workers``) runs the model: it takes the oldest job, waits up to
``max_wait_s`` from that job's arrival for more (or until ``max_batch_tokens`` tokens are
queued), then plans batches (:func:`plan_batches`: jobs of one kind together, sorted by length
and cut where padding would cost more than another model call, each batch's padded size within
the budget) and runs them. When the model was busy, everything that queued meanwhile is
batched at once, without waiting. A batch that raises is run again one job at a time, so one
bad input fails only its own request.

The jobs of one request share a :class:`Ticket`: its queue deadline and whether it was
cancelled (client gone, deadline passed). Work of a cancelled ticket is never computed: the
worker checks every job when it collects it, when it plans batches and again before each
batch, and answers the job with :class:`JobCancelled` instead.

Workers never touch the event loop except through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ResourceError
from .osthread import lower_priority, set_native_name

logger = logging.getLogger(__name__)

_STOP = object()


class JobCancelled(Exception):
    """A job that was not computed: its request's client left or its queue deadline passed
    (``reason``: ``disconnected`` or ``expired``)."""

    def __init__(self, reason: str):
        super().__init__(f"not computed: {reason}")
        self.reason = reason


class Ticket:
    """The jobs of one request: their queue ``deadline`` (``time.perf_counter`` seconds, None
    for none), the tokens still queued, whether one has started and why it was cancelled.

    Thread-safe: the event loop cancels, the workers start. Tokens leave the queue exactly once
    (a job starts, or the ticket is cancelled); ``release`` gets each such count.
    """

    def __init__(self, deadline: float | None, tokens: int,
                 release: Callable[[int], None] | None = None):
        self.deadline, self.queued_tokens, self._release = deadline, tokens, release
        self.started = False
        self.reason: str | None = None
        self.started_at: float | None = None
        self._lock = threading.Lock()

    def start(self, tokens: int, now: float) -> bool:
        """A job of ``tokens`` tokens is about to be computed: False (and nothing changes but
        the expiry) when the ticket is cancelled or its deadline passed before any job began."""
        with self._lock:
            if self.reason is None and not self.started and self.late(now):
                expired = self._cancel("expired")
            elif self.reason is None:
                expired = None
                if not self.started:
                    self.started, self.started_at = True, now
                self.queued_tokens -= tokens
            else:
                return False
        self._free(tokens if expired is None else expired)
        return expired is None

    def cancel(self, reason: str) -> bool:
        """Cancel: ``disconnected`` always; ``expired`` only when no job has started (a started
        request runs to its end). True when this call cancelled it."""
        with self._lock:
            if self.reason is not None or (reason == "expired" and self.started):
                return False
            freed = self._cancel(reason)
        self._free(freed)
        return True

    def late(self, now: float) -> bool:
        """True when the deadline has passed at ``now``."""
        return self.deadline is not None and now > self.deadline

    def _cancel(self, reason: str) -> int:
        self.reason, freed, self.queued_tokens = reason, self.queued_tokens, 0
        return freed

    def _free(self, tokens: int) -> None:
        if self._release is not None and tokens:
            self._release(tokens)


@dataclass
class Job:
    """One text waiting for the model: its ``key`` (jobs with equal keys may share a batch:
    the task and its options), token ``ids`` and a ``payload`` the runner may need."""

    key: Hashable
    ids: Sequence[int]
    payload: Any = None
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    arrived: float = field(default_factory=time.perf_counter)
    ticket: Ticket | None = None

    @property
    def cancelled(self) -> bool:
        """True when the job's request was cancelled (nothing is computed for it)."""
        return self.ticket is not None and self.ticket.reason is not None


@dataclass(frozen=True)
class BatchStats:
    """What one model call did, for metrics: ``jobs`` rows, ``padded_tokens`` = rows x the
    longest row, ``real_tokens``, ``seconds`` in the model, ``waited`` = the oldest job's time
    in the queue, ``failed`` when it raised."""

    key: Hashable
    jobs: int
    padded_tokens: int
    real_tokens: int
    seconds: float
    waited: float
    failed: bool


#: Runs one batch: (key, jobs) -> one result per job, in order.
Runner = Callable[[Hashable, list[Job]], Sequence[Any]]


#: What one more model call costs, in padding tokens (measured on a 2-core CPU for a 6-layer,
#: d 384 encoder: about 4 ms per call against 0.17 ms per token; a model twice as wide halves it).
SPLIT_OVERHEAD_TOKENS = 32


def plan_batches(jobs: Sequence[Job], max_batch_tokens: int,
                 overhead_tokens: int = SPLIT_OVERHEAD_TOKENS) -> list[list[Job]]:
    """Split ``jobs`` into batches: one key per batch, rows sorted by length, each batch's
    padded size (rows x longest) at most ``max_batch_tokens`` (a longer single job runs alone).

    Padding is work thrown away, so a job starts a new batch when the padding it would add
    to the rows already in the batch (rows x its extra length) exceeds ``overhead_tokens``,
    what a separate model call costs. Keys keep the order of their first job.
    """
    groups: dict[Hashable, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.key, []).append(job)
    batches: list[list[Job]] = []
    for group in groups.values():
        current: list[Job] = []
        for job in sorted(group, key=lambda j: len(j.ids)):
            length, longest = len(job.ids), len(current[-1].ids) if current else 0
            if current and ((len(current) + 1) * length > max_batch_tokens
                            or len(current) * (length - longest) > overhead_tokens):
                batches.append(current)
                current = []
            current.append(job)
        batches.append(current)
    return batches


class Batcher:
    """Groups concurrent jobs into batches for ``runner`` on ``workers`` threads (each takes
    its own batches from one queue; more than one lets single-threaded model calls use several
    cores at once).

    ``observer`` (optional) gets a :class:`BatchStats` after every model call;
    ``on_cancel`` (optional) gets (reason, jobs) for every job not computed because its ticket
    was cancelled, and ``on_wasted`` (reason, jobs) for every job computed for a ticket
    cancelled meanwhile (the client left during the model call).
    """

    def __init__(self, runner: Runner, *, max_batch_tokens: int, max_wait_s: float,
                 observer: Callable[[BatchStats], None] | None = None, workers: int = 1,
                 nice: int = 0):
        self.runner, self.max_batch_tokens, self.max_wait_s = runner, max_batch_tokens, max_wait_s
        self.observer, self.workers = observer, workers
        self.nice = nice
        self.on_cancel: Callable[[str, int], None] | None = None
        self.on_wasted: Callable[[str, int], None] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._pending, self._lock = 0, threading.Lock()
        self._queued_tokens = 0
        self._started_tokens = 0

    # ----------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        """Start the worker threads."""
        self._threads = [threading.Thread(target=self._work, args=(i,),
                                          name=f"ultrafastbert-batcher-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def ticket(self, deadline: float | None, tokens: int) -> Ticket:
        """A ticket for one request of ``tokens`` tokens, counted in :attr:`queued_tokens`
        until its jobs start or it is cancelled."""
        with self._lock:
            self._queued_tokens += tokens
        return Ticket(deadline, tokens, self._release_tokens)

    def submit(self, key: Hashable, rows: Sequence[Sequence[int]],
               payloads: Sequence[Any] | None = None, ticket: Ticket | None = None
               ) -> list[asyncio.Future]:
        """Queue one job per row (call on the event loop); the futures get the results (or
        :class:`JobCancelled` when the ``ticket`` is cancelled before the job runs)."""
        if self._closed or not self._threads:
            raise ResourceError("the server is shutting down (or was never started): retry "
                                "on another instance")
        loop = asyncio.get_running_loop()
        payloads = [None] * len(rows) if payloads is None else payloads
        futures = [loop.create_future() for _ in rows]
        jobs = [Job(key, row, payload, future, loop, ticket=ticket)
                for row, payload, future in zip(rows, payloads, futures, strict=True)]
        with self._lock:
            self._pending += len(jobs)
        for job in jobs:
            self._queue.put(job)
        return futures

    @property
    def queued_tokens(self) -> int:
        """Tokens of ticketed jobs that have neither started nor been cancelled."""
        return self._queued_tokens

    @property
    def started_tokens(self) -> int:
        """Tokens of jobs that have started their model call so far (a counter)."""
        return self._started_tokens

    def _release_tokens(self, tokens: int) -> None:
        with self._lock:
            self._queued_tokens -= tokens

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet answered (queued or in the model)."""
        return self._pending

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, let the workers answer every queued job, then join them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)  # after every queued job: those are answered first
        deadline = None if timeout is None else time.perf_counter() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.perf_counter(), 0))
            if thread.is_alive():
                logger.warning("a batch worker did not finish within %s s", timeout)

    # --------------------------------------------------------------------------- worker side
    def _work(self, index: int = 0) -> None:
        set_native_name(f"ufb-batcher-{index}")  # its OpenMP threads inherit the name
        lower_priority(self.nice)
        while True:
            jobs, stop = self._collect()
            for batch in plan_batches(self._live(jobs), self.max_batch_tokens):
                batch = self._started(batch)  # checked again: earlier batches took time
                if batch:
                    self._run(batch)
            if stop:
                return

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs still wanted; the others are answered with :class:`JobCancelled`."""
        now = time.perf_counter()
        live = []
        for job in jobs:
            ticket = job.ticket
            if ticket is not None and not ticket.started and ticket.late(now):
                ticket.cancel("expired")
            if job.cancelled:
                self._drop(job)
            else:
                live.append(job)
        return live

    def _started(self, batch: list[Job]) -> list[Job]:
        """Start the jobs of ``batch`` whose ticket is live (takes them off the queued tokens);
        the others are dropped."""
        now, started = time.perf_counter(), []
        for job in batch:
            if job.ticket is None or job.ticket.start(len(job.ids), now):
                started.append(job)
            else:
                self._drop(job)
        with self._lock:
            self._started_tokens += sum(len(job.ids) for job in started)
        return started

    def _drop(self, job: Job) -> None:
        reason = job.ticket.reason if job.ticket is not None and job.ticket.reason else "?"
        if self.on_cancel is not None:
            _quietly(self.on_cancel, reason, 1)
        self._answer(job, error=JobCancelled(reason))

    def _collect(self) -> tuple[list[Job], bool]:
        """Block for one job, then gather more until the wait limit or the token budget."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        jobs, tokens = [first], len(first.ids)
        deadline = first.arrived + self.max_wait_s
        while tokens < self.max_batch_tokens:
            try:
                job = self._queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            if job.cancelled:
                self._drop(job)
                continue
            jobs.append(job)
            tokens += len(job.ids)
        return jobs, False

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        try:
            results = self.runner(batch[0].key, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"the runner returned {len(results)} results for "
                                   f"{len(batch)} jobs")
        except Exception as err:  # isolate the job that fails, answer the rest
            self._observe(batch, start, failed=True)
            if len(batch) == 1:
                self._answer(batch[0], error=err)
                return
            logger.info("a batch of %d failed (%s); running its jobs one by one", len(batch), err)
            for job in batch:
                self._run([job])
            return
        self._observe(batch, start, failed=False)
        for job in batch:
            if job.cancelled and self.on_wasted is not None:
                _quietly(self.on_wasted, str(job.ticket.reason if job.ticket else "?"), 1)
        self._answer_all(batch, results)

    def _answer(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._pending -= 1
        _settle(job, result, error)

    def _answer_all(self, jobs: list[Job], results: Sequence[Any]) -> None:
        """Hand a batch's results to their futures with one wake-up of each event loop
        (one per job would cost the loop a wake-up, and the interpreter lock a hand-over,
        per text)."""
        with self._lock:
            self._pending -= len(jobs)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for job, result in zip(jobs, results, strict=True):
            if job.future is not None and job.loop is not None:
                by_loop.setdefault(job.loop, []).append((job.future, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_results, pairs)
            except RuntimeError:  # the loop is closed: nobody waits any more
                logger.debug("event loop closed; dropping %d results", len(pairs))

    def _observe(self, batch: list[Job], start: float, failed: bool) -> None:
        if self.observer is None:
            return
        lengths = [len(job.ids) for job in batch]
        stats = BatchStats(batch[0].key, len(batch), len(batch) * max(lengths), sum(lengths),
                           time.perf_counter() - start,
                           start - min(job.arrived for job in batch), failed)
        _quietly(self.observer, stats)


def _quietly(callback: Callable[..., None], *args: Any) -> None:
    """Call a metrics callback; metrics must never break serving."""
    try:
        callback(*args)
    except Exception:
        logger.exception("a batcher callback failed")


def _set_results(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    """On the event loop: each future gets its result (unless its request was cancelled)."""
    for future, result in pairs:
        if not future.done():
            future.set_result(result)


def _settle(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a result (or error) to the job's future on its event loop."""
    future = job.future
    if future is None or job.loop is None:
        return

    def settle() -> None:
        if future.done():  # the request was cancelled (client gone)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody waits any more
        logger.debug("event loop closed; dropping a result")
