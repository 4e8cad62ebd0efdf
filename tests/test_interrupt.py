"""Ctrl-C during training saves a checkpoint, says how to resume, exits without a traceback; the
resumed run gives the same losses as one never interrupted (issue 13, item 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from train_helpers import cli_command, run_args, run_cli, subprocess_env, tiny_run  # noqa: F401
from ultrafastbert.errors import Interrupted
from ultrafastbert.train.checkpoint import latest_checkpoint


def _losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _settings(args: list[str]):
    import argparse

    from ultrafastbert.cli.pretrain import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return settings_from_args(parser.parse_args(["pretrain", *args]))


@pytest.mark.parametrize("at_fetch", [4, 5])  # 5: inside a two-micro-batch step
def test_sigint_saves_and_resume_matches_the_uninterrupted_run(
        at_fetch: int, tiny_run: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """A real SIGINT to this process while it fetches its ``at_fetch``-th micro-batch."""
    import torch

    from ultrafastbert.train import mlm, pretrain

    torch.set_num_threads(2)  # as the stored tiny run
    real, fetched = mlm.MlmBatches.next_batch, []

    def next_batch(self, rank, world_size):
        fetched.append(1)
        if len(fetched) == at_fetch:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, rank, world_size)

    monkeypatch.setattr(mlm.MlmBatches, "next_batch", next_batch)
    out = tmp_path / "out"
    args = run_args(out, tmp_path / "cache")
    with pytest.raises(Interrupted, match=r"interrupted at step (\d+) of 8; saved the "
                                          r"checkpoint \S+step-0000000\1") as err:
        pretrain.run(_settings(args))
    step = int(err.value.args[0].split("step ")[1].split()[0])
    assert latest_checkpoint(out / "checkpoints").step == step == max(_losses(out))
    monkeypatch.setattr(mlm.MlmBatches, "next_batch", real)
    pretrain.run(_settings([*args, "--resume"]))
    assert _losses(out) == _losses(tiny_run)  # bit-identical to the uninterrupted run


def test_ctrl_c_in_a_real_process(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_args(out, cache, "--max-steps", "60", "--save-every", "1000")
    proc = subprocess.Popen(cli_command(*args), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_losses(out)) < 3:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "interrupted at step" in err and "Continue with: python -m ultrafastbert.cli." \
        "pretrain" in err and err.rstrip().endswith("--resume")
    written = _losses(out)
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.step == max(written) < 60
    assert sorted(written) == list(range(1, latest.step + 1))
    run_cli(*args, "--resume")
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 61))
    assert all(resumed[s] == written[s] for s in written)  # nothing already written was lost


def test_ctrl_c_in_glue_keeps_finished_tasks(tmp_path: Path, monkeypatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while fine-tuning the second task: exit 130, no traceback, the first task's
    results kept, the tasks left named."""
    import shutil

    import torch

    from ultrafastbert.cli import main
    from ultrafastbert.glue import data as glue_data
    from ultrafastbert.model import ModelConfig, UltraFastBertForMaskedLM

    fixtures = Path(__file__).parent / "fixtures"
    config = ModelConfig.from_dict(json.loads((fixtures / "train_model.json").read_text()))
    torch.manual_seed(0)
    UltraFastBertForMaskedLM(config).save_pretrained(
        tmp_path / "M", tokenizer_file=fixtures / "train_tokenizer.json")
    glue = shutil.copytree(fixtures / "glue_mini", tmp_path / "glue")
    source = next(c for c in vars(glue_data).values()
                  if isinstance(c, type) and "next_batch" in vars(c))
    real, calls = source.next_batch, []

    def next_batch(self, *args, **kwargs):
        if not calls and len(_results(tmp_path / "out")) == 1:  # into the second task
            calls.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(source, "next_batch", next_batch)
    status = main(["glue", "--model", str(tmp_path / "M"), "--glue-dir", str(glue), "--tasks",
                   "RTE,MRPC", "--out", str(tmp_path / "out"), "--seeds", "1", "--epochs", "1",
                   "--max-length", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 130, err
    assert "Traceback" not in err
    assert "interrupted during MRPC" in err and "keeps the finished task(s) RTE" in err
    assert "--tasks MRPC" in err
    assert list(_results(tmp_path / "out")) == ["RTE"]


def _results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text())["tasks"] if path.is_file() else {}
