"""``ultrafastbert pretrain``: MLM pretraining with the crammed recipe.

Also runnable as ``python -m ultrafastbert.cli.pretrain ARGS`` (and under ``torchrun``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from ..errors import InputError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``24h``, ``1h30m``, ``1.5h`` -> seconds (> 0)."""
    cleaned = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: give a number with a unit, e.g. 90s, 5m, 24h, 1h30m")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be > 0, got {text!r}")
    return seconds


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """``500`` -> every 500 steps; ``30m`` -> every 30 minutes of training."""
    if text.strip().isdigit():
        steps = int(text)
        if steps < 1:
            raise argparse.ArgumentTypeError("--save-every must be >= 1 step")
        return steps, None
    return None, parse_duration(text)


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Corpus and tokenizer flags (docs/pretraining.md)."""
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None, metavar="PATH|demo",
                   help="text file/folder, .jsonl, .parquet, saved HF dataset (default: demo)")
    g.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / column holding the text (default: text)")
    g.add_argument("--split", default="train", help="split of a saved DatasetDict (default: train)")
    g.add_argument("--text-unit", default="line", choices=["line", "paragraph"],
                   help="what a document is in plain-text files (default: line)")
    g.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"],
                   help="non-UTF-8 bytes: error (default) or U+FFFD")
    g.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="an existing tokenizer.json (default: reuse OUT/tokenizer.json, else the "
                        "shipped demo tokenizer for the demo corpus at vocab 32768, else train "
                        "one)")
    g.add_argument("--vocab-size", type=positive_int, default=None, metavar="N",
                   help="model vocabulary, and the size of a newly trained tokenizer "
                        "(default: the preset's)")
    g.add_argument("--seq-len", type=positive_int, default=128, metavar="N",
                   help="tokens per packed sequence (default: 128)")
    g.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="packed-corpus cache (default: $ULTRAFASTBERT_CACHE/packed or "
                        "~/.cache/ultrafastbert/packed)")
    g.add_argument("--heldout-rows", type=int, default=256, metavar="N",
                   help="sequences held out for the final MLM evaluation (default: 256)")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Recipe, duration, checkpoint and runtime flags."""
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--budget", type=parse_duration, default=None, metavar="DURATION",
                        help="train for this wall-clock time, e.g. 5m or 24h (the paper); the "
                             "schedule follows elapsed time / budget")
    length.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                        help="train for N optimizer steps; the schedule follows step / N, so "
                             "runs are reproducible")
    g.add_argument("--seed", type=int, default=0, help="model init, data order, masks (0)")
    g.add_argument("--batch-size", type=positive_int, default=8192, metavar="N",
                   help="sequences per optimizer step at the end of the batch ramp, over all "
                        "processes (default: 8192)")
    g.add_argument("--micro-batch", type=positive_int, default=128, metavar="N",
                   help="sequences per forward pass over all processes; the ramp starts here "
                        "(default: 128)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--save-every", type=parse_save_every, default=(None, 1800.0),
                   metavar="N|DURATION",
                   help="periodic checkpoint every N steps or every DURATION of training "
                        "(default: 30m); the final checkpoint is always written")
    g.add_argument("--keep-checkpoints", type=positive_int, default=1, metavar="N",
                   help="checkpoints kept (the newest; default: 1)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    g.add_argument("--device", default="auto",
                   help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--prepare-only", action="store_true",
                   help="tokenize and pack the corpus, then stop (continue later with --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand."""
    p = sub.add_parser(
        "pretrain", help="pretrain an MLM with the crammed recipe",
        description="Masked-language-model pretraining with the crammed recipe: AdamW "
                    "(1e-3, 0.9/0.98, eps 1e-12, wd 0.01), clip 0.5, lr factor "
                    "min(0.25 + p, 4 - 4p), batch ramped to --batch-size over the first 60%. "
                    "Give exactly one of --budget and --max-steps. OUT becomes a model "
                    "directory (from_pretrained, glue --model OUT) with metrics.jsonl, "
                    "checkpoints/, loss_curve.png and summary.json.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", metavar="NAME",
                       help="model preset, e.g. tiny-fff, tiny-dense, ultrafastbert-1x11, "
                            "crammedbert-4095")
    model.add_argument("--config", type=Path, metavar="FILE",
                       help="a ModelConfig JSON file instead of a preset")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory (new, or the run to --resume)")
    add_data_arguments(p)
    add_training_arguments(p)
    p.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace):
    """``PretrainSettings`` from parsed arguments (errors name the flag)."""
    from ..model import ModelConfig
    from ..train.pretrain import PretrainSettings
    from ..train.recipe import CrammedRecipe

    if args.budget is None and args.max_steps is None:
        raise InputError("give --budget (e.g. 24h, the paper's setting) or --max-steps N")
    if args.preset is not None:
        model, name = ModelConfig.from_preset(args.preset), args.preset
    else:
        model, name = model_config_file(args.config), args.config.stem
    if args.vocab_size is not None:
        model = model.replace(vocab_size=args.vocab_size)
    recipe = CrammedRecipe(lr=args.lr, micro_batch=args.micro_batch,
                           target_batch=args.batch_size)
    every_steps, every_s = args.save_every
    return PretrainSettings(
        out_dir=args.out, model=model, model_name=name, corpus=args.corpus,
        text_field=args.text_field, split=args.split, text_unit=args.text_unit,
        encoding_errors=args.encoding_errors, tokenizer=args.tokenizer, seq_len=args.seq_len,
        cache_dir=args.cache_dir, recipe=recipe, max_steps=args.max_steps, budget_s=args.budget,
        seed=args.seed, heldout_rows=args.heldout_rows, precision=args.precision,
        save_every_steps=every_steps, save_every_s=every_s,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, device=args.device,
        compile=args.compile, progress_bar=not args.no_progress, prepare_only=args.prepare_only)


