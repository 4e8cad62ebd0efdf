"""The HTTP side: a FastAPI app with the endpoints, JSON errors, request logging and metrics.

Endpoints (see ``docs/serving.md``): ``POST /v1/embeddings`` (OpenAI's request and response
shape), ``POST /v1/classify``, ``POST /v1/fill-mask``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text format). Every error is JSON in OpenAI's shape
``{"error": {"message", "type", "code", "param"}}`` with a 4xx status for a bad request, 429
(503 while draining) with ``Retry-After`` when the server is full, 401 without the API key
(when the server has keys; ``/health`` is always open).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .errors import ClientGone, ServeError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import LOOP_PROBE_S
from .modelproc import Encoded
from .schemas import ClassifyRequest, EmbeddingRequest, FillMaskRequest
from .service import Service

logger = logging.getLogger("ultrafastbert.serve")

ENDPOINTS = ("POST /v1/embeddings", "POST /v1/classify", "POST /v1/fill-mask",
             "GET /v1/models", "GET /health", "GET /metrics")
_PATHS = {e.split()[1] for e in ENDPOINTS}
_QUIET_PATHS = {"/health", "/metrics"}  # scraped often: logged at debug level only
_MODEL_PATHS = {"/v1/embeddings", "/v1/classify", "/v1/fill-mask"}  # admission-controlled
_OPEN_PATHS = {"/health"}  # no API key needed
#: The status logged and counted for a request whose client left before its answer (nginx's).
CLIENT_GONE = 499


def create_app(predictor: Any, config: ServeConfig,
               model_loader: Callable[[], Any] | None = None) -> FastAPI:
    """The app serving ``predictor`` (an :class:`~ultrafastbert.infer.Predictor`). The model
    starts (warm-up, batch worker) when the app's lifespan starts and stops after the last
    request in flight is answered. ``model_loader`` (picklable, returns the Predictor) is
    what model processes load, with ``config.model_processes``."""
    service = Service(predictor, config, model_loader=model_loader)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        probe = asyncio.ensure_future(watch_loop_lag(service.metrics.loop_lag.observe,
                                                     tick=service.sample_drain))
        try:
            yield
        finally:
            probe.cancel()
            service.close()

    app = FastAPI(title="ultrafastbert", version="1", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Gate, service=service)
    app.add_middleware(RequestLog, service=service)  # outermost: logs the gate's refusals too
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


async def watch_loop_lag(observe: Callable[[float], None], period: float = LOOP_PROBE_S,
                         tick: Callable[[], None] | None = None) -> None:
    """Forever: sleep ``period`` s and ``observe`` how late the event loop woke up (seconds),
    then call ``tick`` (periodic work: the drain-rate sample). Everything the loop does
    (accepting, refusing, answering) waits that long too, so this is the server's own share
    of a refusal's latency under load."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period
        await asyncio.sleep(period)
        observe(max(0.0, loop.time() - due))
        if tick is not None:
            tick()


