"""``ultrafastbert glue``: fine-tune and evaluate a model directory on GLUE (GLUE-sane protocol).

Also runnable as ``python -m ultrafastbert.cli.glue ARGS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .pretrain import positive_int


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``glue`` subcommand."""
    p = sub.add_parser(
        "glue", help="fine-tune and evaluate on GLUE (GLUE-sane protocol, median over seeds)",
        description="Fine-tune a model directory (pretrained or fine-tuned: its encoder is used, "
                    "with a new head) on GLUE tasks with the GLUE-sane protocol: 5 epochs, lr "
                    "4e-5, batch 16, AdamW (0.9, 0.98, eps 1e-6, no decay), cosine with 10% "
                    "warm-up, max length 128, first-token pooling, dropout 0.1, median over "
                    "seeds. Writes OUT/results.json, OUT/results.md and OUT/models/.")
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="model directory (config.json, weights, tokenizer.json)")
    p.add_argument("--glue-dir", type=Path, required=True, metavar="DIR",
                   help="GLUE folder: TASK/train.tsv + TASK/dev.tsv (download_glue_data.py "
                        "layout) or datasets saved with save_to_disk, one folder per task")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory (new or empty)")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated tasks, e.g. RTE,STS-B (default: every task in "
                        "--glue-dir); CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI")
    _protocol_arguments(p)
    _runtime_arguments(p)
    p.set_defaults(handler=run)


def _protocol_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol (defaults: GLUE-sane)")
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs (5)")
    g.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                   help="runs per task, seeds 0..N-1; tables show the median (5)")
    g.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (4e-5)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="batch size (16)")
    g.add_argument("--warmup", type=float, default=None, help="warm-up share of steps (0.1)")
    g.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per example after truncation (128)")
    g.add_argument("--dropout", type=float, default=None, help="dropout rates (0.1)")
    g.add_argument("--max-train-examples", type=positive_int, default=None, metavar="N",
                   help="fine-tune on a random subset of N training examples (default: all)")
    g.add_argument("--max-eval-examples", type=positive_int, default=None, metavar="N",
                   help="evaluate on a random subset of N dev examples (default: all)")


def _runtime_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--save-models", choices=("all", "median", "none"), default="median",
                   help="fine-tuned models to keep: all, the median seed's per task "
                        "(default), none")
    g.add_argument("--name", default=None, help="the model's name in results.md")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="autocast dtype while training (default: fp32)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace):
    """``GlueRunSettings`` from parsed arguments."""
    from ..glue import FinetuneRuntime, GlueProtocol, GlueRunSettings

    seeds = tuple(range(args.seeds)) if args.seeds is not None else None
    protocol = GlueProtocol().replace(
        epochs=args.epochs, seeds=seeds, lr=args.lr, batch_size=args.batch_size,
        warmup=args.warmup, max_length=args.max_length, dropout=args.dropout,
        max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples)
    runtime = FinetuneRuntime(device=args.device, precision=args.precision,
                              progress_bar=not args.no_progress)
    tasks = tuple(args.tasks.split(",")) if args.tasks is not None else None
    return GlueRunSettings(model_dir=args.model, glue_dir=args.glue_dir, out_dir=args.out,
                           tasks=tasks, protocol=protocol, runtime=runtime,
                           save_models=args.save_models, model_name=args.name)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print the table."""
    import torch

    from ..glue import results_markdown
    from ..glue.run import run as run_glue

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    results = run_glue(settings)
    print(results_markdown(results))
    print(f"results: {settings.out_dir / 'results.json'}, {settings.out_dir / 'results.md'}")
    kept = [s["model_dir"] for s in results["tasks"].values() if s["model_dir"]]
    if kept:
        print(f"fine-tuned models: {settings.out_dir / 'models'} (e.g. ultrafastbert predict "
              f"classify {settings.out_dir / kept[0]} 'some text')")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ultrafastbert.cli.glue ARGS``."""
    from .pretrain import standalone_main

    return standalone_main(register, "glue", argv)


if __name__ == "__main__":
    sys.exit(main())
