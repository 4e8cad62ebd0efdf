"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .batcher import BatchStats

if TYPE_CHECKING:
    from .admission import Admission

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LAG = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: The event-loop probe's period (:func:`~ultrafastbert.serve.app.watch_loop_lag`).
LOOP_PROBE_S = 0.01


class Metrics:
    """Request, batch and queue metrics, rendered in the Prometheus text format."""

    def __init__(self, queue_depth=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ultrafastbert_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("ultrafastbert_request_seconds",
                                         "time from request to response", ["endpoint"],
                                         buckets=_SECONDS, registry=r)
        self.inputs = Counter("ultrafastbert_inputs", "texts in successful requests",
                              ["endpoint"], registry=r)
        self.tokens = Counter("ultrafastbert_tokens", "tokens in successful requests",
                              ["endpoint"], registry=r)
        self.truncated = Counter("ultrafastbert_truncated_inputs",
                                 "texts cut to the model's maximum length", registry=r)
        self.batches = Counter("ultrafastbert_batches", "model calls", ["task", "outcome"],
                               registry=r)
        self.batch_rows = Histogram("ultrafastbert_batch_rows", "texts per model call",
                                    ["task"], buckets=_ROWS, registry=r)
        self.batch_tokens = Histogram("ultrafastbert_batch_padded_tokens",
                                      "rows x longest row per model call", ["task"],
                                      buckets=_TOKENS, registry=r)
        self.batch_real_tokens = Counter("ultrafastbert_batch_real_tokens",
                                         "tokens that were not padding", ["task"], registry=r)
        self.batch_seconds = Histogram("ultrafastbert_batch_seconds", "time in the model",
                                       ["task"], buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("ultrafastbert_queue_wait_seconds",
                                    "oldest text's wait before its model call", ["task"],
                                    buckets=_SECONDS, registry=r)
        self.pending = Gauge("ultrafastbert_pending_inputs", "texts queued or in the model",
                            registry=r)
        if queue_depth is not None:
            self.pending.set_function(queue_depth)
        self._overload_metrics()

    def _overload_metrics(self) -> None:
        r = self.registry
        self.rejected = Counter("ultrafastbert_rejected_requests",
                                "requests refused by admission control (429, 503 draining)",
                                ["reason"], registry=r)
        self.cancelled = Counter("ultrafastbert_cancelled_requests",
                                 "admitted requests cancelled: client gone or queue deadline "
                                 "passed", ["reason"], registry=r)
        self.skipped_inputs = Counter("ultrafastbert_skipped_inputs",
                                      "texts not computed because their request was cancelled",
                                      ["reason"], registry=r)
        self.wasted_inputs = Counter("ultrafastbert_wasted_inputs",
                                     "texts computed for a request cancelled during their "
                                     "model call", ["reason"], registry=r)
        self.request_queue = Histogram("ultrafastbert_request_queue_seconds",
                                       "a request's wait from admission to its first model "
                                       "call", buckets=_SECONDS, registry=r)
        self.in_flight = Gauge("ultrafastbert_requests_in_flight",
                               "model requests in the server", registry=r)
        self.queued_tokens = Gauge("ultrafastbert_queued_tokens",
                                   "tokens of admitted requests not yet in the model",
                                   registry=r)
        self.limit = Gauge("ultrafastbert_admission_limit", "the admission bounds in force",
                           ["bound"], registry=r)
        self.loop_lag = Histogram("ultrafastbert_event_loop_lag_seconds",
                                  "how late the event loop ran a timer due every "
                                  f"{LOOP_PROBE_S * 1000:g} ms (a refusal waits about as long)",
                                  buckets=_LAG, registry=r)

    def watch(self, admission: Admission) -> None:
        """Read the in-flight requests, queued tokens and bounds from ``admission``."""
        self.in_flight.set_function(lambda: admission.in_flight)
        self.queued_tokens.set_function(admission.queued_tokens)
        self.limit.labels("max_queue_s").set_function(_reader(admission, "max_queue_s"))
        for bound in ("max_queue_tokens", "max_concurrent_requests"):  # in force now
            self.limit.labels(bound).set_function(_reader(admission, bound, now=True))

    def observe_rejection(self, reason: str) -> None:
        """A request refused (``concurrency``, ``queue_tokens``, ``draining``)."""
        self.rejected.labels(reason).inc()

    def observe_cancelled(self, reason: str) -> None:
        """An admitted request cancelled (``disconnected``, ``expired``)."""
        self.cancelled.labels(reason).inc()

    def observe_skipped(self, reason: str, inputs: int) -> None:
        """Texts the workers dropped without computing them."""
        self.skipped_inputs.labels(reason).inc(inputs)

    def observe_wasted(self, reason: str, inputs: int) -> None:
        """Texts computed for a request that was cancelled meanwhile."""
        self.wasted_inputs.labels(reason).inc(inputs)

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one model call (the batcher's observer)."""
        task = str(stats.key[0] if isinstance(stats.key, tuple) else stats.key)
        self.batches.labels(task, "error" if stats.failed else "ok").inc()
        if stats.failed:
            return
        self.batch_rows.labels(task).observe(stats.jobs)
        self.batch_tokens.labels(task).observe(stats.padded_tokens)
        self.batch_real_tokens.labels(task).inc(stats.real_tokens)
        self.batch_seconds.labels(task).observe(stats.seconds)
        self.queue_wait.labels(task).observe(stats.waited)

    def observe_request(self, endpoint: str, status: int, seconds: float, inputs: int,
                        tokens: int) -> None:
        """Record one answered HTTP request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)
        if status < 400 and inputs:
            self.inputs.labels(endpoint).inc(inputs)
            self.tokens.labels(endpoint).inc(tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _reader(admission: Admission, bound: str, now: bool = False) -> Callable[[], float]:
    """Reads one bound of ``admission`` (``now``: as in force, from the admission itself;
    else as set at start; 0 before the server starts)."""
    if now:
        return lambda: float(getattr(admission, bound) if admission.limits else 0)
    return lambda: float(getattr(admission.limits, bound, 0) or 0)
