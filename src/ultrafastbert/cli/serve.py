"""``ultrafastbert serve``: an HTTP server for a saved model (embeddings, classify, fill-mask)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from .options import add_options, section, settings_from_args, when_used


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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--precision", choices=("float32", "bfloat16", "int8", "auto"), default=None,
                   help="dense linears: auto (default: fastest passing the accuracy rule "
                        "here), float32, bfloat16, int8")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--kernel", default="auto",
                   help="FFF implementation: auto, torch, native, triton (default: auto)")
    p.add_argument("--quiet", action="store_true", help="do not log every request")
    when_used(p, lambda: _add_arguments(p), "serve")
    p.set_defaults(handler=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    """``ServeConfig``'s options, and the API keys (docs/serving.md, "API keys")."""
    from ..serve.config import OVERLOAD, ServeConfig

    add_options(p, ServeConfig)
    group = section(p, OVERLOAD)
    group.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                       help="accepted keys, one per line (Authorization: Bearer KEY on every "
                            f"route but /health); or set {API_KEY_ENV}")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help=f"a key on the command line (visible in ps: prefer {API_KEY_ENV} "
                            "or --api-key-file)")


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


def serve_config(args: argparse.Namespace):
    """``ServeConfig`` from parsed ``serve`` arguments: the model's name (the directory's by
    default) and the API keys (:func:`api_keys`) beside the options."""
    from ..serve.config import ServeConfig

    name = args.model_name or Path(args.model).resolve().name
    return settings_from_args(ServeConfig, args, model_name=name, api_keys=api_keys(args))


def run(args: argparse.Namespace) -> int:
    """Load the model, bind the port, serve until a signal; 0 after a clean shutdown."""
    from ..errors import ResourceError

    try:
        from ..serve import bind, serve
    except ImportError as err:
        raise ResourceError(f"serving needs the 'serve' extra ({err.name} is missing): "
                           "pip install 'ultrafastbert[serve]'") from err
    import torch

    from ..infer import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quiet:
        logging.getLogger("ultrafastbert.serve").setLevel(logging.INFO)
    config = serve_config(args)
    name = config.model_name
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
