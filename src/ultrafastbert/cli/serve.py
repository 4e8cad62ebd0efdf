"""``ultrafastbert serve``: an HTTP server for a saved model (embeddings, classify, fill-mask)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
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
    _add_overload_options(p)
    p.set_defaults(handler=run)


def _add_overload_options(p: argparse.ArgumentParser) -> None:
    """Admission control and API keys (docs/serving.md, "Overload" and "API keys")."""
    g = p.add_argument_group("overload and access")
    g.add_argument("--max-queue-tokens", type=int, default=None,
                   help="tokens waiting for the model; more is refused with 429 (default: "
                        "what the server serves in half of --max-queue-ms: timed at start, "
                        "then the rate it drains its queue at)")
    g.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="model requests in the server at once; more is refused with 429 "
                        "(default: the queue bound / 16, within 16 and 1024)")
    g.add_argument("--max-queue-ms", type=float, default=1000.0,
                   help="a request not in the model after this long is answered 429 and not "
                        "computed (default 1000)")
    g.add_argument("--model-process", action="store_true",
                   help="run the model in its own process (one per worker) so that the HTTP "
                        "front never waits for the model's interpreter lock; the model is "
                        "loaded twice (memory)")
    g.add_argument("--model-nice", type=int, default=0, metavar="N",
                   help="run the model N nice levels below the HTTP front (0-19; default 0) so "
                        "that refusals are answered first when cores are short; the model then "
                        "yields to every other program too (see docs/serving.md)")
    g.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                   help="accepted keys, one per line (Authorization: Bearer KEY on every "
                        f"route but /health); or set {API_KEY_ENV}")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"a key on the command line (visible in ps: prefer {API_KEY_ENV} or "
                        "--api-key-file)")


#: The environment variable holding an API key.
API_KEY_ENV = "ULTRAFASTBERT_API_KEY"


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The keys from --api-key-file, $ULTRAFASTBERT_API_KEY and --api-key (warned about)."""
    from ..errors import InputError, NotFoundError

    keys = []
    if args.api_key_file is not None:
        try:
            text = args.api_key_file.read_text()
        except FileNotFoundError as err:
            raise NotFoundError(f"--api-key-file {args.api_key_file} does not exist") from err
        keys = [k.strip() for k in text.splitlines() if k.strip() and not k.startswith("#")]
        if not keys:
            raise InputError(f"--api-key-file {args.api_key_file} holds no key: one key per "
                             "line")
    if os.environ.get(API_KEY_ENV, "").strip():
        keys.append(os.environ[API_KEY_ENV].strip())
    if args.api_key is not None:
        print(f"warning: --api-key puts the key where every user of this machine sees it (ps, "
              f"shell history); use {API_KEY_ENV} or --api-key-file", file=sys.stderr)
        keys.append(args.api_key)
    return tuple(keys)


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
                         graceful_timeout_s=args.graceful_timeout, workers=args.workers,
                         max_queue_tokens=args.max_queue_tokens, max_queue_ms=args.max_queue_ms,
                         max_concurrent_requests=args.max_concurrent_requests,
                         api_keys=api_keys(args), model_nice=args.model_nice,
                         model_processes=args.model_process)
    load = functools.partial(Predictor.from_pretrained, args.model, dtype=args.dtype,
                             device=args.device, kernel=args.kernel, precision=args.precision)
    predictor = load()
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def ready() -> None:
        print(f"ultrafastbert serve: {name} ({', '.join(predictor.tasks)}) on {url} "
              f"({torch.get_num_threads()} threads{', API key needed' if config.api_keys else ''}"
              "); stop with Ctrl+C or SIGTERM", flush=True)

    serve(predictor, config, sock, on_ready=ready, model_loader=load)
    print("ultrafastbert serve: stopped", flush=True)
    sys.stdout.flush()
    return 0