# ------------------------------------------------------------------------------------ routes
def _add_routes(app: FastAPI, service: Service) -> None:
    name = service.config.model_name

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Sentence embeddings, OpenAI's shape (``data[i].embedding``, ``usage``)."""
        service.check_model(body.model)
        service.require("embed")
        if body.dimensions is not None and body.dimensions != service.dimensions:
            raise ServeError(422, f"dimensions {body.dimensions} is not this model's width "
                                  f"{service.dimensions}; leave it out", "dimensions",
                             "dimensions")
        rows = _tokenized(request, service, body.input)
        vectors = await service.run(("embed",), rows, receive=request.receive)
        if body.encoding_format == "float" and all(isinstance(v, Encoded) for v in vectors):
            return _embeddings_json(vectors, name, _usage(rows))  # JSON made by the model
        data = [{"object": "embedding", "index": i,
                 "embedding": _vector(getattr(v, "vector", v), body.encoding_format)}
                for i, v in enumerate(vectors)]
        return _json({"object": "list", "data": data, "model": name, "usage": _usage(rows)})

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        """Label and probabilities (or a regression value) per text or text pair."""
        service.check_model(body.model)
        service.require("classify")
        rows = _tokenized(request, service, body.input, body.pair)
        results = await service.run(("classify",), rows, receive=request.receive)
        data = [{"index": i, "label": r.label, "probability": r.probability,
                 "probabilities": r.probabilities, "value": r.value}
                for i, r in enumerate(results)]
        return _json({"object": "list", "data": data, "model": name, "usage": _usage(rows)})

    @app.post("/v1/fill-mask")
    async def fill_mask(body: FillMaskRequest, request: Request) -> Response:
        """The ``top_k`` candidates for every mask of every text, and the text filled."""
        service.check_model(body.model)
        service.require("fill-mask")
        if body.top_k > service.config.max_top_k:
            raise ServeError(422, f"top_k {body.top_k} is above the limit "
                                  f"{service.config.max_top_k}", "top_k", "top_k")
        texts = [service.predictor.with_mask_token(t) for t in body.input]
        rows = _tokenized(request, service, texts)
        _check_masks(service, texts, rows)
        results = await service.run(("fill-mask", body.top_k), rows, texts,
                                    receive=request.receive)
        data = [{"index": i, "text": r.text, "filled": r.filled,
                 "masks": [[c.__dict__ for c in mask] for mask in r.candidates]}
                for i, r in enumerate(results)]
        return _json({"object": "list", "data": data, "model": name, "usage": _usage(rows)})

    @app.get("/v1/models")
    async def models() -> Response:
        """The one served model, OpenAI's list shape."""
        return _json({"object": "list", "data": [_model_card(service)]})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> Response:
        """The served model's card, or 404 for another name."""
        service.check_model(model_id)
        return _json(_model_card(service))

    @app.get("/health")
    async def health() -> Response:
        """200 with the model's name, its load and bounds while the server takes requests
        (``status`` "ok" or "overloaded"); 503 "draining" once it shuts down."""
        return _health(service)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _health(service: Service) -> Response:
    admission, limits = service.admission, service.limits
    status = "draining" if admission.draining else \
        "overloaded" if limits is not None and admission.overloaded else "ok"
    body: dict[str, Any] = {
        "status": status, "model": service.config.model_name, "tasks": list(service.tasks),
        "pending_inputs": service.batcher.pending, "requests_in_flight": admission.in_flight,
        "queued_tokens": service.batcher.queued_tokens}
    if limits is not None:
        drain = admission.drain.trusted
        body["limits"] = {"max_queue_tokens": admission.max_queue_tokens,  # in force now
                          "max_queue_tokens_at_start": limits.max_queue_tokens,
                          "max_concurrent_requests": admission.max_concurrent_requests,
                          "max_queue_ms": round(limits.max_queue_s * 1000, 3),
                          "measured_tokens_per_s": round(limits.tokens_per_s, 1),
                          "served_tokens_per_s": None if drain is None else round(drain, 1)}
    return _json(body, 503 if status == "draining" else 200)


def _tokenized(request: Request, service: Service, texts: list[str],
               pairs: list[str] | None = None) -> list[list[int]]:
    rows = service.tokenize(texts, pairs)
    request.state.inputs, request.state.tokens = len(rows), sum(len(r) for r in rows)
    return rows


def _check_masks(service: Service, texts: list[str], rows: list[list[int]]) -> None:
    mask_id = service.predictor.mask_token_id
    for i, row in enumerate(rows):
        if mask_id not in row:
            raise ServeError(422, f"input {i} has no <mask> (after truncation to "
                                  f"{service.max_length} tokens): write <mask> or [MASK] where "
                                  f"a word goes: {texts[i][:60]!r}", "no_mask", "input")


def _model_card(service: Service) -> dict[str, Any]:
    return {"id": service.config.model_name, "object": "model", "created": service.created,
            "owned_by": "ultrafastbert", "tasks": list(service.tasks),
            "max_length": service.max_length, "dimensions": service.dimensions}


def _vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _embeddings_json(vectors: Sequence[Encoded], model: str, usage: dict[str, int]
                     ) -> Response:
    """The embeddings answer from vectors whose JSON is made already: the bytes ``_json``
    would write for it, joined instead of encoded."""
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%b}' % (i, v.json)
                     for i, v in enumerate(vectors))
    tail = json.dumps({"model": model, "usage": usage}, separators=(",", ":")).encode()
    body = b'{"object":"list","data":[' + data + b"]," + tail[1:]
    return Response(body, status_code=200, media_type="application/json")


def _usage(rows: list[list[int]]) -> dict[str, int]:
    tokens = sum(len(r) for r in rows)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _json(content: Any, status: int = 200, headers: Mapping[str, str] | None = None
          ) -> Response:
    body = json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json",
                    headers=dict(headers) if headers else None)


