"""The shared training loop: weighting, schedule, clipping, metrics, checkpoints, resumption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ultrafastbert.data import MlmMasker, SequenceStream
from ultrafastbert.model import ModelConfig, UltraFastBertForSequenceClassification
from ultrafastbert.train import (
    CrammedRecipe,
    LoopConfig,
    MicroBatch,
    Trainer,
    WarmupCosineSchedule,
    latest_checkpoint,
    read_metrics,
)
from ultrafastbert.train import checkpoint as ckpt
from ultrafastbert.train.mlm import MlmBatches


# ------------------------------------------------------------------------------- toy setup
class ToyTagger(nn.Module):
    """Per-position 3-way classification; the loss averages over labelled positions only."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.proj(self.norm(x))
        keep = labels != -100
        return type("Out", (), {"loss": F.cross_entropy(logits[keep], labels[keep])})()


class ToySource:
    """Row ``i`` depends only on ``i``, so any micro-batching sees the same rows in order.
    About half the positions of a row are labelled, so micro-batches differ in target count."""

    def __init__(self, micro_batch: int, fail_at: int | None = None) -> None:
        self.micro_batch, self.position, self.fail_at, self.calls = micro_batch, 0, fail_at, 0

    @staticmethod
    def row(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(6, 4, generator=g)
        labels = torch.randint(0, 3, (6,), generator=g)
        labels[torch.rand(6, generator=g) < 0.5] = -100
        return x, labels

    def next_batch(self, rank: int = 0, world_size: int = 1) -> MicroBatch:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        rows = [self.row(self.position + i) for i in range(self.micro_batch)]
        self.position += self.micro_batch
        x, labels = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        return MicroBatch({"x": x, "labels": labels}, int((labels != -100).sum()), labels.numel())

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def make_trainer(micro: int, accumulation: int, out: Path | None = None, max_steps: int = 6,
                 fail_at: int | None = None, **loop: Any) -> Trainer:
    torch.manual_seed(0)
    model = ToyTagger()
    recipe = CrammedRecipe(lr=0.05, micro_batch=micro, target_batch=micro)
    schedule = WarmupCosineSchedule(warmup=0.2, accumulation_steps=accumulation)
    config = LoopConfig(max_steps=max_steps, grad_clip=1.0, out_dir=out, progress_bar=False,
                        **loop)
    return Trainer(model, recipe.optimizer(model), schedule, ToySource(micro, fail_at), config)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


# ---------------------------------------------------------------------------- weighting
def test_micro_batching_does_not_change_the_result() -> None:
    """8 rows x 2 micro-batches == 16 rows x 1: every target weighs the same."""
    a, b = make_trainer(8, 2), make_trainer(16, 1)
    ra, rb = a.fit(), b.fit()
    assert [s.loss for s in ra.history] == pytest.approx([s.loss for s in rb.history], abs=1e-6)
    for key, value in params(a).items():
        torch.testing.assert_close(value, params(b)[key], atol=1e-6, rtol=1e-5)
    assert ra.history[0].batch_size == rb.history[0].batch_size == 16


def test_step_loss_is_the_mean_over_all_targets() -> None:
    trainer = make_trainer(8, 2, max_steps=1)
    model = ToyTagger()
    model.load_state_dict(trainer.module.state_dict())
    source = ToySource(8)
    batches = [source.next_batch(), source.next_batch()]
    losses = [model(**b.inputs).loss.item() for b in batches]
    counts = [b.n_targets for b in batches]
    assert counts[0] != counts[1]  # otherwise the check below could not fail
    by_target = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    mean_of_means = sum(losses) / 2
    logged = trainer.fit().history[0].loss
    assert logged == pytest.approx(by_target, rel=1e-6)
    assert logged != pytest.approx(mean_of_means, rel=1e-6)  # negative control


# --------------------------------------------------------------------- schedule, clipping
def test_metrics_file_and_learning_rate(tmp_path: Path) -> None:
    result = make_trainer(8, 1, out=tmp_path, max_steps=5).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert {"step", "loss", "lr", "tokens", "elapsed"} <= set(records[0])
    schedule = WarmupCosineSchedule(warmup=0.2)
    assert [r["lr"] for r in records] == pytest.approx(
        [0.05 * schedule.lr_factor(s / 5) for s in range(5)])
    assert records[-1]["tokens"] == 5 * 8 * 6 == result.state.tokens
    assert latest_checkpoint(tmp_path / "checkpoints").final


def test_gradient_clipping_bounds_the_update() -> None:
    torch.manual_seed(0)
    model = ToyTagger()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    config = LoopConfig(max_steps=1, grad_clip=0.01, progress_bar=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = Trainer(model, opt, WarmupCosineSchedule(warmup=0.0), ToySource(8),
                    config).fit().last
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert stats.grad_norm > 0.01  # the logged norm is before clipping
    assert float((after - before).norm()) == pytest.approx(0.01, rel=1e-4)


def test_budget_mode_stops_on_time() -> None:
    trainer = make_trainer(8, 1, max_steps=None, budget_s=0.5)
    result = trainer.fit()
    assert result.state.step >= 1
    assert result.state.elapsed_s >= 0.5
    progress = [s.progress for s in result.history]
    assert progress == sorted(progress) and progress[-1] < 1.0


def test_nan_loss_is_an_error() -> None:
    trainer = make_trainer(8, 1)
    with torch.no_grad():
        trainer.module.proj.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="--lr"):
        trainer.fit()


# ----------------------------------------------------------------- checkpoints and resume
def test_resume_after_crash_is_exact(tmp_path: Path) -> None:
    full = make_trainer(8, 2, out=tmp_path / "full", save_every_steps=2).fit()
    crashed = make_trainer(8, 2, out=tmp_path / "crash", save_every_steps=2, fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()  # dies in step 4 (micro-batch 8); the checkpoint of step 2 stays
    assert latest_checkpoint(tmp_path / "crash" / "checkpoints").step == 2
    resumed = make_trainer(8, 2, out=tmp_path / "crash", save_every_steps=2)
    resumed.module.proj.weight.data.zero_()  # restore() must overwrite it
    assert resumed.restore().step == 2
    result = resumed.fit()
    assert result.state.step == 6
    assert [r["loss"] for r in read_metrics(tmp_path / "crash" / "metrics.jsonl")] == \
        [s.loss for s in full.history]
    final_full = params_of(tmp_path / "full")
    for key, value in params(resumed).items():
        torch.testing.assert_close(value, final_full[key], rtol=0, atol=0)


def params_of(out: Path) -> dict[str, torch.Tensor]:
    model = ToyTagger()
    info = latest_checkpoint(out / "checkpoints")
    from safetensors.torch import load_model

    load_model(model, str(info.path / ckpt.MODEL_FILE))
    return model.state_dict()


def test_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(8, 1, out=tmp_path, max_steps=2)
    trainer.fit()
    good = latest_checkpoint(tmp_path / "checkpoints")

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"half a file")  # an open file: see utils.oserrors.save_torch
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    trainer.state.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert latest_checkpoint(tmp_path / "checkpoints") == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest.json", "step-00000002"]  # no partial folder left behind


def test_orphans_are_removed(tmp_path: Path) -> None:
    make_trainer(8, 1, out=tmp_path, max_steps=2).fit()
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir()            # renamed in, but the pointer never updated
    (root / ".step-00000003.abc.tmp").mkdir()   # killed while writing
    removed = ckpt.remove_orphans(root)
    assert sorted(p.name for p in removed) == [".step-00000003.abc.tmp", "step-00000009"]
    assert json.loads((root / "latest.json").read_text())["step"] == 2


def test_fresh_run_refuses_existing_metrics(tmp_path: Path) -> None:
    make_trainer(8, 1, out=tmp_path, max_steps=1).fit()
    with pytest.raises(FileExistsError, match="resume"):
        make_trainer(8, 1, out=tmp_path, max_steps=1).fit()


# ------------------------------------------------------------------- fine-tuning use case
def test_the_loop_fine_tunes_a_classifier() -> None:
    """The GLUE path: a classifier, cosine schedule with warm-up, examples as targets."""
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (conftest resets it)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8,
                         ff={"kind": "fff", "n_trees": 1, "depth": 2}, num_labels=2,
                         classifier_width=16, pooler="first")
    model = UltraFastBertForSequenceClassification(config)

    class Examples:
        position = 0

        def next_batch(self, rank: int = 0, world_size: int = 1) -> MicroBatch:
            g = torch.Generator().manual_seed(self.position)
            self.position += 1
            ids = torch.randint(7, 32, (16, 4), generator=g)
            labels = (ids[:, 0] >= 20).long()  # the first token decides
            mask = torch.ones_like(ids)
            return MicroBatch({"input_ids": ids, "attention_mask": mask, "labels": labels},
                              n_targets=16, n_tokens=int(mask.sum()))

        def state_dict(self) -> dict[str, Any]:
            return {"position": self.position}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.position = state["position"]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=0.0)
    result = Trainer(model, opt, WarmupCosineSchedule(0.1), Examples(),
                     LoopConfig(max_steps=40, progress_bar=False)).fit()
    first, last = result.history[0].loss, np.mean([s.loss for s in result.history[-5:]])
    assert last < 0.5 * first


# ------------------------------------------------------------------------- MLM sharding
def test_mlm_rank_shares_concatenate_to_the_single_process_batch() -> None:
    rows = np.random.default_rng(0).integers(7, 100, size=(50, 12))
    masker = MlmMasker(6, 100, range(7))

    def source() -> MlmBatches:
        return MlmBatches(SequenceStream(rows, seed=3), masker, torch.Generator().manual_seed(1),
                          micro_batch=8)

    single, shares = source(), [source(), source()]
    for _ in range(3):
        whole = single.next_batch()
        parts = [s.next_batch(rank, 2) for rank, s in enumerate(shares)]
        for key in ("input_ids", "labels"):
            torch.testing.assert_close(torch.cat([p.inputs[key] for p in parts]),
                                       whole.inputs[key], rtol=0, atol=0)
        assert sum(p.n_targets for p in parts) == whole.n_targets
    assert torch.equal(shares[1].state_dict()["generator"], single.state_dict()["generator"])
    with pytest.raises(ValueError, match="multiple"):
        source().next_batch(0, 3)
