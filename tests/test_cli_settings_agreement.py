"""Options defined once: every command's options come from its settings dataclass, with the
settings' defaults; a command line that disagrees with its settings fails here."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from ultrafastbert.cli import bench as bench_cli
from ultrafastbert.cli import build_parser
from ultrafastbert.cli import convert as convert_cli
from ultrafastbert.cli import demo as demo_cli
from ultrafastbert.cli import glue as glue_cli
from ultrafastbert.cli import pretrain as pretrain_cli
from ultrafastbert.cli.options import (
    CommandParser,
    add_options,
    disagreements,
    settings_from_args,
)
from ultrafastbert.utils.options import format_duration, not_options, option, parse_duration


def command_parser(*names: str) -> argparse.ArgumentParser:
    """The parser of ``ultrafastbert NAME [KIND]`` (argparse keeps subparsers in an action)."""
    parser: argparse.ArgumentParser = build_parser()
    for name in names:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


def _convert():
    from ultrafastbert.convert.pipeline import ConvertSettings

    return ConvertSettings


def _pretrain():
    from ultrafastbert.train.pretrain import PretrainSettings

    return PretrainSettings


def _glue():
    from ultrafastbert.glue import GlueRunSettings

    return GlueRunSettings


def _demo():
    from ultrafastbert.demo.convert_demo import DemoSettings

    return DemoSettings


def _serve():
    pytest.importorskip("fastapi")
    from ultrafastbert.serve.config import ServeConfig

    return ServeConfig


def _bench_ff():
    from ultrafastbert.bench.ff import BenchSettings

    return BenchSettings


def _bench_model():
    from ultrafastbert.bench.model import ModelBenchSettings

    return ModelBenchSettings


def _serve_config(args):
    from ultrafastbert.cli.serve import serve_config

    return serve_config(args)


def _tiny_fff():
    from ultrafastbert.model import ModelConfig

    return ModelConfig.from_preset("tiny-fff")


#: command -> (its settings class, the arguments it requires, how it builds its settings,
#: the settings it must build from them (the fields given; the rest: the class's defaults),
#: the fields that are not options: set by the library, or derived by the command line).
COMMANDS = {
    "convert": (_convert, ["convert", "src", "--out", "out", "--corpus", "demo"],
                convert_cli.convert_settings,
                lambda: dict(source=Path("src"), out=Path("out"), corpus="demo"),
                set()),
    "pretrain": (_pretrain, ["pretrain", "--preset", "tiny-fff", "--out", "o", "--budget", "1m"],
                 pretrain_cli.settings_from_args,
                 lambda: dict(model=_tiny_fff(), model_name="tiny-fff", out_dir=Path("o"),
                              budget_s=60.0),
                 {"model", "model_name", "save_every_steps", "save_every_s", "recipe.betas",
                  "recipe.eps", "recipe.weight_decay", "recipe.grad_clip",
                  "recipe.ramp_fraction"}),
    "glue": (_glue, ["glue", "--model", "m", "--glue-dir", "g", "--out", "o"],
             glue_cli.settings_from_args,
             lambda: dict(model_dir=Path("m"), glue_dir=Path("g"), out_dir=Path("o")),
             {"protocol.betas", "protocol.eps", "protocol.weight_decay", "protocol.grad_clip",
              "protocol.pooler", "protocol.subset_seed", "runtime.eval_batch_size"}),
    "demo": (_demo, ["demo", "--out", "o"], demo_cli.convert_settings,
             lambda: dict(out=Path("o")),
             {"out", "train_documents", "batch_size", "init_tokens"}),
    "serve": (_serve, ["serve", "models/mlm"], _serve_config,
              lambda: dict(model_name="mlm"), {"model_name", "max_top_k", "api_keys"}),
    "bench ff": (_bench_ff, ["bench", "ff"], bench_cli.ff_settings, dict, {"seed"}),
    "bench model": (_bench_model, ["bench", "model"], bench_cli.model_settings, dict, {"seed"}),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_one_argument_with_the_settings_default(command):
    settings_class, argv, _, _, _ = COMMANDS[command]
    cls = settings_class()
    assert disagreements(command_parser(*command.split()), cls) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_options_given_builds_the_settings_defaults(command, monkeypatch):
    monkeypatch.delenv("ULTRAFASTBERT_API_KEY", raising=False)
    settings_class, argv, build, given, _ = COMMANDS[command]
    cls = settings_class()
    built = build(build_parser().parse_args(argv))
    assert built == cls(**given())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_settings_field_is_an_option_unless_declared(command):
    """A new settings field must either be an option or be listed here on purpose."""
    settings_class, _, _, _, not_offered = COMMANDS[command]
    assert set(not_options(settings_class())) == not_offered


# ----------------------------------------------------------------------- negative controls
@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = option(help="required")
    budget_s: float = option(1200.0, flags="--budget", parse=parse_duration,
                             show=format_duration, help="time")
    seed: int = option(0, help="seed")
    note: str = "library only"


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, Toy)
    return parser


def test_generated_options_agree_and_show_the_settings_default():
    parser = toy_parser()
    assert disagreements(parser, Toy) == []
    assert settings_from_args(Toy, parser.parse_args(["--name", "x"])) == Toy(name="x")
    assert "time (default: 20m)" in parser.format_help()
    args = parser.parse_args(["--name", "x", "--budget", "1h", "--seed", "3"])
    assert settings_from_args(Toy, args) == Toy(budget_s=3600.0, seed=3, name="x")
    assert not_options(Toy) == ["note"]


def test_a_hand_written_default_that_drifted_is_caught():
    # The drift the issue found: the command line says 30m, the settings 20m.
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", dest="budget_s", type=parse_duration,
                        default=parse_duration("30m"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", required=True)
    assert disagreements(parser, Toy) == [
        "budget_s: command-line default 1800.0, settings default 1200.0"]
    assert settings_from_args(Toy, parser.parse_args(["--name", "x"])) != Toy(name="x")


def test_a_changed_default_a_missing_option_and_an_optional_required_field_are_caught():
    parser = toy_parser()
    parser.set_defaults(seed=3)
    assert disagreements(parser, Toy) == ["seed: command-line default 3, settings default 0"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", dest="budget_s", type=parse_duration, default=1200.0)
    parser.add_argument("--name", default="x")
    assert disagreements(parser, Toy) == [
        "name: required in the settings, optional on the command line",
        "seed: 0 command-line arguments, want 1"]


def test_an_option_field_cannot_also_be_given():
    with pytest.raises(TypeError, match="is an option"):
        settings_from_args(Toy, toy_parser().parse_args(["--name", "x"]), seed=1)
    with pytest.raises(TypeError, match="not fields of Toy"):
        settings_from_args(Toy, toy_parser().parse_args(["--name", "x"]), typo=1)


def test_a_missing_extra_is_named_when_the_command_is_used(capsys):
    parser = CommandParser(prog="ultrafastbert")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("thing")

    def needs_an_extra():
        raise ModuleNotFoundError("No module named 'nothere'", name="nothere")

    p.defer(needs_an_extra, "hf")
    parser.parse_args([])  # another command: nothing loaded
    with pytest.raises(SystemExit):
        parser.parse_args(["thing"])
    assert "needs the 'hf' extra (nothere is missing)" in capsys.readouterr().err

    def broken_own_import():
        raise ModuleNotFoundError("No module named 'ultrafastbert.nothere'",
                                  name="ultrafastbert.nothere")

    p.defer(broken_own_import, "hf")
    with pytest.raises(ModuleNotFoundError):  # a bug of ours, not a missing extra
        parser.parse_args(["thing"])


def test_bad_values_are_refused_with_the_parsers_message(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--name", "x", "--budget", "soon"])
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_demo_pretrain_shares_pretrains_defaults():
    from ultrafastbert.train.pretrain import PretrainSettings
    from ultrafastbert.utils.options import default_of

    args = build_parser().parse_args(["demo", "pretrain"])
    for name in ("seed", "device", "cache_dir"):
        assert getattr(args, name) == default_of(PretrainSettings, name)


def test_a_flag_that_reads_the_wrong_way_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Backwards:
        progress: bool = option(False, flags="--no-progress", help="no progress bars")

    with pytest.raises(TypeError, match="a False one a flag without --no-"):
        add_options(argparse.ArgumentParser(), Backwards)