# ------------------------------------------------------------------------------------ errors
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    """A JSON error in OpenAI's shape."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return _json({"error": {"message": message, "type": kind, "code": code, "param": param}},
                 status, headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> Response:
        return error_response(err.status, err.message, err.code, err.param, err.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)  # nobody reads it: logged and counted only

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        return _validation_error(request, err.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 404:
            return error_response(404, f"no endpoint {request.method} {request.url.path}; "
                                       f"endpoints: {', '.join(ENDPOINTS)}", "not_found")
        if err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            return error_response(405, f"{request.method} is not allowed on "
                                       f"{request.url.path}; use {allowed}",
                                  "method_not_allowed", headers=err.headers)
        return error_response(err.status_code, str(err.detail), "http_error",
                              headers=err.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> Response:
        logger.exception("error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(err).__name__}: {err}); this is a "
                                   "bug, please report it", "internal_error")


def _validation_error(request: Request, errors: Sequence[Any]) -> Response:
    """400 for a body that is not JSON, 415 for one that is not declared JSON, else 422."""
    content_type = request.headers.get("content-type", "")
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(400, f"the body is not valid JSON ({reason}); send a JSON "
                                   'object such as {"input": "some text"}', "json_invalid")
    if content_type and "json" not in content_type.lower():
        return error_response(415, f"Content-Type {content_type!r} is not JSON: send "
                                   "Content-Type: application/json", "unsupported_media_type")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return error_response(400, 'the request has no body: send a JSON object such as '
                                   '{"input": "some text"}', "body_missing")
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(p) for p in first[1:]) or None
    return error_response(422, "; ".join(parts), "invalid_value", param)


# ------------------------------------------------------------------------ keys and admission
class Gate:
    """ASGI middleware in front of the routes: the API key (401) on every path but
    ``/health``; then, for the model endpoints, admission (503 draining, 429 too many
    requests) before the body is read, so a refusal costs next to nothing."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service
        self._keys = [_digest(k.encode()) for k in service.config.api_keys]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._keys and path not in _OPEN_PATHS and not self._authorized(scope):
            await _unauthorized(scope)(scope, receive, send)
            return
        if path not in _MODEL_PATHS or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        admission = self.service.admission
        try:
            admission.enter()
        except ServeError as err:
            response = error_response(err.status, err.message, err.code, headers=err.headers)
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            admission.leave()

    def _authorized(self, scope: dict) -> bool:
        """``Authorization: Bearer KEY`` with one of the keys, compared in constant time (the
        SHA-256 digests, so neither the keys' lengths nor the first differing byte show)."""
        given = _header(scope, b"authorization")
        scheme, _, key = given.partition(b" ")
        digest = _digest(key.strip())
        ok = False
        for known in self._keys:  # every key, no early exit
            ok |= hmac.compare_digest(digest, known)
        return ok and scheme.lower() == b"bearer"


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _header(scope: dict, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return b""


def _unauthorized(scope: dict) -> Response:
    given = bool(_header(scope, b"authorization"))
    message = ("the API key is wrong (Authorization: Bearer KEY)" if given else
               "this server needs an API key: send the header Authorization: Bearer KEY")
    return error_response(401, message, "invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})


# ----------------------------------------------------------------------------------- logging
class RequestLog:
    """ASGI middleware: refuses bodies over the size limit (413), logs each request (method,
    path, status, inputs, tokens, latency) and records it in the metrics."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self._too_large(scope):
                limit = self.service.config.max_body_bytes
                response = error_response(413, f"the body is over {limit} bytes: split the "
                                               "request", "body_too_large")
                await response(scope, receive, send_and_note)
                return
            await self.app(scope, receive, send_and_note)
        finally:
            self._record(scope, status[0], time.perf_counter() - start)

    def _too_large(self, scope: dict) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    return int(value) > self.service.config.max_body_bytes
                except ValueError:
                    return False
        return False

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path
        endpoint = endpoint if endpoint in _PATHS else "other"
        state = scope.get("state") or {}
        inputs, tokens = int(state.get("inputs", 0)), int(state.get("tokens", 0))
        self.service.metrics.observe_request(endpoint, status, seconds, inputs, tokens)
        level = logging.DEBUG if path in _QUIET_PATHS and status < 400 else logging.INFO
        client = scope.get("client") or ("-", 0)
        logger.log(level, "%s %s %s %d inputs=%d tokens=%d %.1f ms", client[0],
                   scope.get("method", "-"), path, status, inputs, tokens, seconds * 1000)
