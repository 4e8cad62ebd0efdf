"""``ultrafastbert predict``: fill-mask, embeddings and classification with a saved model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import InputError
from .pretrain import positive_int

TASKS = ("fill-mask", "embed", "classify")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand with one sub-command per task."""
    p = sub.add_parser("predict", help="run a saved model on text (fill-mask, embed, classify)",
                       description="Run a checkpoint directory (ours or the released "
                                   "UltraFastBERT format, with its tokenizer.json) on text.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    fill = tasks.add_parser("fill-mask", help="candidates for each <mask> in a sentence")
    _common(fill)
    fill.add_argument("--top-k", type=positive_int, default=5,
                      help="candidates per mask (default 5)")
    embed = tasks.add_parser("embed", help="sentence embeddings (one row per text)")
    _common(embed)
    embed.add_argument("--pooling", choices=("mean", "first"), default=None,
                       help="default: the model's own (mean for ours; a converted model's source)")
    embed.add_argument("--out", default=None, help="save the (N, d) float32 array as .npy")
    classify = tasks.add_parser("classify", help="labels from a fine-tuned classifier")
    _common(classify)
    classify.add_argument("--pair", action="append", default=None,
                          help="second text of a pair (repeat once per text)")
    for task in (fill, embed, classify):
        task.set_defaults(handler=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("texts", nargs="+", help="input texts ('-' reads one text per line on stdin)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--precision", choices=("float32", "bfloat16", "int8", "auto"), default=None,
                   help="dense linears of embed/classify: auto (default; the fastest that "
                        "passes the accuracy rule here, see `ultrafastbert kernels --model`), "
                        "float32, bfloat16, int8 (bfloat16 when --dtype bfloat16)")
    p.add_argument("--kernel", default="auto",
                   help="FFF implementation: auto, torch, native, triton (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="texts per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return list(args.texts)


def run(args: argparse.Namespace) -> int:
    """Load the model, run the task, print the result."""
    import torch

    from ..infer import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor.from_pretrained(args.model, tokenizer_file=args.tokenizer,
                                          dtype=args.dtype, device=args.device,
                                          kernel=args.kernel, batch_size=args.batch_size,
                                          precision=args.precision)
    texts = _texts(args)
    if args.task == "fill-mask":
        return _fill_mask(predictor, texts, args)
    if args.task == "embed":
        return _embed(predictor, texts, args)
    return _classify(predictor, texts, args)


def _fill_mask(predictor: Any, texts: list[str], args: argparse.Namespace) -> int:
    results = [predictor.fill_mask(text, top_k=args.top_k) for text in texts]
    if args.json:
        print(json.dumps([{"text": r.text, "filled": r.filled,
                           "candidates": [[c.__dict__ for c in mask] for mask in r.candidates]}
                          for r in results], indent=2))
        return 0
    for r in results:
        print(r.filled)
        for i, mask in enumerate(r.candidates):
            ranked = ", ".join(f"{c.token} ({c.probability:.3f})" for c in mask)
            print(f"  mask {i + 1}: {ranked}")
    return 0


def _embed(predictor: Any, texts: list[str], args: argparse.Namespace) -> int:
    vectors = predictor.embed(texts, pooling=args.pooling)
    if args.out:
        import numpy as np

        np.save(args.out, vectors.numpy())
        print(f"wrote {tuple(vectors.shape)} embeddings to {args.out}")
    elif args.json:
        print(json.dumps(vectors.tolist()))
    else:
        for text, row in zip(texts, vectors, strict=True):
            head = " ".join(f"{v:+.3f}" for v in row[:6].tolist())
            print(f"{text[:40]!r:44s} norm {row.norm():.3f}  [{head} ...]")
    return 0


def _classify(predictor: Any, texts: list[str], args: argparse.Namespace) -> int:
    if args.pair is not None and len(args.pair) != len(texts):
        raise InputError(f"give --pair once per text: {len(texts)} texts, {len(args.pair)} pairs")
    results = predictor.classify(texts, args.pair)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return 0
    for text, r in zip(texts, results, strict=True):
        shown = f"{r.value:.4f}" if r.label is None else f"{r.label} ({r.probability:.3f})"
        print(f"{shown:24s} {text}")
    return 0
