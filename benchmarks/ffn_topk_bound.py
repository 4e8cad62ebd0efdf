#!/usr/bin/env python3
"""How much of a dense FFN a few neurons per token can carry: the bound on any conversion.

For a source model (e.g. all-MiniLM-L6-v2) on held-out text, per layer, over each token's dense
feed-forward output (bias excluded):

- **per-token oracle top-k**: keep, for every token separately, the ``k`` dense neurons with the
  largest contributions ``|GELU(a_j)| * |w2_j|`` and drop the rest (no router chooses better
  than this token by token; output rows unchanged). Reported as the relative squared error of
  the output, and as the error of the layer's output after its residual sum and LayerNorm
  relative to removing the block (``post-norm``: 1.0 = as bad as no FFN at all);
- **FFF KxD init** (``--init``): the project's initialisation (``convert.init.init_block``, 16,384
  sample tokens of the same text, disjoint from the held-out ones) measured the same way;
- converted models (``--models DIR ...``): their blocks on the same (teacher's) inputs, after
  distillation (the held-out texts come from the corpus, which the distillation may have read);
- the number of neurons with ``|GELU| > 0.05`` per token (how spread the dense output is).

Tokens are split as the conversion's held-out report splits them (``convert.pipeline.heldout_set``:
each text's first and last token, [CLS] and [SEP], against the rest): all-MiniLM's
[CLS] carries a massive activation (one dimension near 190 in layer 0) that dominates
all-token figures, so the bound is read on the ordinary tokens.

    .venv/bin/python benchmarks/ffn_topk_bound.py --source $MINILM --corpus TEXT \\
        --init 8x7 --out benchmarks/results/minilm_ffn_topk_bound
"""
import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrafastbert import from_pretrained
from ultrafastbert.bench.common import environment
from ultrafastbert.convert.data import load_segments
from ultrafastbert.convert.init import init_block
from ultrafastbert.convert.pipeline import collect_inputs, heldout_set, post_norm_error
from ultrafastbert.convert.source import load_source, make_student, parse_fff
from ultrafastbert.model.converted import FAMILIES, dense_ffns, fff_blocks
from ultrafastbert.utils.io import atomic_write_json

KS = (12, 64, 128, 256, 512)


def errors(pred: torch.Tensor, target: torch.Tensor, x: torch.Tensor, b2: torch.Tensor,
           norm: Any) -> dict[str, float]:
    """Relative squared error of ``pred`` against ``target`` (both bias-free, ``(T, d)``) and
    the post-norm error relative to removing the block (``convert.pipeline.post_norm_error``)."""
    rel = (pred - target).pow(2).sum() / target.pow(2).sum()
    return {"rel": round(float(rel), 4),
            "post_norm": round(post_norm_error(pred + b2, x, target + b2, norm), 4)}


@torch.no_grad()
def oracle(a: torch.Tensor, w2: torch.Tensor, k: int) -> torch.Tensor:
    """``(T, d)``: each token's ``k`` largest contributions of activations ``a`` ``(T, W)``
    through output rows ``w2`` ``(W, d)``."""
    idx = (a.abs() * w2.norm(dim=1)).topk(k, dim=1).indices
    return (a * torch.zeros_like(a).scatter_(1, idx, 1.0)) @ w2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--held-out", type=int, default=128, help="texts measured on")
    p.add_argument("--init", default=None, help="also measure the FFF init of this KxD")
    p.add_argument("--models", type=Path, nargs="*", default=[],
                   help="converted model dirs whose blocks to measure the same way")
    p.add_argument("--init-tokens", type=int, default=16384, help="sample tokens of the init")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = load_source(args.source)
    pad_id = int(src.model.config.pad_token_id or 0)
    rows = load_segments(args.corpus, src.tokenizer_dir, max_len=128, max_documents=40000,
                         pad_id=pad_id)
    order = np.random.default_rng(1).permutation(len(rows))
    held = heldout_set(src, rows[order[:args.held_out]], pad_id)
    xs, ys, ordinary, norms = held.xs, held.ys, held.ordinary, held.norms
    dense = dense_ffns(src.model, FAMILIES[src.family])
    converted = {d.name: fff_blocks(from_pretrained(d)) for d in args.models}
    blocks = None
    if args.init:
        fit_x = collect_inputs(src.model, rows[order[args.held_out:]], args.init_tokens, pad_id,
                               32)
        blocks = fff_blocks(make_student(src, parse_fff(args.init, len(dense))))
    layers = []
    with torch.no_grad():
        for i, ffn in enumerate(dense):
            x, y = xs[i][ordinary], ys[i][ordinary]
            b2 = ffn.b2.float()
            a = torch.nn.functional.gelu(x @ ffn.w1.T + ffn.b1)
            w2 = ffn.w2.T.float()
            row = {"layer": i, "ordinary_tokens": int(ordinary.sum()),
                   "neurons_above_0.05": round(float((a.abs() > 0.05).float().sum(1).mean()), 1),
                   "special_tokens_share_of_output_energy": round(float(
                       1 - (ys[i][ordinary] - b2).pow(2).sum() / (ys[i] - b2).pow(2).sum()), 4),
                   "oracle": {str(k): errors(oracle(a, w2, k), y - b2, x, b2, norms[i])
                              for k in KS if k <= a.shape[1]}}
            if blocks is not None:
                started = time.monotonic()
                init_block(blocks[i], ffn, fit_x[i], split="neuron")
                row["init"] = {"fff": args.init, "seconds": round(time.monotonic() - started, 1),
                               **errors(blocks[i](x) - b2, y - b2, x, b2, norms[i])}
            row["models"] = {name: errors(bl[i](x) - b2, y - b2, x, b2, norms[i])
                             for name, bl in converted.items()}
            layers.append(row)
            print(row, flush=True)
    env = environment(dtypes=["float32"])
    env.update({"source": str(args.source), "corpus": str(args.corpus),
                "held_out_texts": args.held_out})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bound.json", {"environment": env, "layers": layers})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
