"""``ultrafastbert serve``: an HTTP server for a saved model (embeddings, classify, fill-mask)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve", help="HTTP server: /v1/embeddings, /v1/classify, /v1/fill-mask, /metrics",
        description="Serve a saved model over HTTP with dynamic batching (needs the 'serve' "
                    "extra). Stops on SIGTERM/SIGINT after answering the requests in flight.")
    p.add_argument("model", help="model directory (config.json, weights, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the "
                        "directory's name)")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="padded tokens per model call (rows x longest row; default 4096)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a request waits for batch-mates when the model is idle "
                        "(default 2)")
    p.add_argument("--max-inputs", type=int, default=2048, help="texts per request (2048)")
    p.add_argument("--max-request-tokens", type=int, default=262_144,
                   help="tokens per request, all texts together (262144)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body (default 8 MiB)")
    p.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="refuse (413) a text longer than the model takes instead of cutting it")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=1,
                   help="batches run at once, each on its own thread (default 1; on a CPU "
                        "try --workers N --threads 1 with N cores)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--precision", choices=("float32", "bfloat16", "int8", "auto"), default=None,
                   help="dense linears: auto (default: fastest passing the accuracy rule "
                        "here), float32, bfloat16, int8")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--kernel", default="auto",
                   help="FFF implementation: auto, torch, native, triton (default: auto)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds requests in flight get at shutdown (default 30)")
    p.add_argument("--quiet", action="store_true", help="do not log every request")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, bind the port, serve until a signal; 0 after a clean shutdown."""
    from ..errors import ResourceError

    try:
        from ..serve import ServeConfig, bind, serve
    except ImportError as err:
        raise ResourceError(f"serving needs the 'serve' extra ({err.name} is missing): "
                           "pip install 'ultrafastbert[serve]'") from err
    import torch

    from ..infer import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quiet:
        logging.getLogger("ultrafastbert.serve").setLevel(logging.INFO)
    name = args.model_name or Path(args.model).resolve().name
    config = ServeConfig(model_name=name, max_batch_tokens=args.max_batch_tokens,
                         max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs,
                         max_request_tokens=args.max_request_tokens, truncate=args.truncate,
                         max_body_bytes=args.max_body_bytes,
                         graceful_timeout_s=args.graceful_timeout, workers=args.workers)
    predictor = Predictor.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                          kernel=args.kernel, precision=args.precision)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def ready() -> None:
        print(f"ultrafastbert serve: {name} ({', '.join(predictor.tasks)}) on {url} "
              f"({torch.get_num_threads()} threads); stop with Ctrl+C or SIGTERM", flush=True)

    serve(predictor, config, sock, on_ready=ready)
    print("ultrafastbert serve: stopped", flush=True)
    sys.stdout.flush()
    return 0
