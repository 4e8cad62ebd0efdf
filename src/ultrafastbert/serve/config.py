"""The server's runtime settings: limits and batching, apart from the model itself."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError


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
    """

    model_name: str
    max_batch_tokens: int = 4096
    max_wait_ms: float = 2.0
    max_inputs: int = 2048
    max_request_tokens: int = 262_144
    truncate: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    max_top_k: int = 100
    graceful_timeout_s: float = 30.0
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ConfigError("model_name must not be empty: give --model-name")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", "float") and field.name != "max_wait_ms" and value <= 0:
                raise ConfigError(f"{field.name} must be > 0, got {value}")

    def check_model_length(self, max_length: int) -> None:
        """Refuse a token budget that cannot hold one text of the model's ``max_length``."""
        if self.max_batch_tokens < max_length:
            raise ConfigError(f"max_batch_tokens {self.max_batch_tokens} is below the model's "
                              f"maximum length {max_length}: give at least {max_length}")
