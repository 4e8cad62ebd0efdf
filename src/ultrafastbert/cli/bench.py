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


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_list(text: str) -> tuple[torch.dtype, ...]:
    names = _str_list(text)
    bad = [n for n in names if n not in DTYPE_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"dtypes must be among {list(DTYPE_NAMES)}, got {text!r}")
    return tuple(getattr(torch, n) for n in dict.fromkeys(names))


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
    from ..bench.ff import DEFAULT_TOKENS, DENSE_WIDTHS, PAPER_CONFIGS

    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtypes", "--dtype", type=_dtype_list, default=(torch.float32,),
                   help="comma-separated input and weight dtypes, each measured for dense and "
                        "FFF alike: float32, bfloat16, float16 (default: float32)")
    p.add_argument("--d-model", type=int, default=768,
                   help="model width d (default 768; 384 for MiniLM-sized layers)")
    p.add_argument("--dense-widths", type=_int_list, default=DENSE_WIDTHS,
                   help="dense baseline widths; speedups are taken against the last "
                        "(default: %(default)s)")
    p.add_argument("--dense-bias", action="store_true",
                   help="dense linears with biases, as in a BERT FFN (crammedBERT has none)")
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
    from ..bench.common import speed_summary
    from ..bench.ff import BenchSettings, run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(device=args.device, d_model=args.d_model, tokens=args.tokens,
                             configs=args.configs, implementations=args.implementations,
                             repeats=args.repeats, warmup=args.warmup,
                             compile_dense=args.compile_dense, dtypes=args.dtypes,
                             dense_widths=args.dense_widths, dense_bias=args.dense_bias)
    result = run(settings, args.out, train=args.train)
    env = result["environment"]
    print(f"# FF benchmark: {speed_summary(env)}; d_model {env['d_model']}, device "
          f"{env['device']}, load {env['loadavg_before']} -> {env['loadavg_after']}; speedups "
          f"against {env['reference_dense']}")
    print(result["table"])
    print("\n# Fastest dense form per dtype\n" + result["fastest_dense_table"])
    if "train_table" in result:
        print("\n# Training (forward+backward)\n" + result["train_table"])
    for path in result.get("files", []):
        print(f"wrote {path}")
    return 0
