"""``ultrafastbert glue``: fine-tune and evaluate a model directory on GLUE (GLUE-sane protocol).

Also runnable as ``python -m ultrafastbert.cli.glue ARGS``.
"""

from __future__ import annotations

import argparse
import sys

from .options import add_options, section, when_used
from .options import settings_from_args as build_settings
from .pretrain import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``glue`` subcommand."""
    p = sub.add_parser(
        "glue", help="fine-tune and evaluate on GLUE (GLUE-sane protocol, median over seeds)",
        description="Fine-tune a model directory (pretrained or fine-tuned: its encoder is used, "
                    "with a new head) on GLUE tasks with the GLUE-sane protocol: 5 epochs, lr "
                    "4e-5, batch 16, AdamW (0.9, 0.98, eps 1e-6, no decay), cosine with 10% "
                    "warm-up, max length 128, first-token pooling, dropout 0.1, median over "
                    "seeds. Writes OUT/results.json, OUT/results.md and OUT/models/.")
    when_used(p, lambda: _add_arguments(p), "glue")
    p.set_defaults(handler=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..glue import GlueRunSettings

    add_options(p, GlueRunSettings)
    section(p, "runtime").add_argument("--threads", type=positive_int, default=None,
                                       help="torch intra-op threads")


def settings_from_args(args: argparse.Namespace):
    """``GlueRunSettings`` from parsed arguments."""
    from ..glue import GlueRunSettings

    return build_settings(GlueRunSettings, args)


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
