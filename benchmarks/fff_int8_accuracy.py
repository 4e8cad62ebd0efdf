"""The accuracy rule for int8 FFF weights on a converted model, without timing anything.

Embeds the first ``--pairs`` STS-B dev pairs with ``Predictor`` at float32, at int8 with the FFF
blocks' weights forced to int8 (whatever the speed measurement would choose), and at int8 with
fp32 FFF weights; reports the mean cosine of each to the float32 path's pooled embeddings, the
STS-B dev Spearman x100, and the FFF route-change rate against float32 (bench.texts).

    PYTHONPATH=src python benchmarks/fff_int8_accuracy.py --model /work/runs/minilm-8x7 \
        --glue /work/shared/glue --pairs 300 [--int8-isa avx512] --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ultrafastbert.bench import texts as bt
from ultrafastbert.bench.common import environment
from ultrafastbert.infer import Predictor
from ultrafastbert.infer import precision as prec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--glue", required=True)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--int8-isa", default=None,
                        help="force the native-int8 path (avx512vnni, avx512, avx2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.int8_isa:  # before the registry's kernel is first loaded
        from ultrafastbert.fff import dispatch

        dispatch.registry()["native-int8"]._isa = args.int8_isa  # type: ignore[attr-defined]
    texts, gold = bt.stsb_dev(args.glue)
    texts, gold = texts[:2 * args.pairs], gold[:args.pairs]
    fp32 = Predictor.from_pretrained(args.model, precision="float32", batch_size=bt.BATCH)
    int8 = Predictor.from_pretrained(args.model, precision="int8", batch_size=bt.BATCH)
    real = prec.fff_weight_format
    prec.fff_weight_format = lambda fff, p: (("int8", "forced for the accuracy check")  # type: ignore[assignment]
                                             if p == "int8" else real(fff, p))
    int8._encoder("int8")  # built now, with int8 FFF weights
    prec.fff_weight_format = real  # type: ignore[assignment]
    fff32 = Predictor.from_pretrained(args.model, precision="int8", batch_size=bt.BATCH)
    os.environ[prec.FFF_INT8_SWITCH] = "0"
    fff32._encoder("int8")
    del os.environ[prec.FFF_INT8_SWITCH]
    embed = {n: bt.embed_all(bt.predictor_embedder(p), texts)
             for n, p in (("float32", fp32), ("int8 (int8 FFF)", int8),
                          ("int8 (fp32 FFF)", fff32))}
    rows = {}
    for name, e in embed.items():
        q = bt.quality(e, embed["float32"], gold)
        rows[name] = {"stsb_spearman": q["stsb_spearman"],
                      "cosine_to_float32": q["cosine_to_dense_fp32"],
                      "fff_route_change_rate": bt.route_change_rate(
                          {"float32": fp32, "int8 (int8 FFF)": int8,
                           "int8 (fp32 FFF)": fff32}[name], fp32, texts[:256])}
        print(name, rows[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": {**environment("cpu"), "command":
                                                       " ".join(sys.argv),
                                                       "int8_isa": args.int8_isa},
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
