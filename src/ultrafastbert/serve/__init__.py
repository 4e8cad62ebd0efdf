"""``ultrafastbert serve``: an HTTP server for embeddings, classification and fill-mask.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client). The model is reached only
through :class:`~ultrafastbert.infer.Predictor`; concurrent requests are batched
(:mod:`.batcher`). See ``docs/serving.md``.
"""

from .app import create_app
from .batcher import Batcher, BatchStats, Job, plan_batches
from .config import ServeConfig
from .server import bind, serve
from .service import ServeError, Service

__all__ = ["BatchStats", "Batcher", "Job", "ServeConfig", "ServeError", "Service", "bind",
           "create_app", "plan_batches", "serve"]
