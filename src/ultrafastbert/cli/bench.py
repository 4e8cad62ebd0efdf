"""``ultrafastbert bench ff|model``: benchmarks that check outputs, then time."""

from __future__ import annotations

import argparse

import torch


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` with its ``ff`` and ``model`` subcommands."""
    bench = sub.add_parser("bench", help="benchmarks (feed-forward layer, whole model)",
                           description="Benchmarks: outputs checked first, then timed against "
                                       "dense baselines in the same process.")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    ff = kinds.add_parser("ff", help="FFF vs dense feed-forward layers (the paper's Table 2)",
                          description="Time dense FF baselines and FFF configs per "
                                      "implementation; writes a table, CSV/JSON and a PNG.")
    _add_ff_arguments(ff)
    ff.set_defaults(handler=run_ff)
    from ..bench import model as bench_model

    m = kinds.add_parser("model", help="whole encoder: UltraFastBERT-1x11 vs crammedBERT-4095/"
                                       "-3072 and Hugging Face BertModel",
                         description="Check each model against a reference, then time the whole "
                                     "encoder (interleaved rounds); table, CSV/JSON, PNG, "
                                     "per-part profile.")
    bench_model.add_arguments(m)
    m.set_defaults(handler=bench_model.run)


def _add_ff_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.ff import DEFAULT_TOKENS, PAPER_CONFIGS

    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="input and weight dtype of every model (default: float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default; recorded)")
    p.add_argument("--tokens", type=_int_list, default=DEFAULT_TOKENS,
                   help="comma-separated token counts (default: %(default)s)")
    p.add_argument("--configs", type=_str_list, default=PAPER_CONFIGS,
                   help="comma-separated FFF configs KxD (default: all paper configs)")
    p.add_argument("--implementations", type=_str_list, default=(),
                   help="FFF implementations to time (default: every one available)")
    p.add_argument("--repeats", type=int, default=15, help="timed samples (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--compile-dense", action="store_true",
                   help="also time a torch.compile'd dense baseline (slow to compile)")
    p.add_argument("--train", action="store_true",
                   help="also time forward+backward: sparse FFF vs masked form vs dense")
    p.add_argument("--out", default=None, help="folder for CSV/JSON/PNG (default: none)")


def run_ff(args: argparse.Namespace) -> int:
    """Run the FF benchmark and print its tables."""
    from ..bench.ff import BenchSettings, run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(device=args.device, tokens=args.tokens, configs=args.configs,
                             implementations=args.implementations, repeats=args.repeats,
                             warmup=args.warmup, compile_dense=args.compile_dense,
                             dtype=getattr(torch, args.dtype))
    result = run(settings, args.out, train=args.train)
    env = result["environment"]
    print(f"# FF benchmark: {env['cpu']}, torch {env['torch']}, {env['torch_threads']} threads, "
          f"{env['dtype']}, d_model {env['d_model']}, device {env['device']}")
    print(result["table"])
    if "train_table" in result:
        print("\n# Training (forward+backward)\n" + result["train_table"])
    for path in result.get("files", []):
        print(f"wrote {path}")
    return 0
