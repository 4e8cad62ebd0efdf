"""What the student is trained to match, as modules the project's training loop runs.

Both return an object with ``.loss``, the mean over the micro-batch's targets (tokens for the
layer-by-layer phase, sequences end to end), as :class:`~ultrafastbert.train.loop.Trainer`
expects. The teacher's side comes in through the inputs (see
:class:`~ultrafastbert.convert.data.TeacherBatches`), so a checkpoint holds the student only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..model.converted import FFFBlock, base_model_of
from .data import pool_hidden


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: the scalar to minimise; ``parts``: its named components (detached)."""

    loss: torch.Tensor
    parts: dict[str, float]


class LayerwiseObjective(nn.Module):
    """Each FFF block against its dense block, on that block's own inputs.

    ``loss = mean over tokens and FFF layers of |f_l(block_l(x_l)) - f_l(y_l)|^2 * scale_l``,
    with ``scale_l = 1 / E|f_l(y_l) - mean f_l(y_l)|^2``: every layer's term is a relative squared
    error. ``f_l`` is the identity (``space="output"``: the block's output) or, with
    ``space="post-norm"``, what the layer makes of it: ``f_l(v) = LayerNorm_l(x_l + v)``, the
    layer's own (frozen) norm after the residual sum, so an error counts as much as it changes
    the layer's output (the norm divides each token by its own spread). Removed blocks (the
    ablation) are skipped.
    """

    def __init__(self, blocks: Sequence[nn.Module], scales: torch.Tensor, *,
                 norms: Sequence[nn.LayerNorm] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("scales", scales.float().clone())
        self.trained = [i for i, b in enumerate(blocks) if isinstance(b, FFFBlock)]
        self.norms = [frozen_norm(n) for n in norms] if norms is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``, ``y`` ``(L, T, d)``: every layer's inputs and dense outputs."""
        blocks: Any = self.blocks
        scales: Any = self.scales
        terms = [(self.view(i, x[i], blocks[i](x[i])) - self.view(i, x[i], y[i])).pow(2)
                 .sum(-1).mean() * scales[i] for i in self.trained]
        loss = torch.stack(terms).mean()
        return ObjectiveOutput(loss, {f"layer{i}": float(t.detach()) for i, t in
                                      zip(self.trained, terms, strict=True)})

    def view(self, layer: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``f_layer(out)`` ``(T, d)`` (see the class docstring)."""
        if self.norms is None:
            return out
        return self.norms[layer](x + out)


LAYERWISE_SPACES = ("output", "post-norm")


def frozen_norm(norm: nn.LayerNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` as a function of detached copies of its parameters (not trained, not saved)."""
    weight = norm.weight.detach().clone() if norm.weight is not None else None
    bias = norm.bias.detach().clone() if norm.bias is not None else None
    shape, eps = tuple(norm.normalized_shape), float(norm.eps)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, shape, weight, bias, eps)

    return apply


E2E_LAYERS = ("last", "all")


class EndToEndObjective(nn.Module):
    """The whole student against the teacher: hidden states and the pooled embedding.

    ``loss = mean over sequences of  mean_l hidden_scale_l * mean_tokens |h_s^l - h_t^l|^2
    + cos_weight * (1 - cos(pool(h_s), pool(h_t)))``, ``l`` over the last layer
    (``layers="last"``) or every layer (``"all"``: each block also sees what the layers after
    it make of its error, and gets a direct signal where upstream errors leave it).
    ``hidden_scale_l = 1 / E|h_t^l - mean h_t^l|^2`` makes each term a relative error. With
    ``similarity_weight > 0`` the batch adds ``similarity_weight *`` :func:`similarity_error`
    (the pairwise cosines of its pooled embeddings against the teacher's). Dropout
    stays off (the student is kept in eval mode while training: it must match a deterministic
    teacher).
    """

    def __init__(self, student: Any, *, pooling: str, hidden_scales: torch.Tensor,
                 layers: str = "last", cos_weight: float = 10.0,
                 similarity_weight: float = 0.0) -> None:
        super().__init__()
        if layers not in E2E_LAYERS:
            raise InputError(f"end-to-end layers must be one of {E2E_LAYERS}, got {layers!r}")
        self.student = student
        self.pooling, self.layers, self.cos_weight = pooling, layers, cos_weight
        self.similarity_weight = similarity_weight
        self.register_buffer("hidden_scales", hidden_scales.float().clone())

    def train(self, mode: bool = True) -> EndToEndObjective:
        """Keep the student in eval mode (no dropout) whatever ``mode``."""
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_pooled: torch.Tensor) -> ObjectiveOutput:
        """``input_ids``, ``attention_mask`` ``(B, S)``; teacher ``(L, B, S, d)`` (every
        layer's output; ``(1, B, S, d)``, the last layer's, is enough for ``layers="last"``)
        and ``(B, d)``."""
        out = base_model_of(self.student)(input_ids=input_ids, attention_mask=attention_mask,
                                          output_hidden_states=self.layers == "all")
        scales: Any = self.hidden_scales
        n_layers = len(scales)
        if self.layers == "all" and len(teacher_hidden) != n_layers:
            raise InputError(f"end-to-end layers 'all' needs the teacher's {n_layers} layers, "
                             f"got {len(teacher_hidden)}")
        picked = range(n_layers) if self.layers == "all" else [n_layers - 1]
        hidden = out.last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        terms = []
        for layer in picked:
            h_s = hidden if layer == n_layers - 1 else out.hidden_states[layer + 1]
            target = teacher_hidden[layer - n_layers + len(teacher_hidden)]
            per_token = (h_s - target).pow(2).sum(-1)
            terms.append((per_token * mask).sum(1) / mask.sum(1).clamp_min(1.0) * scales[layer])
        mse = torch.stack(terms).mean(0)
        pooled = pool_hidden(hidden, attention_mask, self.pooling)
        cos = 1.0 - F.cosine_similarity(pooled, teacher_pooled, dim=-1)
        loss = (mse + self.cos_weight * cos).mean()
        parts = {"hidden": float(mse.detach().mean()), "cos": float(cos.detach().mean())}
        if self.similarity_weight > 0 and len(pooled) > 1:
            similarity = similarity_error(pooled, teacher_pooled)
            loss = loss + self.similarity_weight * similarity
            parts["similarity"] = float(similarity.detach())
        return ObjectiveOutput(loss, parts)


def similarity_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How differently the student ranks the batch's texts against each other: over the pairs
    ``i != j`` of ``student``, ``teacher`` ``(B, d)`` pooled embeddings,
    ``mean (cos_s(i, j) - cos_t(i, j))^2 / var(cos_t)``: the relative squared error of the
    pairwise cosine similarities (what STS-style uses of an embedding read), a scalar."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    c_s, c_t = (s @ s.T)[off], (t @ t.T)[off]
    return (c_s - c_t).pow(2).mean() / c_t.var(unbiased=False).clamp_min(1e-8)
