"""Admission control: what the server takes in while the model is busy.

Three bounds keep an overloaded server answering quickly instead of queueing without end
(see ``docs/serving.md``, "Overload"):

- ``max_concurrent_requests``: model requests in the server at once; checked when a request's
  headers arrive, before its body is read or tokenized, so the refusal costs next to nothing;
- ``max_queue_tokens``: tokens of admitted requests whose model call has not started; checked
  when the headers arrive (a full queue refuses at once) and again once the request is
  tokenized (a request bigger than the bound is taken only when nothing is queued, so it runs
  alone instead of never);
- ``max_queue_s``: how long a request may wait for its first model call (see
  :class:`~ultrafastbert.serve.batcher.Ticket`).

Beyond them the answer is 429 (503 while the server drains) with ``Retry-After``: the seconds
the queued tokens take at the model's measured speed. The bounds left unset are sized from the
model's tokens/s, measured when the server starts (:func:`size_limits`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import ServeConfig
from .errors import ServeError

logger = logging.getLogger(__name__)

#: A short request, in tokens, for sizing the request bound from the token bound.
SHORT_REQUEST_TOKENS = 16
#: The queue holds what the model computes in this share of the queue deadline, so a request
#: admitted at the bound starts within its deadline even when the model runs at half the speed
#: measured at start (a machine shared with other work).
QUEUE_SHARE_OF_DEADLINE = 0.5
#: /health says "overloaded" for this long after a refusal.
OVERLOAD_MEMORY_S = 1.0
#: The drain rate (tokens/s taken from a queue that stays full) averages over about this long.
DRAIN_TIME_CONSTANT_S = 2.0
#: ... and replaces the speed measured at start after the queue was busy this long in all.
DRAIN_TRUSTED_AFTER_S = 1.0
#: A queue bound sized from the drain rate stays above this share of the one sized at start
#: (a short queue makes small batches, which drain slower: the bound must not spiral down).
DRAIN_BOUND_FLOOR = 0.25


@dataclass(frozen=True)
class Limits:
    """The bounds in force, and the speed they were sized from (tokens/s, measured at start)."""

    max_queue_tokens: int
    max_concurrent_requests: int
    max_queue_s: float
    tokens_per_s: float
    sized: tuple[str, ...]  # the bounds that were sized from the speed, not given


def size_limits(config: ServeConfig, tokens_per_s: float, max_length: int) -> Limits:
    """Fill the bounds ``config`` leaves unset: the queue holds the tokens the model computes in
    half the queue deadline (at least one text of ``max_length``); the request bound is that
    many tokens in 16-token requests, within 16 and 1024."""
    sized = []
    tokens = config.max_queue_tokens
    if tokens is None:
        budget = tokens_per_s * config.max_queue_ms / 1000.0 * QUEUE_SHARE_OF_DEADLINE
        tokens, sized = max(max_length, int(budget)), ["max_queue_tokens"]
    requests = config.max_concurrent_requests
    if requests is None:
        requests = min(1024, max(16, tokens // SHORT_REQUEST_TOKENS))
        sized.append("max_concurrent_requests")
    return Limits(tokens, requests, config.max_queue_ms / 1000.0, tokens_per_s, tuple(sized))


class DrainRate:
    """The tokens/s the workers take from the queue while it never empties: what the server
    really serves, on the wall clock, with the HTTP work and whatever else runs on the machine
    (the speed measured at start is the model's alone, in a quiet moment).

    Sampled often (:meth:`sample`, from the event loop): between two samples that both found
    tokens queued, the tokens that started their model call, over the time between; an
    exponential average over about :data:`DRAIN_TIME_CONSTANT_S` of such busy time.
    """

    def __init__(self, time_constant_s: float = DRAIN_TIME_CONSTANT_S):
        self.time_constant_s = time_constant_s
        self.tokens_per_s: float | None = None
        self.busy_s = 0.0
        self._last: tuple[float, int, bool] | None = None

    def sample(self, now: float, started_tokens: int, queued: bool) -> None:
        """``started_tokens``: tokens that have started a model call so far (a counter);
        ``queued``: whether tokens wait for the model now."""
        last, self._last = self._last, (now, started_tokens, queued)
        if last is None or not (queued and last[2]) or now <= last[0]:
            return
        seconds, tokens = now - last[0], started_tokens - last[1]
        weight = 1.0 - math.exp(-seconds / self.time_constant_s)
        rate = tokens / seconds
        self.tokens_per_s = rate if self.tokens_per_s is None else \
            self.tokens_per_s + weight * (rate - self.tokens_per_s)
        self.busy_s += seconds

    @property
    def trusted(self) -> float | None:
        """The drain rate once the queue was busy long enough to measure it, else None."""
        return self.tokens_per_s if self.busy_s >= DRAIN_TRUSTED_AFTER_S else None


class Admission:
    """Counts model requests in the server and refuses the ones beyond the bounds.

    Used from the event loop only (``queued_tokens`` may be read from anywhere); ``observe``
    (from the workers) keeps a moving average of the model's tokens/s for ``Retry-After``.
    """

    def __init__(self, queued_tokens: Callable[[], int],
                 on_reject: Callable[[str], None] | None = None):
        self.limits: Limits | None = None
        self.queued_tokens, self.on_reject = queued_tokens, on_reject
        self.in_flight = 0
        self.draining = False
        self.tokens_per_s = 0.0
        self.drain = DrainRate()
        self._last_refusal = -math.inf

    def set_limits(self, limits: Limits) -> None:
        self.limits, self.tokens_per_s = limits, limits.tokens_per_s

    # ------------------------------------------------------------------------------- checks
    def enter(self) -> None:
        """A model request arrives (before its body is read): count it, or refuse it (503
        draining, 429 too many requests). Every successful call needs one :meth:`leave`."""
        limits = self._limits()
        if self.draining:
            self._refuse(503, "the server is shutting down: retry on another instance",
                         "shutting_down", "draining")
        if self.in_flight >= self.max_concurrent_requests:
            self._refuse(429, f"the server is busy: {self.in_flight} requests in the works, the "
                              f"limit is {self.max_concurrent_requests}; retry after the "
                              "Retry-After seconds", "too_many_requests", "concurrency")
        self._check_queue(0, limits)  # full already: no need to read and tokenize the body
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def check_tokens(self, tokens: int) -> None:
        """A tokenized request of ``tokens`` tokens wants to queue: refuse it (503 draining,
        429 queue full) or let it."""
        limits = self._limits()
        if self.draining:
            self._refuse(503, "the server is shutting down: retry on another instance",
                         "shutting_down", "draining")
        self._check_queue(tokens, limits)

    def _check_queue(self, tokens: int, limits: Limits) -> None:
        """429 when ``tokens`` more would take the queue over its bound (0: when it is full)."""
        queued, bound = self.queued_tokens(), self.max_queue_tokens
        if queued and queued + max(tokens, 1) > bound:
            size = f" and this request has {tokens}" if tokens else ""
            self._refuse(429, f"the server is busy: {queued} tokens wait for the model{size}; "
                              f"the limit is {bound}: retry after the "
                              "Retry-After seconds", "queue_full", "queue_tokens")

    @property
    def max_queue_tokens(self) -> int:
        """The queue bound in force. Given (``--max-queue-tokens``): that. Sized: at start from
        the model's measured speed; once the server has been busy a while, from the drain rate
        (:class:`DrainRate`, tokens/s actually served; at least :data:`DRAIN_BOUND_FLOOR` of
        the start's bound), so a queued request still starts within ``max_queue_s`` when the
        machine serves slower than the model measured alone, and the queue grows back when
        the start was measured in a busy moment."""
        limits = self._limits()
        rate = self.drain.trusted
        if "max_queue_tokens" not in limits.sized or rate is None:
            return limits.max_queue_tokens
        sized = int(rate * limits.max_queue_s * QUEUE_SHARE_OF_DEADLINE)
        return max(int(DRAIN_BOUND_FLOOR * limits.max_queue_tokens), sized)

    @property
    def max_concurrent_requests(self) -> int:
        """The request bound in force: given, or sized from the queue bound in force (that
        many tokens in 16-token requests, within 16 and 1024)."""
        limits = self._limits()
        if "max_concurrent_requests" not in limits.sized:
            return limits.max_concurrent_requests
        return min(1024, max(16, self.max_queue_tokens // SHORT_REQUEST_TOKENS))

    def expired(self) -> ServeError:
        """The error for a request whose queue deadline passed before its first model call."""
        limits = self._limits()
        self._last_refusal = time.monotonic()  # counted as cancelled, not as refused
        return ServeError(429, f"the request waited {limits.max_queue_s * 1000:.0f} ms for the "
                               "model (the server's --max-queue-ms) and was not computed: retry "
                               "after the Retry-After seconds", "queue_timeout",
                          headers={"Retry-After": str(self.retry_after())})

    # ------------------------------------------------------------------------------ figures
    def retry_after(self) -> int:
        """Whole seconds the queued tokens take at the served speed (the drain rate; before it
        is known, the model's recent speed; at least 1)."""
        rate = self.drain.trusted or self.tokens_per_s
        if rate <= 0:
            return 1
        return max(1, math.ceil(self.queued_tokens() / rate))

    def observe(self, tokens: int, seconds: float) -> None:
        """One model call's real tokens and time (moving average of the speed)."""
        if seconds > 0 and tokens > 0:
            rate = tokens / seconds
            self.tokens_per_s = rate if self.tokens_per_s <= 0 else \
                0.8 * self.tokens_per_s + 0.2 * rate

    @property
    def overloaded(self) -> bool:
        """At a bound now, or a request was refused in the last second."""
        return (self.in_flight >= self.max_concurrent_requests
                or self.queued_tokens() >= self.max_queue_tokens
                or time.monotonic() - self._last_refusal < OVERLOAD_MEMORY_S)

    # ---------------------------------------------------------------------------- helpers
    def _limits(self) -> Limits:
        if self.limits is None:
            raise ServeError(503, "the server is starting: retry in a moment", "starting",
                             headers={"Retry-After": "1"})
        return self.limits

    def _refuse(self, status: int, message: str, code: str, reason: str) -> None:
        self._note_refusal(reason)
        raise ServeError(status, message, code, headers={"Retry-After": str(self.retry_after())})

    def _note_refusal(self, reason: str) -> None:
        self._last_refusal = time.monotonic()
        if self.on_reject is not None:
            self.on_reject(reason)
