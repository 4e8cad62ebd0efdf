"""The command line: every subcommand has help; kernels lists the dispatcher's view."""

import subprocess
import sys

import pytest

from ultrafastbert.cli import COMMAND_MODULES, build_parser, main


def test_kernels_command_lists_every_implementation(capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "native" in out and "triton" in out


@pytest.mark.parametrize("command", [m for m in COMMAND_MODULES])
def test_every_command_has_help(command, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_module_runs():
    out = subprocess.run([sys.executable, "-m", "ultrafastbert.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "kernels" in out.stdout


def test_import_needs_only_torch_and_numpy():
    code = ("import sys, ultrafastbert, ultrafastbert.fff; "
            "bad = [m for m in ('transformers', 'tokenizers', 'triton', 'matplotlib', 'ninja', "
            "'safetensors', 'datasets') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def _run_with_handler(handler, argv=("kernels",)):
    import argparse

    from ultrafastbert.cli import run_handler
    return run_handler(argparse.Namespace(verbose=0, command=argv[0], handler=handler))


def test_library_errors_are_one_line(capsys):
    from ultrafastbert.errors import InputError, NotFoundError, RunError

    for err in (InputError("bad --top-k 0; pass a number >= 1"),
                NotFoundError("no such model directory"), RunError("the loss is nan")):
        def handler(args, err=err):
            raise err
        assert _run_with_handler(handler) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"ultrafastbert kernels: error: {err}"]


@pytest.mark.parametrize("exc", [RuntimeError, TypeError, ValueError, KeyError, FileNotFoundError])
def test_other_errors_keep_their_traceback(exc):
    # A builtin error that the library did not raise on purpose is a bug: it must not be
    # reduced to one line (negative control for the test above).
    def handler(args):
        raise exc("internal failure")
    with pytest.raises(exc, match="internal failure"):
        _run_with_handler(handler)


def test_a_bad_flag_value_from_the_library_is_one_line(tmp_path, capsys):
    # A real command: a missing model directory is the library's NotFoundError.
    status = main(["predict", "embed", str(tmp_path / "missing"), "text"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("ultrafastbert predict: error: ") and len(err.strip().splitlines()) == 1
