"""``ultrafastbert bench ff|model``: benchmarks that check outputs, then time.

Each benchmark's options come from its settings (:class:`~ultrafastbert.bench.ff.BenchSettings`,
:class:`~ultrafastbert.bench.model.ModelBenchSettings`); the library checks, times, writes the
result files and returns the results; this module prints them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_options, section, settings_from_args, when_used
from .pretrain import positive_int

#: The ``--help`` section of ``bench model --texts`` and the options only it reads.
TEXTS = "sentence embeddings from text (--texts)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` with its ``ff`` and ``model`` subcommands."""
    bench = sub.add_parser("bench", help="benchmarks (feed-forward layer, whole model)",
                           description="Benchmarks: outputs checked first, then timed against "
                                       "dense baselines in the same process.")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    ff = kinds.add_parser("ff", help="FFF vs dense feed-forward layers (the paper's Table 2)",
                          description="Time dense FF baselines and FFF configs per "
                                      "implementation; writes a table, CSV/JSON and a PNG.")
    when_used(ff, lambda: _add_ff_arguments(ff), "bench")
    ff.set_defaults(handler=run_ff)
    m = kinds.add_parser("model", help="whole encoder: UltraFastBERT-1x11 vs crammedBERT-4095/"
                                       "-3072 and Hugging Face BertModel",
                         description="Check each model against a reference, then time the whole "
                                     "encoder (interleaved rounds); table, CSV/JSON, PNG, "
                                     "per-part profile.")
    when_used(m, lambda: _add_model_arguments(m), "bench")
    m.set_defaults(handler=run_model)


# ------------------------------------------------------------------------------------ bench ff
def _add_ff_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.ff import BenchSettings

    add_options(p, BenchSettings)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default; recorded)")
    p.add_argument("--train", action="store_true",
                   help="also time forward+backward: sparse FFF vs masked form vs dense")
    p.add_argument("--out", default=None, help="folder for CSV/JSON/PNG (default: none)")


def ff_settings(args: argparse.Namespace):
    """``BenchSettings`` from parsed ``bench ff`` arguments."""
    from ..bench.ff import BenchSettings

    return settings_from_args(BenchSettings, args)


def run_ff(args: argparse.Namespace) -> int:
    """Run the FF benchmark and print its tables."""
    import torch

    from ..bench.common import speed_summary
    from ..bench.ff import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(ff_settings(args), args.out, train=args.train)
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


# --------------------------------------------------------------------------------- bench model
def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.model import ModelBenchSettings
    from ..infer.precision import CHOICES

    add_options(p, ModelBenchSettings)
    p.add_argument("--dense-source", default=None,
                   help="dense source directory of the converted models (default: the one "
                        "their conversion.json names)")
    p.add_argument("--no-dense-baselines", action="store_true",
                   help="do not add a converted model's dense-source baselines")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (recorded)")
    p.add_argument("--out", default=None, help="folder for CSV/JSON/PNG (default: none)")
    texts = section(p, TEXTS)
    texts.add_argument("--texts", default=None, metavar="GLUE_DIR",
                       help="instead: sentence embeddings from text (tokenization included) of "
                            "the converted model in --models against its dense source on "
                            "PyTorch, ONNX Runtime and OpenVINO, on STS-B dev in batches of 32 "
                            "and 32x128, with STS-B Spearman and cosine columns (bench/texts.py)")
    texts.add_argument("--precision", type=_precisions, default=CHOICES,
                       help=f"our Predictor's precisions to run (default: {','.join(CHOICES)}; "
                            "also int8-fff32: int8 with the FFF blocks' weights in float32)")
    texts.add_argument("--text-limit", type=positive_int, default=None,
                       help="time only the first N STS-B sentences")
    texts.add_argument("--quality-only", action="store_true",
                       help="only the quality columns and FFF route-change rates (no timing; "
                            "may run outside the benchmark lock)")
    texts.add_argument("--quality-pairs", type=positive_int, default=None,
                       help="quality columns on the first N STS-B pairs only")
    texts.add_argument("--quality-from", default=None, metavar="JSON",
                       help="read the quality columns from a --quality-only run")


def _precisions(text: str) -> tuple[str, ...]:
    from ..bench.texts import INT8_FP32_FFF
    from ..infer.precision import CHOICES

    allowed = (*CHOICES, INT8_FP32_FFF)
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--precision must be among {allowed}, got {text!r}")
    return names


def model_settings(args: argparse.Namespace):
    """The checked ``ModelBenchSettings`` of parsed ``bench model`` arguments, with converted
    models' dense baselines added (:func:`~ultrafastbert.bench.model.resolve`)."""
    from ..bench.model import ModelBenchSettings, resolve

    return resolve(settings_from_args(ModelBenchSettings, args), args.dense_source,
                   not args.no_dense_baselines)


def run_model(args: argparse.Namespace) -> int:
    """``bench model``: run, print the tables, write the files."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.texts:
        return run_texts(args)
    from ..bench.model import run_bench

    result = run_bench(model_settings(args))
    print(format_model_result(result))
    if args.out:
        from ..bench.model import write

        for path in write(args.out, result):
            print(f"wrote {path}")
    return 0


def format_model_result(result: dict) -> str:
    """The conditions line, the output checks, the timings, the fastest dense model per dtype
    and batch, skipped baselines and the per-part profile."""
    from ..bench.common import format_table, speed_summary
    from ..bench.model import FASTEST_COLUMNS, PROFILE_COLUMNS, TABLE_COLUMNS, fastest_dense

    env = result["environment"]
    lines = [f"{speed_summary(env)}; load {env['loadavg_before']} -> {env['loadavg_after']}, "
             f"FFF kernel {env['fff_kernel']}, linear layers {env['linear_layers']}",
             "\noutput checks (before timing):",
             format_table(result["checks"], ("model", "dtype", "max_rel_error", "rows_compared",
                                             "rows_excluded_near_zero_logit", "ok"))]
    timed = [r for r in result["rows"] if "latency_ms" in r]
    lines.append("\n" + format_table(timed, TABLE_COLUMNS))
    lines.append("\nfastest dense model per dtype and batch:\n"
                 + format_table(fastest_dense(result["rows"]), FASTEST_COLUMNS))
    skipped = {r["model"]: r["skipped"] for r in result["rows"] if "skipped" in r}
    lines += [f"skipped baseline {name}: {reason}" for name, reason in skipped.items()]
    if result["profile"]:
        lines.append("\nper-part profile:\n" + format_table(result["profile"], PROFILE_COLUMNS))
    return "\n".join(lines)


def run_texts(args: argparse.Namespace) -> int:
    """``bench model --texts``: see :mod:`ultrafastbert.bench.texts`."""
    from ..bench import texts
    from ..bench.model import text_models

    converted, dense = text_models(args.models, args.dense_source)
    result = texts.run_texts(converted, dense, Path(args.texts), tuple(args.precision),
                             rounds=max(args.repeats, 1), n_texts=args.text_limit,
                             quality_only=args.quality_only, quality_from=args.quality_from,
                             quality_pairs=args.quality_pairs)
    if args.quality_only:
        if args.out:
            from ..utils.io import atomic_write_json

            Path(args.out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.out) / "quality.json", result)
            print(f"wrote {Path(args.out) / 'quality.json'}")
        return 0
    print(texts.report(result))
    if args.out:
        for path in texts.write(args.out, result):
            print(f"wrote {path}")
    return 0
