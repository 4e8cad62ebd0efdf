"""What the student is trained to match, as modules the project's training loop runs.

Both return an object with ``.loss``, the mean over the micro-batch's targets (tokens for the
layer-by-layer phase, sequences end to end), as :class:`~ultrafastbert.train.loop.Trainer`
expects. The teacher's side comes in through the inputs (see
:class:`~ultrafastbert.convert.data.TeacherBatches`), so a checkpoint holds the student only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model.converted import FFFBlock, base_model_of
from .data import pool_hidden


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: the scalar to minimise; ``parts``: its named components (detached)."""

    loss: torch.Tensor
    parts: dict[str, float]


class LayerwiseObjective(nn.Module):
    """Each FFF block against its dense block, on that block's own inputs.

    ``loss = mean over tokens and FFF layers of |block_l(x_l) - y_l|^2 * scale_l``, with
    ``scale_l = 1 / E|y_l - mean(y_l)|^2``: every layer's term is a relative squared error.
    Removed blocks (the ablation) are skipped.
    """

    def __init__(self, blocks: Sequence[nn.Module], scales: torch.Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("scales", scales.float().clone())
        self.trained = [i for i, b in enumerate(blocks) if isinstance(b, FFFBlock)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``, ``y`` ``(L, T, d)``: every layer's inputs and dense outputs."""
        blocks: Any = self.blocks
        scales: Any = self.scales
        terms = [(blocks[i](x[i]) - y[i]).pow(2).sum(-1).mean() * scales[i]
                 for i in self.trained]
        loss = torch.stack(terms).mean()
        return ObjectiveOutput(loss, {f"layer{i}": float(t.detach()) for i, t in
                                      zip(self.trained, terms, strict=True)})


class EndToEndObjective(nn.Module):
    """The whole student against the teacher: hidden states and the pooled embedding.

    ``loss = mean over sequences of  hidden_scale * mean_tokens |h_s - h_t|^2
    + cos_weight * (1 - cos(pool(h_s), pool(h_t)))``. Dropout stays off (the student is kept
    in eval mode while training: it must match a deterministic teacher).
    """

    def __init__(self, student: Any, *, pooling: str, hidden_scale: float,
                 cos_weight: float = 10.0) -> None:
        super().__init__()
        self.student = student
        self.pooling, self.hidden_scale, self.cos_weight = pooling, hidden_scale, cos_weight

    def train(self, mode: bool = True) -> EndToEndObjective:
        """Keep the student in eval mode (no dropout) whatever ``mode``."""
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_pooled: torch.Tensor) -> ObjectiveOutput:
        """``input_ids``, ``attention_mask`` ``(B, S)``; teacher ``(B, S, d)`` and ``(B, d)``."""
        hidden = base_model_of(self.student)(input_ids=input_ids,
                                             attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        per_token = (hidden - teacher_hidden).pow(2).sum(-1)
        mse = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1.0) * self.hidden_scale
        pooled = pool_hidden(hidden, attention_mask, self.pooling)
        cos = 1.0 - F.cosine_similarity(pooled, teacher_pooled, dim=-1)
        loss = (mse + self.cos_weight * cos).mean()
        return ObjectiveOutput(loss, {"hidden": float(mse.detach().mean()),
                                     "cos": float(cos.detach().mean())})
