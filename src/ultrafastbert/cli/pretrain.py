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
from ..utils import options
from .options import add_options, argparse_type, section, when_used
from .options import settings_from_args as build_settings

#: ``90s``, ``5m``, ``24h``, ``1h30m`` -> seconds, as an argparse type.
parse_duration = argparse_type(options.parse_duration)
#: An int >= 1, as an argparse type.
positive_int = argparse_type(options.positive_int)


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """``500`` -> every 500 steps; ``30m`` -> every 30 minutes of training."""
    if text.strip().isdigit():
        steps = int(text)
        if steps < 1:
            raise argparse.ArgumentTypeError("--save-every must be >= 1 step")
        return steps, None
    return None, parse_duration(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``PretrainSettings``, and --preset / --config, --vocab-size and
    --save-every, which the command line turns into settings fields itself."""
    from ..train.pretrain import PretrainSettings

    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", metavar="NAME",
                       help="model preset, e.g. tiny-fff, tiny-dense, ultrafastbert-1x11, "
                            "crammedbert-4095")
    model.add_argument("--config", type=Path, metavar="FILE",
                       help="a ModelConfig JSON file instead of a preset")
    add_options(p, PretrainSettings)
    section(p, "data").add_argument("--vocab-size", type=positive_int, default=None, metavar="N",
                   help="model vocabulary, and the size of a newly trained tokenizer "
                        "(default: the preset's)")
    every = options.default_of(PretrainSettings, "save_every_s")
    section(p, "training").add_argument("--save-every", type=parse_save_every, default=None, metavar="N|DURATION",
                   help="periodic checkpoint every N steps or every DURATION of training "
                        f"(default: {options.format_duration(every)}); the final checkpoint "
                        "is always written")


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
    when_used(p, lambda: add_arguments(p), "train")
    p.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace):
    """``PretrainSettings`` from parsed arguments (errors name the flag)."""
    from ..model import ModelConfig
    from ..train.pretrain import PretrainSettings

    if args.budget_s is None and args.max_steps is None:
        raise InputError("give --budget (e.g. 24h, the paper's setting) or --max-steps N")
    if args.preset is not None:
        model, name = ModelConfig.from_preset(args.preset), args.preset
    else:
        model, name = model_config_file(args.config), args.config.stem
    if args.vocab_size is not None:
        model = model.replace(vocab_size=args.vocab_size)
    given: dict = {"model": model, "model_name": name}
    if args.save_every is not None:
        given["save_every_steps"], given["save_every_s"] = args.save_every
    return build_settings(PretrainSettings, args, **given)


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
    from .options import CommandParser

    parser = CommandParser(prog="ultrafastbert")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register_fn(parser.add_subparsers(dest="command", required=True))
    from . import run_handler

    return run_handler(parser.parse_args([*verbose, command, *rest]))


def main(argv: list[str] | None = None) -> int:
    """``python -m ultrafastbert.cli.pretrain ARGS``."""
    return standalone_main(register, "pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
