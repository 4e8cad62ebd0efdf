"""The server's runtime settings: limits and batching, apart from the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import ConfigError
from ..utils.options import option

#: The ``--help`` section of the admission-control and access options (docs/serving.md).
OVERLOAD = "overload and access"


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server. Sizes are tokens as the model's tokenizer counts them (special
    tokens included).

    - ``model_name``: the id clients name in ``model`` and that ``/v1/models`` lists.
    - ``max_batch_tokens``: a batch's padded size (rows x longest row) is at most this; it must
      hold one text of the model's maximum length.
    - ``max_wait_ms``: how long the first request of a batch waits for company when the model
      is idle (a busy model batches whatever queued meanwhile, without waiting).
    - ``max_inputs``: texts in one request (OpenAI's limit: 2048).
    - ``max_request_tokens``: tokens in one request, all its texts together.
    - ``truncate``: a text longer than the model takes is cut to its length (as
      :class:`~ultrafastbert.infer.Predictor` does); False refuses it with status 413.
    - ``max_body_bytes``: largest request body (status 413 above it).
    - ``max_top_k``: the largest ``top_k`` fill-mask accepts.
    - ``workers``: threads that run batches at once (with one torch thread each, they use as
      many cores; see docs/serving.md for threads against workers).
    - ``graceful_timeout_s``: on SIGTERM/SIGINT, how long requests in flight may take.
    - ``max_queue_tokens``: tokens of admitted requests waiting for the model; a request that
      would go over is refused at once (429). None: sized when the server starts, from the
      model's measured tokens/s (what it computes in half of ``max_queue_ms``).
    - ``max_concurrent_requests``: model requests in the server at once (queued, in the
      model, being read); one more is refused at once (429). None: sized from
      ``max_queue_tokens`` (that many tokens in 16-token requests, within 16 and 1024).
    - ``max_queue_ms``: how long a request may wait for its first model call; then it is
      answered 429 and not computed (a request that started runs to its end).
    - ``api_keys``: the accepted ``Authorization: Bearer`` keys (empty: no authentication).
    - ``model_nice``: how much lower than the event loop's the model's CPU priority is (the
      nice value added to the batch workers, or to the model processes); 0 keeps it equal.
    - ``model_processes``: run the model in ``workers`` child processes instead of threads of
      the server's own process (needs a model loader; see :mod:`.modelproc`).
    """

    model_name: str  # the command line's --model-name (default: the directory's name)
    max_batch_tokens: int = option(4096, help="padded tokens per model call (rows x longest "
                                              "row)")
    max_wait_ms: float = option(2.0, help="how long a request waits for batch-mates when the "
                                          "model is idle")
    max_inputs: int = option(2048, help="texts per request")
    max_request_tokens: int = option(262_144, help="tokens per request, all texts together")
    truncate: bool = option(True, flags="--no-truncate",
                            help="refuse (413) a text longer than the model takes instead of "
                                 "cutting it")
    max_body_bytes: int = option(8 * 1024 * 1024, show="8 MiB", help="largest request body "
                                                                     "in bytes")
    max_top_k: int = 100
    graceful_timeout_s: float = option(30.0, flags="--graceful-timeout",
                                       help="seconds requests in flight get at shutdown")
    workers: int = option(1, help="batches run at once, each on its own thread (on a CPU try "
                                  "--workers N --threads 1 with N cores)")
    max_queue_tokens: int | None = option(
        None, parse=int, group=OVERLOAD,
        help="tokens waiting for the model; more is refused with 429 (default: what the server "
             "serves in half of --max-queue-ms: timed at start, then the rate it drains its "
             "queue at)")
    max_concurrent_requests: int | None = option(
        None, parse=int, group=OVERLOAD,
        help="model requests in the server at once; more is refused with 429 (default: "
             "--max-queue-tokens / 16, within 16 and 1024)")
    max_queue_ms: float = option(1000.0, group=OVERLOAD,
                                 help="a request not in the model after this long is answered "
                                      "429 and not computed")
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    model_nice: int = option(0, metavar="N", group=OVERLOAD,
                             help="run the model N nice levels below the HTTP front (0-19) so "
                                  "that refusals are answered first when cores are short; the "
                                  "model then yields to every other program too "
                                  "(docs/serving.md)")
    model_processes: bool = option(False, flags="--model-process", group=OVERLOAD,
                                   help="run the model in its own process (one per worker) so "
                                        "that the HTTP front never waits for the model's "
                                        "interpreter lock; the model is loaded twice (memory)")

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ConfigError("model_name must not be empty: give --model-name")
        if not 0 <= self.model_nice <= 19:
            raise ConfigError(f"model_nice must be within 0 and 19, got {self.model_nice}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and f.name not in ("max_wait_ms", "model_nice") \
                    and value <= 0:
                raise ConfigError(f"{f.name} must be > 0, got {value}")
        for name in ("max_queue_tokens", "max_concurrent_requests"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 (or left out to size it from the "
                                  f"model's speed), got {value}")
        if self.max_queue_ms <= self.max_wait_ms:
            raise ConfigError(f"max_queue_ms {self.max_queue_ms} must be above max_wait_ms "
                              f"{self.max_wait_ms} (the wait for batch-mates is queue time "
                              "too): raise --max-queue-ms")
        for i, key in enumerate(self.api_keys):
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise ConfigError(f"API key {i + 1} is empty or holds white space: one key "
                                  "per line, nothing else on it")

    def check_model_length(self, max_length: int) -> None:
        """Refuse a token budget that cannot hold one text of the model's ``max_length``."""
        if self.max_batch_tokens < max_length:
            raise ConfigError(f"max_batch_tokens {self.max_batch_tokens} is below the model's "
                              f"maximum length {max_length}: give at least {max_length}")
