"""Masked-language-model corruption (crammed recipe: 25% of tokens, 80/10/10).

Each eligible token (not a special token, not padding) is selected independently with
probability ``rate``. A selected token becomes ``<mask>`` with probability ``mask_frac``, a
uniformly random *non-special* token with probability ``random_frac``, and stays unchanged
otherwise. Labels hold the original id at selected positions and ``-100`` elsewhere, so the loss
("sparse prediction") sees only selected positions.

All randomness comes from the ``torch.Generator`` passed in, and the number of random draws does
not depend on the data, so a saved generator state reproduces the masks exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    """MLM corruption rates. ``keep`` fraction is ``1 - mask_frac - random_frac``."""

    rate: float = 0.25
    mask_frac: float = 0.8
    random_frac: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise DataError(f"MaskingConfig.rate must be in (0, 1], got {self.rate}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1:
            raise DataError(
                f"MaskingConfig.mask_frac ({self.mask_frac}) and random_frac "
                f"({self.random_frac}) must be >= 0 and sum to at most 1"
            )


class MlmMasker:
    """Applies MLM masking to batches of token ids.

    Args:
        mask_id: id of ``<mask>``.
        vocab_size: number of token ids (random replacements are drawn below it).
        special_ids: ids never selected and never used as replacements (``<pad>`` included).
        config: rates (default: 25%, 80/10/10).
    """

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Iterable[int],
                 config: MaskingConfig | None = None) -> None:
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)
        self.config = config or MaskingConfig()
        special = sorted({int(i) for i in special_ids} | {self.mask_id})
        self.special_ids = torch.tensor(special, dtype=torch.long)
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[self.special_ids[self.special_ids < self.vocab_size]] = False
        self.replacement_ids = keep.nonzero().flatten()
        if len(self.replacement_ids) == 0:
            raise DataError(f"vocab_size {vocab_size} leaves no non-special token to sample")

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch.

        Args:
            input_ids: integer tensor of shape ``(B, L)`` (any leading shape works).
            generator: source of all randomness; draws happen on ``generator.device``.

        Returns:
            ``(masked_ids, labels)``, both shaped like ``input_ids``: ``masked_ids`` is a new
            tensor (the input is not modified); ``labels`` is ``int64`` with the original id at
            selected positions and ``-100`` elsewhere.
        """
        cfg = self.config
        gen_device = generator.device
        u_select = torch.rand(input_ids.shape, generator=generator, device=gen_device)
        u_action = torch.rand(input_ids.shape, generator=generator, device=gen_device)
        r_index = torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator,
                                device=gen_device)
        device = input_ids.device
        u_select, u_action, r_index = u_select.to(device), u_action.to(device), r_index.to(device)
        eligible = ~torch.isin(input_ids, self.special_ids.to(device))
        selected = eligible & (u_select < cfg.rate)
        to_mask = selected & (u_action < cfg.mask_frac)
        to_random = selected & (u_action >= cfg.mask_frac) & (
            u_action < cfg.mask_frac + cfg.random_frac)
        masked = input_ids.clone()
        masked[to_mask] = self.mask_id
        replacements = self.replacement_ids.to(device)[r_index].to(input_ids.dtype)
        masked[to_random] = replacements[to_random]
        labels = torch.where(selected, input_ids.long(),
                             torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long))
        return masked, labels


def mask_tokens(
    input_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    config: MaskingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot form of :class:`MlmMasker` (builds the replacement table on every call).

    Args:
        input_ids: integer tensor of shape ``(B, L)``.
        generator: source of all randomness.
        mask_id, vocab_size, special_ids, config: as for :class:`MlmMasker`.

    Returns:
        ``(masked_ids, labels)`` of shape ``(B, L)``; labels are ``-100`` where not selected.
    """
    return MlmMasker(mask_id, vocab_size, special_ids, config)(input_ids, generator)
