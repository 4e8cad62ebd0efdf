"""A time budget is kept to within a few percent and the schedule runs to its end, even when the
batch ramp would make steps longer than the budget (issue 13, item 3)."""

from __future__ import annotations

import time

import pytest
import torch

from test_train_loop import ToySource, ToyTagger
from ultrafastbert.train import CrammedRecipe, LoopConfig, Trainer
from ultrafastbert.train.loop import BUDGET_STEP_SHARE


class SlowSource(ToySource):
    """Each micro-batch costs ``seconds`` (as a large model's forward/backward would)."""

    def __init__(self, micro_batch: int, seconds: float) -> None:
        super().__init__(micro_batch)
        self.seconds = seconds

    def next_batch(self, rank: int = 0, world_size: int = 1):
        time.sleep(self.seconds)
        return super().next_batch(rank, world_size)


def test_budget_kept_when_the_ramp_outgrows_it() -> None:
    """Ramp to 400 micro-batches a step (40 s at 0.1 s each) within an 8 s budget: steps are
    capped at 2% of the budget (0.16 s: one micro-batch), the run stops within a few percent
    of it, and the learning rate has decayed (the paper's schedule ends at zero). The bounds
    leave room for a loaded machine, where a step can take longer than the one before."""
    torch.manual_seed(0)
    model = ToyTagger()
    recipe = CrammedRecipe(lr=0.05, micro_batch=8, target_batch=8 * 400)
    budget = 8.0
    trainer = Trainer(model, recipe.optimizer(model), recipe.schedule(), SlowSource(8, 0.1),
                      LoopConfig(budget_s=budget, grad_clip=1.0, progress_bar=False))
    result = trainer.fit()
    history = result.history
    assert budget <= result.state.elapsed_s <= 1.05 * budget
    assert history[-1].progress >= 1 - 5 * BUDGET_STEP_SHARE
    assert recipe.schedule().lr_factor(history[-1].progress) <= 0.4
    assert max(s.accumulation for s in history) < 400  # capped
    assert max(s.accumulation for s in history) >= 1
    # Negative control: with a generous budget the same ramp is not capped at the start.
    assert recipe.schedule().accumulation(0.3) > max(s.accumulation for s in history)


def test_the_cap_is_announced_with_the_step_time(caplog) -> None:
    """A loud warning with the measured micro-batch time (item 7), once."""
    import logging

    torch.manual_seed(0)
    model = ToyTagger()
    recipe = CrammedRecipe(lr=0.05, micro_batch=8, target_batch=8 * 400)
    trainer = Trainer(model, recipe.optimizer(model), recipe.schedule(), SlowSource(8, 0.05),
                      LoopConfig(budget_s=2.0, grad_clip=1.0, progress_bar=False))
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.train.loop"):
        trainer.fit()
    capped = [r for r in caplog.records if "the budget is short for this batch ramp" in
              r.getMessage()]
    assert len(capped) == 1 and "one micro-batch takes" in capped[0].getMessage()


def test_a_long_max_steps_run_is_announced(caplog, monkeypatch) -> None:
    import logging

    from ultrafastbert.train import loop

    monkeypatch.setattr(loop, "LONG_RUN_S", 0.5)  # 10 steps ramping to 400 x 10 ms: longer
    torch.manual_seed(0)
    model = ToyTagger()
    recipe = CrammedRecipe(lr=0.05, micro_batch=8, target_batch=8 * 400)
    trainer = Trainer(model, recipe.optimizer(model), recipe.schedule(), SlowSource(8, 0.01),
                      LoopConfig(max_steps=2, grad_clip=1.0, progress_bar=False))
    with caplog.at_level(logging.WARNING, logger="ultrafastbert.train.loop"):
        trainer.fit()
    assert "this run is expected to take about" in caplog.text


def test_the_progress_bar_moves_per_micro_batch(monkeypatch) -> None:
    """Within a step of 3 micro-batches the bar shows fractions of the step (item 7)."""
    pytest.importorskip("tqdm")
    from ultrafastbert.train import WarmupCosineSchedule, loop

    seen: list[float] = []
    real = loop._Bar.micro_batch_done

    def spy(self, done, of):
        real(self, done, of)
        seen.append(float(self.bar.n))

    monkeypatch.setattr(loop._Bar, "micro_batch_done", spy)
    torch.manual_seed(0)
    model = ToyTagger()
    recipe = CrammedRecipe(lr=0.05, micro_batch=8, target_batch=8)
    trainer = Trainer(model, recipe.optimizer(model),
                      WarmupCosineSchedule(accumulation_steps=3), ToySource(8),
                      LoopConfig(max_steps=2, progress_bar=True))
    trainer.fit()
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0])
