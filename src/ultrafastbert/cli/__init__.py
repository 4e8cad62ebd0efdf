"""The ``ultrafastbert`` command line: one module per command, each with ``register()``.

The only place that prints; the library logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import Interrupted, UltraFastBertError
from .options import CommandParser

#: Command modules under ``ultrafastbert.cli``, each defining ``register(subparsers)``.
COMMAND_MODULES = ("demo", "pretrain", "convert", "glue", "predict", "bench", "kernels", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    parser = CommandParser(
        prog="ultrafastbert",
        description="UltraFastBERT: fast feedforward BERT with exact semantics and real speed.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    return run_handler(build_parser().parse_args(argv))


def run_handler(args: argparse.Namespace) -> int:
    """Set up logging from ``-v``, run the chosen command, report the library's errors in one line.

    Only :class:`~ultrafastbert.errors.UltraFastBertError` (raised on purpose, with a message that
    says what to do) becomes one line and exit status 2; anything else is a bug and propagates
    with its traceback.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except Interrupted as err:  # Ctrl-C in a training loop: saved, not a failure
        print(f"ultrafastbert {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"ultrafastbert {args.command}: interrupted", file=sys.stderr)
        return 130
    except UltraFastBertError as err:
        print(f"ultrafastbert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