def model_config_file(path: Path):
    """The ``ModelConfig`` of ``--config FILE``: a config as ``ModelConfig.to_dict`` writes it,
    or a model directory's ``config.json`` (the same rule for keys as ``from_pretrained``)."""
    from ..errors import NotFoundError
    from ..model.checkpoint import config_from_json
    from ..utils.jsonfile import read_json_object

    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise NotFoundError(f"--config {path} does not exist; give a ModelConfig JSON file or "
                            "use --preset NAME")
    return config_from_json(read_json_object(path, "model config"), path)


def run(args: argparse.Namespace) -> int:
    """Pretrain and print the summary (rank 0)."""
    from ..errors import Interrupted
    from ..train import pretrain

    try:
        result = pretrain.run(settings_from_args(args))
    except Interrupted as err:
        raise Interrupted(f"{err}. Continue with: {shlex.join(resume_command())}") from None
    if result.train is None and result.summary:
        print(f"prepared {result.summary['sequences']:,} sequences in "
              f"{result.summary['packed']}; start training with the same command and --resume")
    elif result.summary:
        print(format_summary(result))
    return 0


def resume_command(argv: list[str] | None = None) -> list[str]:
    """The command line that continues this run: the one given, with ``--resume``."""
    argv = list(sys.argv if argv is None else argv)
    if "pretrain" in argv[1:]:
        command = ["ultrafastbert", *argv[argv.index("pretrain", 1):]]
    else:  # python -m ultrafastbert.cli.pretrain ARGS
        command = ["python", "-m", "ultrafastbert.cli.pretrain", *argv[1:]]
    return command if "--resume" in command else [*command, "--resume"]


def format_summary(result) -> str:
    """Human-readable end-of-run report."""
    s, out = result.summary, result.out_dir
    lines = [f"pretrained {s['model']} ({s['parameters'] / 1e6:.1f} M parameters): "
             f"{s['steps']:,} steps, {s['tokens'] / 1e6:.2f} M tokens, "
             f"{s['train_seconds']:.0f} s, {s['tokens_per_s']:,.0f} tokens/s ({s['device']})"
             + (f", final training loss {s['final_train_loss']:.3f}"
                if s["final_train_loss"] is not None else "")]
    if result.heldout is not None:
        h, u = result.heldout, result.unigram
        lines += [f"held-out MLM ({h.n_sequences} sequences, {h.n_targets:,} masked tokens):",
                  f"  model    loss {h.loss:.3f}  accuracy {h.accuracy:6.1%}",
                  f"  unigram  loss {u.loss:.3f}  accuracy {u.accuracy:6.1%}  (baseline)"]
    lines += [f"model directory: {out}  (from_pretrained, glue --model {out})",
              f"metrics: {out / 'metrics.jsonl'}, loss curve: {out / 'loss_curve.png'}"]
    return "\n".join(lines)


def standalone_main(register_fn, command: str, argv: list[str] | None = None) -> int:
    """Run one subcommand without the full CLI (``python -m ultrafastbert.cli.<command>``);
    errors are reported as ``ultrafastbert`` reports them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = [a for a in argv if re.fullmatch(r"-v+|--verbose", a)]
    rest = [a for a in argv if a not in verbose]
    parser = argparse.ArgumentParser(prog="ultrafastbert")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register_fn(parser.add_subparsers(dest="command", required=True))
    from . import run_handler

    return run_handler(parser.parse_args([*verbose, command, *rest]))


def main(argv: list[str] | None = None) -> int:
    """``python -m ultrafastbert.cli.pretrain ARGS``."""
    return standalone_main(register, "pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
