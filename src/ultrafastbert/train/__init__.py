"""Training: one loop shared by pretraining and fine-tuning, the crammed recipe, checkpoints,
data-parallel runs, and the pretraining pipeline.

    from ultrafastbert.train import CrammedRecipe, LoopConfig, Trainer
    recipe = CrammedRecipe(micro_batch=32, target_batch=256)
    trainer = Trainer(model, recipe.optimizer(model), recipe.schedule(), batches,
                      LoopConfig(max_steps=100, grad_clip=recipe.grad_clip, out_dir=out))
    trainer.restore()          # optional: continue from out/checkpoints
    result = trainer.fit()

Importing this package needs torch and numpy only; ``safetensors`` (checkpoints), ``tqdm``
(progress bar) and ``matplotlib`` (loss curve) are imported where they are used. The
pretraining pipeline is ``ultrafastbert.train.pretrain`` (``run(PretrainSettings(...))``).
"""

from .checkpoint import CheckpointInfo, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistContext, init_distributed, main_first, shutdown, unwrap, wrap_ddp
from .loop import (
    BatchSource,
    LoopConfig,
    MicroBatch,
    Schedule,
    StepStats,
    Trainer,
    TrainResult,
    TrainState,
)
from .metrics import MetricsLog, plot_loss_curve, read_metrics
from .recipe import CrammedRecipe, CrammedSchedule, WarmupCosineSchedule, parameter_groups

__all__ = [
    "BatchSource", "CheckpointInfo", "CrammedRecipe", "CrammedSchedule", "DistContext",
    "LoopConfig", "MetricsLog", "MicroBatch", "Schedule", "StepStats", "TrainResult",
    "TrainState", "Trainer", "WarmupCosineSchedule", "init_distributed", "latest_checkpoint",
    "load_checkpoint", "main_first", "parameter_groups", "plot_loss_curve", "read_metrics",
    "save_checkpoint", "shutdown", "unwrap", "wrap_ddp",
]
