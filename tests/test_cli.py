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
