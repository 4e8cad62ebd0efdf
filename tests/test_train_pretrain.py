"""Pretraining end to end: stored losses, the output folder, kill -9 and resume, bad input.

Golden losses: ``tests/fixtures/pretrain_golden.json``, made by
``.venv/bin/python tests/test_train_pretrain.py --regenerate`` (the tiny run of
``train_helpers.py``, in one process with 2 threads).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import (
    FIXTURES,
    GOLDEN,
    RUN_ARGS,
    cli_command,
    losses,
    run_args,
    run_cli,
    subprocess_env,
    tiny_run,  # noqa: F401  (fixture)
)
from ultrafastbert.cli.pretrain import main
from ultrafastbert.model import UltraFastBertForMaskedLM, from_pretrained
from ultrafastbert.train.checkpoint import latest_checkpoint, load_checkpoint

#: Tolerance against the stored losses (other CPUs sum in other orders; the run is 8 steps).
GOLDEN_ATOL = 2e-4


# ---------------------------------------------------------------------------- golden run
def test_losses_match_the_stored_values(tiny_run: Path) -> None:  # noqa: F811
    golden = json.loads(GOLDEN.read_text())["losses"]
    got = losses(tiny_run)
    assert len(got) == len(golden) == 8
    assert got == pytest.approx(golden, abs=GOLDEN_ATOL)


def test_golden_check_can_fail(tmp_path: Path) -> None:
    """Negative control: another seed changes the losses by far more than the tolerance."""
    assert main(run_args(tmp_path / "out", tmp_path / "cache", "--seed", "1",
                         "--max-steps", "2", "--heldout-rows", "0")) == 0
    golden = json.loads(GOLDEN.read_text())["losses"]
    step2 = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[1])
    assert abs(step2["loss"] - golden[1]) > 10 * GOLDEN_ATOL


def test_output_is_a_model_directory(tiny_run: Path) -> None:  # noqa: F811
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "loss_curve.png", "summary.json", "run.json"):
        assert (tiny_run / name).is_file(), name
    model = from_pretrained(tiny_run)
    assert isinstance(model, UltraFastBertForMaskedLM)
    assert model.config.hidden_dropout == 0.1  # exported with the fine-tuning dropout
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens"] == (5 * 8 + 3 * 16) * 32
    assert summary["heldout"]["n_targets"] == summary["unigram_baseline"]["n_targets"] > 0
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [8, 8, 8, 8, 8, 16, 16, 16]
    assert latest_checkpoint(tiny_run / "checkpoints").final


def test_exported_weights_are_the_trained_ones(tiny_run: Path) -> None:  # noqa: F811
    exported = from_pretrained(tiny_run)
    info = latest_checkpoint(tiny_run / "checkpoints")
    trained = UltraFastBertForMaskedLM(exported.config)
    load_checkpoint(info, trained)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_resuming_a_finished_run_changes_nothing(tiny_run: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    before = (out / "metrics.jsonl").read_text()
    assert main(run_args(out, tmp_path / "cache", "--resume")) == 0
    assert (out / "metrics.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


# ------------------------------------------------------------------------ kill and resume
def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen, metrics: Path, n_lines: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n_lines:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _assert_checkpoint_complete(out: Path) -> int:
    info = latest_checkpoint(out / "checkpoints")
    assert info is not None
    model = UltraFastBertForMaskedLM(from_config(out))
    state, trainer = load_checkpoint(info, model)  # raises on a torn checkpoint
    assert state["step"] == info.step and "optimizer" in trainer
    return info.step


def from_config(out: Path):
    from ultrafastbert.model import ModelConfig

    settings = json.loads((out / "run.json").read_text())["settings"]
    return ModelConfig.from_dict(settings["model"]).replace(
        embedding_dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0)


@pytest.mark.slow  # integration: CI runs it (make test-slow)
def test_sigkill_then_resume_logs_the_same_losses(tmp_path: Path) -> None:
    """A real ``kill -9`` (twice, with a checkpoint after every step, so kills land inside
    saves too), then ``--resume``: the same per-step losses as an uninterrupted run."""
    cache, steps = tmp_path / "cache", ("--max-steps", "16", "--save-every", "1")
    run_cli(*run_args(tmp_path / "full", cache, *steps))
    out = tmp_path / "killed"
    proc = _start(*run_args(out, cache, *steps))
    _kill_after(proc, out / "metrics.jsonl", 3)
    first = _assert_checkpoint_complete(out)
    proc = _start(*run_args(out, cache, *steps, "--resume"))
    _kill_after(proc, out / "metrics.jsonl", first + 4)
    second = _assert_checkpoint_complete(out)
    assert 0 < first < second < 16
    run_cli(*run_args(out, cache, *steps, "--resume"))
    assert losses(out) == losses(tmp_path / "full")  # bit for bit
    assert len(losses(out)) == 16


# ------------------------------------------------------------------------------ bad input
def _fails(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_empty_corpus(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n  \n")
    err = _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c", "--corpus", str(corpus)))
    assert "no text" in err
    assert not (tmp_path / "out" / "run.json").exists()  # the folder can be used again


def test_corpus_shorter_than_one_sequence(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("in the beginning\n")
    err = _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c", "--corpus", str(corpus)))
    assert "fewer than one sequence" in err


def test_non_utf8_corpus(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    err = _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c", "--corpus", str(corpus)))
    assert "UTF-8" in err
    out = tmp_path / "out"
    assert not (out / "run.json").exists() and not (out / "tokenizer.json").exists()


def without_max_steps(args: list[str]) -> list[str]:
    i = args.index("--max-steps")
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize("budget", ["0s", "0m", "5", "-1h"])
def test_bad_budget(tmp_path: Path, capsys, budget: str) -> None:
    args = without_max_steps(run_args(tmp_path / "out", tmp_path / "c"))
    with pytest.raises(SystemExit) as exc:
        main([*args, f"--budget={budget}"])
    assert exc.value.code == 2
    assert "duration" in capsys.readouterr().err


def test_budget_and_max_steps_are_alternatives(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*run_args(tmp_path / "out", tmp_path / "c"), "--budget", "5m"])
    assert "not allowed with" in capsys.readouterr().err
    args = without_max_steps(run_args(tmp_path / "out", tmp_path / "c"))
    assert "give --budget" in _fails(capsys, *args)


def test_output_folder_with_another_run(tiny_run: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    err = _fails(capsys, *run_args(tiny_run, tmp_path / "c"))
    assert "already holds another run" in err and "--resume" in err
    err = _fails(capsys, *run_args(tiny_run, tmp_path / "c", "--seed", "5", "--resume"))
    assert "seed: 0 -> 5" in err
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before


def test_resume_without_a_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    err = _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c", "--resume"))
    assert "no run to resume" in err


def test_folder_with_other_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "already holds files" in _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path: Path, capsys) -> None:
    err = _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c", "--vocab-size", "500"))
    assert "--vocab-size 1024" in err


def test_sequence_longer_than_the_model(tmp_path: Path, capsys) -> None:
    assert "max_seq_len" in _fails(capsys, *run_args(tmp_path / "out", tmp_path / "c",
                                                      "--seq-len", "64"))


# --------------------------------------------------------------------------- regeneration
def regenerate() -> None:
    """Rerun the tiny run and store its losses in ``pretrain_golden.json``."""
    import tempfile

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        assert main(run_args(out, Path(tmp) / "cache")) == 0
        got = losses(out)
        shutil.rmtree(out)
    record = {
        "command": "python -m ultrafastbert.cli.pretrain " + " ".join(
            a.replace(str(FIXTURES), "tests/fixtures") for a in RUN_ARGS)
        + " --out OUT --cache-dir CACHE  (in one process, torch.set_num_threads(2))",
        "regenerate": ".venv/bin/python tests/test_train_pretrain.py --regenerate",
        "torch": torch.__version__, "losses": got,
    }
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {got}")


if __name__ == "__main__" and "--regenerate" in sys.argv:
    regenerate()
