"""Training throughput: FFF vs dense feed-forward, same machine, same process, interleaved.

    .venv/bin/python benchmarks/train_throughput.py                  # both pairs, CPU
    .venv/bin/python benchmarks/train_throughput.py --pairs tiny --repeats 10
    .venv/bin/python benchmarks/train_throughput.py --device cuda --micro-batch-large 128

Pairs: ``tiny-fff`` vs ``tiny-dense`` (4 layers, d 256, FFF 1x9 vs dense 1023) and
``ultrafastbert-1x11`` vs ``crammedbert-4095`` (the paper's pair, 16 layers, d 768). Each
measured step is a real optimizer step of the shared training loop (``Trainer.step``): MLM
masking, forward, backward (the FFF's sparse training path), gradient clipping, AdamW. The
two models of a pair alternate step by step, so a change in machine load hits both alike.
Reported: median and minimum seconds per step after warm-up (on a shared machine the minimum
is the steadier figure), tokens/s at the median, and the FFF/dense ratio of both.
Inputs are random token ids (throughput does not depend on the text).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ultrafastbert.bench import common
from ultrafastbert.data import MlmMasker
from ultrafastbert.model import ModelConfig, UltraFastBertForMaskedLM
from ultrafastbert.train import (
    CrammedRecipe,
    LoopConfig,
    MicroBatch,
    Trainer,
    WarmupCosineSchedule,
)
from ultrafastbert.train.pretrain import resolve_precision

PAIRS = {"tiny": ("tiny-fff", "tiny-dense"),
         "paper": ("ultrafastbert-1x11", "crammedbert-4095")}
COLUMNS = ("preset", "ff", "micro_batch", "accumulation", "tokens_per_step", "median_s", "min_s",
           "tokens_per_s", "fff_speedup", "fff_speedup_best")


class RandomMlmBatches:
    """Random token ids (ids 7 and up), masked as in pretraining."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int = 0) -> None:
        self.shape = (micro_batch, seq_len)
        self.vocab_size = vocab_size
        self.masker = MlmMasker(6, vocab_size, range(7))
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, rank: int = 0, world_size: int = 1) -> MicroBatch:
        ids = torch.randint(7, self.vocab_size, self.shape, generator=self.generator)
        masked, labels = self.masker(ids, self.generator)
        return MicroBatch({"input_ids": masked, "labels": labels},
                          int((labels != -100).sum()), labels.numel())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def make_trainer(preset: str, micro_batch: int, accumulation: int, device: torch.device,
                 precision: str) -> Trainer:
    """A trainer for ``preset`` with the crammed recipe's optimizer (dropout off) and a fixed
    batch of ``micro_batch x accumulation`` sequences per optimizer step."""
    config = ModelConfig.from_preset(preset, embedding_dropout=0.0, attention_dropout=0.0,
                                     hidden_dropout=0.0)
    torch.manual_seed(0)
    model = UltraFastBertForMaskedLM(config).to(device)
    recipe = CrammedRecipe(micro_batch=micro_batch, target_batch=micro_batch)
    data = RandomMlmBatches(config.vocab_size, micro_batch, config.max_seq_len)
    loop = LoopConfig(max_steps=10**9, grad_clip=recipe.grad_clip, progress_bar=False,
                      precision=resolve_precision(precision, device))
    schedule = WarmupCosineSchedule(warmup=0.0, accumulation_steps=accumulation)  # lr ~ peak
    return Trainer(model, recipe.optimizer(model), schedule, data, loop)


def measure_pair(presets: tuple[str, str], micro_batch: int, args: argparse.Namespace,
                 ) -> list[dict[str, Any]]:
    """Alternate optimizer steps of the two models; one row per model."""
    device = torch.device(args.device)
    trainers = [make_trainer(p, micro_batch, args.accumulation, device, args.precision)
                for p in presets]
    times: list[list[float]] = [[], []]
    for i in range(args.warmup + args.repeats):
        for k, trainer in enumerate(trainers):
            start = time.perf_counter()
            trainer.step()  # ends with .item() calls: the device is synchronised
            if i >= args.warmup:
                times[k].append(time.perf_counter() - start)
    return [_row(p, t, trainer) for p, t, trainer in zip(presets, times, trainers, strict=True)]


def _row(preset: str, step_seconds: list[float], trainer: Trainer) -> dict[str, Any]:
    ff = trainer.module.config.ff
    tokens = trainer.data.shape[0] * trainer.data.shape[1] * trainer.schedule.accumulation(0.0)
    median_s, min_s = statistics.median(step_seconds), min(step_seconds)
    label = f"FFF {ff.n_trees}x{ff.depth}" if hasattr(ff, "depth") else f"dense {ff.width}"
    return {"preset": preset, "ff": label, "micro_batch": trainer.data.shape[0],
            "accumulation": trainer.schedule.accumulation(0.0),
            "tokens_per_step": tokens, "median_s": median_s, "min_s": min_s,
            "tokens_per_s": tokens / median_s, "tokens_per_s_best": tokens / min_s,
            "step_seconds": step_seconds, "parameters": trainer.module.num_parameters()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="tiny,paper", help="comma list of: tiny, paper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (2)")
    p.add_argument("--micro-batch-tiny", type=int, default=32, help="sequences (32)")
    p.add_argument("--micro-batch-large", type=int, default=4,
                   help="sequences for the paper pair (4; 128 on a GPU)")
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per optimizer step (1); more amortises AdamW")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/train_throughput"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = common.environment(args.device, dtypes=[args.precision])
    env.update(load_before=_load(), precision=args.precision)
    rows = []
    for pair in args.pairs.split(","):
        micro = args.micro_batch_tiny if pair == "tiny" else args.micro_batch_large
        fff, dense = measure_pair(PAIRS[pair], micro, args)
        fff["fff_speedup"] = fff["tokens_per_s"] / dense["tokens_per_s"]
        fff["fff_speedup_best"] = fff["tokens_per_s_best"] / dense["tokens_per_s_best"]
        dense["fff_speedup"] = dense["fff_speedup_best"] = 1.0
        rows += [fff, dense]
    env["load_after"] = _load()
    files = common.write_results(args.out, "train_throughput", rows, env)
    print(common.format_table(rows, COLUMNS))
    print(f"threads {torch.get_num_threads()}, load average before/after "
          f"{env['load_before']} / {env['load_after']}; wrote {', '.join(map(str, files))}")
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
