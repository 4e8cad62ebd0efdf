"""``ultrafastbert convert``: a pretrained BERT-family model -> FFF blocks, by distillation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .pretrain import parse_duration, positive_int, standalone_main


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
    p.add_argument("source", type=Path, help="local model directory (config.json + weights + "
                                             "tokenizer.json)")
    p.add_argument("--fff", default="8x7", metavar="KxD[bB][+sN][+rN][,...]|auto:N[%][@D]",
                   help="trees x depth for every layer, one per layer, or 'none' (the ablation: "
                        "feed-forward blocks removed); bB makes every node a block of B neurons "
                        "(e.g. 4x7b2); +sN adds N always-on (shared) neurons, "
                        "+rN a rank-N linear term beside the trees, each costing per token what "
                        "N neurons do, e.g. 6x7+s16; auto:64 or auto:4.2%% spends that mean "
                        "budget per layer (neurons a token, or %% of the dense FFN) in trees of "
                        "depth D (@D, default 7), more where the measured error is largest "
                        "(default: 8x7)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("20m"),
                   metavar="DURATION", help="wall-clock time for init and distillation, e.g. "
                                            "10m, 1h (default: 20m)")
    p.add_argument("--corpus", default=None, metavar="PATH|demo",
                   help="required: unlabeled text like the text the model will embed (a text/"
                        "JSONL/Parquet file or folder); it decides the quality more than any "
                        "other setting. 'demo' picks the built-in archaic-English demo corpus "
                        "(KJV, Shakespeare, WordNet) knowingly: measured on all-MiniLM-L6-v2 "
                        "it keeps far less of the FFNs' gain than modern text")
    p.add_argument("--layerwise-share", type=float, default=0.4, metavar="F",
                   help="share of the time after init for the layer-by-layer phase (default 0.4)")
    p.add_argument("--layerwise-loss", choices=("output", "post-norm"), default="output",
                   help="layer-by-layer phase: match each block's output, or the layer's output "
                        "after the residual sum and LayerNorm (post-norm)")
    p.add_argument("--init-inputs", choices=("teacher", "student"), default="teacher",
                   help="fit each block's init on the dense model's inputs (teacher) or, layer "
                        "by layer, on the student's own (student: later blocks also correct "
                        "earlier blocks' errors)")
    p.add_argument("--end-to-end-layers", choices=("last", "all"), default="last",
                   help="end-to-end phase: hidden-state loss on the last layer or on every "
                        "layer's output (plus the pooled-embedding cosine)")
    p.add_argument("--similarity-weight", type=float, default=0.0, metavar="W",
                   help="end to end, also match the pairwise cosine similarities of each "
                        "batch's pooled embeddings to the dense model's, with weight W "
                        "(relative squared error; default 0: off)")
    p.add_argument("--teacher-cache", type=float, default=4.0, metavar="GB",
                   help="memory for the dense model's end-to-end targets, kept so later epochs "
                        "over the corpus skip its forward pass (--end-to-end-layers last only; "
                        "0: off; default 4)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-len", type=positive_int, default=128, help="tokens per text at most")
    p.add_argument("--max-documents", type=positive_int, default=None,
                   help="read at most this many documents of the corpus")
    p.add_argument("--lr-layerwise", type=float, default=1e-3)
    p.add_argument("--lr-fff", type=float, default=3e-4, help="FFF learning rate end to end")
    p.add_argument("--lr-rest", type=float, default=0.0,
                   help="learning rate of the non-FFN weights end to end (default 0: frozen, "
                        "bit-identical to the source; >0 also tunes attention/norms/embeddings)")
    p.add_argument("--init-tokens", type=positive_int, default=16384,
                   help="tokens per layer the init fits on (default 16384)")
    p.add_argument("--init-split", choices=["neuron", "median"], default="neuron",
                   help="node splits where its dense neuron fires (neuron) or at its median")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=parse_duration, default=parse_duration("5m"),
                   metavar="DURATION", help="checkpoint period (default 5m)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="optimizer steps per phase instead of the time left after init "
                        "(reproducible runs; default: the budget decides)")
    p.add_argument("--routing-schedule", choices=("hard", "soft-to-hard"), default="hard",
                   help="routing while distilling: hard throughout (default), or soft (every "
                        "node weighted by the chance of reaching it) annealed to hard; the "
                        "saved model is hard-routed either way")
    p.add_argument("--soft-temperature", type=float, default=0.25, metavar="T",
                   help="soft-to-hard: starting temperature, in units of each node's RMS logit "
                        "(default 0.25), falling linearly to 0 at --hard-from")
    p.add_argument("--hard-from", type=float, default=0.8, metavar="F",
                   help="soft-to-hard: share of the distillation (both phases) after which "
                        "routing is hard (default 0.8)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Convert and print a summary."""
    import torch

    from ..convert.pipeline import ConvertSettings
    from ..convert.pipeline import run as convert

    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    settings = ConvertSettings(
        source=args.source, out=args.out, fff=args.fff, budget_s=args.budget, corpus=args.corpus,
        layerwise_share=args.layerwise_share, layerwise_space=args.layerwise_loss,
        e2e_layers=args.end_to_end_layers, init_inputs=args.init_inputs,
        teacher_cache_gb=args.teacher_cache, similarity_weight=args.similarity_weight,
        batch_size=args.batch_size, max_len=args.max_len,
        max_documents=args.max_documents, init_tokens=args.init_tokens,
        init_split=args.init_split, lr_layerwise=args.lr_layerwise, lr_fff=args.lr_fff,
        lr_rest=args.lr_rest, seed=args.seed, save_every_s=args.save_every, resume=args.resume,
        progress=not args.no_progress, max_steps=args.steps,
        routing_schedule=args.routing_schedule, soft_temperature=args.soft_temperature,
        hard_from=args.hard_from)
    report = convert(settings)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    held = report.heldout
    errors = ", ".join(f"{e:.3f}" for e in held["block_error"])
    print(f"converted {args.source} -> {args.out}: FFF {args.fff}, "
          f"{report.active_fraction:.1%} of the dense FFN's multiply-adds per token")
    print(f"init {report.init_s:.0f} s; " + "; ".join(
        f"{name} {p.get('steps', 0)} steps" for name, p in report.phases.items()))
    print(f"held-out ({held['rows']} texts): block relative error [{errors}]")
    print(f"held-out pooled-embedding cosine to the dense model {held['pooled_cosine']:.4f} "
          f"(FFN blocks removed: {held['removed_pooled_cosine']:.4f}; "
          f"{held['pooled_cosine_kept']:.0%} of the way from removed to dense)")
    if report.quality_warning:
        print(f"WARNING: {report.quality_warning}", file=sys.stderr)
    print(f"load it with ultrafastbert.from_pretrained({str(args.out)!r}); report in "
          f"{args.out / 'conversion.json'}")
    return 0


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
