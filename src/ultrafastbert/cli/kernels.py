"""``ultrafastbert kernels``: which FFF implementations can run here, and why not."""

from __future__ import annotations

import argparse

import torch


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``kernels`` subcommand."""
    p = sub.add_parser("kernels", help="list FFF implementations and whether each can run",
                       description="List every FFF implementation in priority order, for "
                                   "inference and for training, with the reason it cannot run "
                                   "on the given device/dtype.")
    p.add_argument("--device", default="cpu", help="device to check (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16",
                                                          "float64"])
    p.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "bf16-out"])
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the dispatcher's table."""
    from ..fff.dispatch import describe

    print(describe(args.device, getattr(torch, args.dtype), args.weight_format))
    return 0
