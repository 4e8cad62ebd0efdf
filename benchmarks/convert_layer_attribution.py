#!/usr/bin/env python3
"""Where a converted sentence encoder loses its STS-B points: one layer at a time.

For each converted model (``--models DIR ...``) and each layer ``i``, STS-B dev Spearman x100
(the cosine of pooled embeddings, :func:`ultrafastbert.convert.evaluate.sts_spearman`) with

- ``dense_at[i]``: layer ``i``'s FFF block put back to the source's dense block, every other
  layer converted (what converting layer ``i`` costs *inside* the converted model, whose later
  blocks were distilled to correct the earlier ones);
- ``only_fff_at[i]``: layer ``i``'s FFF block alone, every other layer dense (what that block
  costs on its own);

and the mean cosine of the converted model's pooled embeddings to the dense model's on the
STS-B dev sentences (``stsb_pooled_cos``; the conversion's own report reads it on held-out text
of its corpus). Checked first: with every block put back the model scores what the dense
source scores, and with none it scores what the model scores.

    .venv/bin/python benchmarks/convert_layer_attribution.py --source $MINILM \\
        --glue-dir ../shared/glue --models runs/minilm-8x7 --out benchmarks/results/X
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ultrafastbert.bench.common import environment, format_table, write_report
from ultrafastbert.bench.texts import stsb_dev
from ultrafastbert.convert.evaluate import embed_texts, sts_spearman
from ultrafastbert.convert.source import SourceModel, load_source
from ultrafastbert.model.converted import FAMILIES, DenseFFN, dense_ffns, fff_blocks, load_converted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the dense source model")
    p.add_argument("--glue-dir", type=Path, required=True)
    p.add_argument("--models", type=Path, nargs="+", required=True, help="converted models")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", default="")
    return p.parse_args(argv)


@contextlib.contextmanager
def dense_blocks(model: Any, dense: Sequence[DenseFFN], layers: Sequence[int]) -> Iterator[None]:
    """Within the block, ``layers``' FFF blocks compute the source's dense blocks instead."""
    blocks = fff_blocks(model)
    hooks = [blocks[i].register_forward_hook(
        lambda _m, args, _out, ffn=dense[i]: ffn(args[0])) for i in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def attribution(model: Any, source: SourceModel, glue_dir: Path, dense_sts: float,
                dense_emb: torch.Tensor, texts: list[str]) -> dict[str, Any]:
    """One model's row (see the module docstring); raises when the checks fail."""
    dense = dense_ffns(source.model, FAMILIES[source.family])
    n = len(dense)

    def sts() -> float:
        return round(sts_spearman(model, source.tokenizer_dir, glue_dir,
                                  pooling=source.pooling)["spearman"], 2)

    with dense_blocks(model, dense, range(n)):
        restored = sts()
    if abs(restored - dense_sts) > 0.02:
        raise SystemExit(f"check failed: every block put back scores {restored}, the dense "
                         f"source {dense_sts}")
    emb = embed_texts(model, source.tokenizer_dir, texts, pooling=source.pooling)
    row: dict[str, Any] = {
        "stsb": sts(),
        "stsb_pooled_cos": round(float(torch.nn.functional.cosine_similarity(
            emb, dense_emb, dim=-1).mean()), 4)}
    for i in range(n):
        with dense_blocks(model, dense, [i]):
            row[f"dense_at_{i}"] = sts()
        with dense_blocks(model, dense, [j for j in range(n) if j != i]):
            row[f"only_fff_at_{i}"] = sts()
    row["only_fff_loss_sum"] = round(sum(dense_sts - row[f"only_fff_at_{i}"]
                                         for i in range(n)), 2)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    source = load_source(args.source)
    texts = sorted(set(stsb_dev(args.glue_dir)[0]))
    dense_sts = round(sts_spearman(source.model, source.tokenizer_dir, args.glue_dir,
                                   pooling=source.pooling)["spearman"], 2)
    dense_emb = embed_texts(source.model, source.tokenizer_dir, texts, pooling=source.pooling)
    rows = [{"model": "dense", "stsb": dense_sts}]
    for directory in args.models:
        model = load_converted(directory).eval()
        rows.append({"model": directory.name, **attribution(
            model, source, args.glue_dir, dense_sts, dense_emb, texts)})
    n = source.n_layers
    env = {**environment(), "source": str(args.source), "note": args.note,
           "seconds": round(time.monotonic() - started, 1)}
    columns = ["model", "stsb", "stsb_pooled_cos",
               *[f"dense_at_{i}" for i in range(n)], *[f"only_fff_at_{i}" for i in range(n)],
               "only_fff_loss_sum"]
    write_report(args.out, "results", rows, env,
                 "# STS-B with one layer's block put back (dense_at_i) or converted alone "
                 f"(only_fff_at_i)\n\n{format_table(rows, columns)}\n\nCPU: {env['cpu']}, "
                 f"{torch.get_num_threads()} threads, float32. {args.note}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
