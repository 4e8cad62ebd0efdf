"""UltraFastBERT-1x11 on the fast inference path against Hugging Face ``BertModel``, 8 x 128.

Issue 20's model-level targets: at 8 sequences of 128 tokens, UltraFastBERT-1x11 (the paper's
crammedBERT with one FFF tree of depth 11, random init: speed does not depend on the weights)
through :func:`ultrafastbert.infer.fast.fast_encoder` (fused QKV, prepacked linears, the FFF
kernel; at 8x128 there is no padding to skip) at float32, bfloat16 and int8, against
``BertModel`` (bert-base, same width and depth) as shipped and on the same prepacked oneDNN
linears as ours (``hf-bert-base-onednn``), in float32 and bfloat16, all timed in interleaved
rounds in this process.

Checked before timing: the float32 fast path against the model's own forward (every FFF
block's routes on the inputs it gets, then the final hidden states); bfloat16 and int8 by the
mean cosine of the final hidden states to float32 (reported; routes change at low precision).

    .venv/bin/python benchmarks/fast_encoder_8x128.py --threads 2 --repeats 9 \
        --out benchmarks/results/fast_encoder_8x128
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ultrafastbert.bench.common import environment, write_results
from ultrafastbert.bench.model import (
    FFF_MODEL,
    HF_MODEL,
    HF_PACKED,
    build_model,
    random_ids,
    time_interleaved,
)
from ultrafastbert.fff import FFF
from ultrafastbert.infer.fast import fast_encoder
from ultrafastbert.infer.packing import Packing


def _fff_routes(model: torch.nn.Module, run: Any) -> list[torch.Tensor]:
    """Visited nodes of every FFF block on the inputs it gets while ``run()`` runs."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, _o: seen.append(
        mod.forward_with_nodes(args[0].reshape(-1, args[0].shape[-1]))[1]))
        for m in model.modules() if isinstance(m, FFF)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def check(model: torch.nn.Module, encoders: dict[str, Any], ids: torch.Tensor,
          packing: Packing) -> dict[str, Any]:
    """Routes, then values of the float32 fast path against the model; cosines of the others."""
    flat = packing.pack(ids)
    want_routes = _fff_routes(model, lambda: model(ids))
    got_routes = _fff_routes(model, lambda: encoders["float32"].hidden(flat, packing))
    agree = [float((a == b).all(-1).float().mean()) for a, b in zip(want_routes, got_routes,
                                                                       strict=True)]
    with torch.inference_mode():
        want = model(ids)
        want = (want.last_hidden_state if hasattr(want, "last_hidden_state") else want)
        want = packing.pack(want.float())
        report: dict[str, Any] = {"fff_blocks": len(agree), "route_agreement_min": min(agree)}
        for name, enc in encoders.items():
            got = enc.hidden(flat, packing).float()
            report[f"{name}_cosine"] = float(torch.nn.functional.cosine_similarity(
                got, want, dim=-1).mean())
            if name == "float32":
                report["float32_max_abs_error"] = float((got - want).abs().max())
    if report["route_agreement_min"] < 0.999 or report["float32_cosine"] < 0.9999:
        raise SystemExit(f"fast path does not match the model, not timing it: {report}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(FFF_MODEL, torch.float32, "cpu", args.seq_len)
    ids = random_ids(model, args.batch, args.seq_len, "cpu", seed=0)
    packing = Packing.from_mask(torch.ones_like(ids))
    flat = packing.pack(ids)
    encoders = {p: fast_encoder(model, p) for p in ("float32", "bfloat16", "int8")}
    checks = check(model, encoders, ids, packing)
    print(json.dumps(checks, indent=1))

    def fast(enc: Any) -> Any:
        def call() -> Any:
            with torch.inference_mode():
                return enc.hidden(flat, packing)
        return call

    def plain(m: torch.nn.Module) -> Any:
        own = random_ids(m, args.batch, args.seq_len, "cpu", seed=0)  # its own vocabulary

        def call() -> Any:
            with torch.inference_mode():
                return m(own)
        return call

    fns = {f"{FFF_MODEL} fast {p}": fast(e) for p, e in encoders.items()}
    fns[f"{FFF_MODEL} forward float32"] = plain(model)
    for name in (HF_MODEL, HF_PACKED):
        for dtype in (torch.float32, torch.bfloat16):
            fns[f"{name} {str(dtype)[6:]}"] = plain(build_model(name, dtype, "cpu",
                                                                args.seq_len))
    settings = argparse.Namespace(warmup=1, repeats=args.repeats, max_seconds=60.0,
                                  device="cpu")
    samples = time_interleaved(fns, settings)  # type: ignore[arg-type]
    ms = {n: 1000 * statistics.median(s) for n, s in samples.items()}
    rows = [{"model": n, "ms": round(v, 2), "tokens_per_s": round(
        args.batch * args.seq_len / v * 1000)} for n, v in ms.items()]
    for row in rows:
        for base in fns:
            if base.startswith("hf-"):
                row[f"vs {base}"] = round(ms[base] / ms[row["model"]], 3)
    for row in rows:
        print(row)
    if args.out:
        env = environment(dtypes=["float32", "bfloat16", "int8"])
        write_results(args.out, "fast_encoder_8x128", rows, env, {"checks": checks})


if __name__ == "__main__":
    main()
