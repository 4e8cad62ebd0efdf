"""What the server does, apart from HTTP: checks a request, tokenizes it, batches it, runs it.

The model is reached only through :class:`~ultrafastbert.infer.Predictor` (``tasks``,
``tokenize``, ``pad``, ``embed_ids``, ``classify_ids``, ``fill_mask_ids``), so every model
directory ``Predictor`` loads can be served. Tokenizing happens on the event loop (one thread);
the model runs on the batcher's worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..errors import InputError, ResourceError
from .batcher import Batcher, Job
from .config import ServeConfig
from .metrics import Metrics

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """A request the server refuses: HTTP ``status``, a message that says what to do, a short
    machine-readable ``code`` and the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Service:
    """One model behind the server: its limits, its batcher, its metrics."""

    def __init__(self, predictor: Any, config: ServeConfig, metrics: Metrics | None = None):
        config.check_model_length(predictor.max_length)
        self.predictor, self.config = predictor, config
        self.batcher = Batcher(self._run_batch, max_batch_tokens=config.max_batch_tokens,
                               max_wait_s=config.max_wait_ms / 1000.0,
                               workers=config.workers)
        self.metrics = metrics or Metrics(queue_depth=lambda: self.batcher.pending)
        self.batcher.observer = self.metrics.observe_batch
        self.tasks: tuple[str, ...] = tuple(predictor.tasks)
        self.max_length: int = predictor.max_length
        self.dimensions: int | None = None
        self.created = int(time.time())

    # --------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Run the model once (fails early on a broken model, learns its width), then start
        the batch worker."""
        rows = self.predictor.tokenize(["warm up"])
        vectors = self.predictor.embed_ids(*self.predictor.pad(rows))
        self.dimensions = int(vectors.shape[-1])
        self.batcher.start()
        logger.info("serving %s: tasks %s, max length %d, embedding width %d",
                    self.config.model_name, ", ".join(self.tasks), self.max_length,
                    self.dimensions)

    def close(self) -> None:
        """Answer every queued text, then stop the worker."""
        self.batcher.close(self.config.graceful_timeout_s)

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
                  payloads: Sequence[Any] | None = None) -> list[Any]:
        """Queue the rows (jobs of one request), wait for all; a failed job fails the request
        (422 for bad input, 503 when shutting down, anything else is a server error)."""
        try:
            futures = self.batcher.submit(key, rows, payloads)
        except ResourceError as err:
            raise ServeError(503, str(err), "shutting_down") from err
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, InputError):
                raise ServeError(422, str(result), "invalid_input", "input") from result
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def _run_batch(self, key: Any, jobs: list[Job]) -> Sequence[Any]:
        """One model call for jobs of one key (on the worker thread)."""
        ids, mask = self.predictor.pad([job.ids for job in jobs])
        task = key[0]
        if task == "embed":
            vectors: torch.Tensor = self.predictor.embed_ids(ids, mask)
            return list(vectors.numpy())
        if task == "classify":
            return self.predictor.classify_ids(ids, mask)
        if task == "fill-mask":
            return self.predictor.fill_mask_ids([job.payload for job in jobs], ids, mask,
                                                top_k=key[1])
        raise ValueError(f"unknown task {task!r}")
