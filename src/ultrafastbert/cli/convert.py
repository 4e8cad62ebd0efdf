"""``ultrafastbert convert``: a pretrained BERT-family model -> FFF blocks, by distillation."""

from __future__ import annotations

import argparse
import os
import sys

from .options import add_options, settings_from_args, when_used
from .pretrain import positive_int, standalone_main


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    p = sub.add_parser(
        "convert", help="turn a pretrained BERT-family model into FFF by distillation",
        description="Replace every feed-forward block of a local Hugging Face BERT-family model "
                    "(BERT, MiniLM, RoBERTa, DistilBERT; sentence-transformers layout too) by an "
                    "FFF of K trees of depth D, initialised from the dense neurons and distilled "
                    "from the dense model on unlabeled text: layer by layer, then end to end. "
                    "Attention, norms and embeddings are kept bit-identical unless --lr-rest > 0. "
                    "OUT loads with ultrafastbert.from_pretrained(OUT), predict, glue, serve. "
                    "The distillation text (--corpus, required) decides the quality more than "
                    "any other setting: give text like the text the model will embed. Under "
                    "torchrun the same command trains data-parallel (--batch-size is global).")
    when_used(p, lambda: _add_arguments(p), "hf")
    p.set_defaults(handler=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..convert.pipeline import ConvertSettings

    add_options(p, ConvertSettings)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")


def convert_settings(args: argparse.Namespace):
    """``ConvertSettings`` from parsed ``convert`` arguments."""
    from ..convert.pipeline import ConvertSettings

    return settings_from_args(ConvertSettings, args)


def run(args: argparse.Namespace) -> int:
    """Convert and print a summary."""
    import torch

    from ..convert.pipeline import run as convert

    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    settings = convert_settings(args)
    report = convert(settings)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    held = report.heldout
    errors = ", ".join(f"{e:.3f}" for e in held["block_error"])
    print(f"converted {settings.source} -> {settings.out}: FFF {settings.fff}, "
          f"{report.active_fraction:.1%} of the dense FFN's multiply-adds per token")
    print(f"init {report.init_s:.0f} s; " + "; ".join(
        f"{name} {p.get('steps', 0)} steps{_rate(p)}" for name, p in report.phases.items())
        + f" ({report.device}, {report.world_size} process{'es' if report.world_size > 1 else ''})")
    print(f"held-out ({held['rows']} texts): block relative error [{errors}]")
    print(f"held-out pooled-embedding cosine to the dense model {held['pooled_cosine']:.4f} "
          f"(FFN blocks removed: {held['removed_pooled_cosine']:.4f}; "
          f"{held['pooled_cosine_kept']:.0%} of the way from removed to dense)")
    if report.quality_warning:
        print(f"WARNING: {report.quality_warning}", file=sys.stderr)
    print(f"load it with ultrafastbert.from_pretrained({str(settings.out)!r}); report in "
          f"{settings.out / 'conversion.json'}")
    return 0


def _rate(phase: dict) -> str:
    rate = phase.get("tokens_per_s")
    return f", {rate:,.0f} tokens/s" if rate else ""


def _quiet_transformers() -> None:
    """transformers' per-load progress bars and load reports are noise on a command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """``python -m ultrafastbert.cli.convert ARGS`` (e.g. under ``torchrun -m``)."""
    return standalone_main(register, "convert", argv)


if __name__ == "__main__":
    sys.exit(main())
