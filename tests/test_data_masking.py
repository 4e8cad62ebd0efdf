"""MLM masking: rates within statistical bounds, 80/10/10, specials untouched, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from ultrafastbert.data.masking import IGNORE_INDEX, MaskingConfig, MlmMasker, mask_tokens

VOCAB = 1000
SPECIAL = (0, 1, 2, 3, 4, 5, 6)
MASK = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plain_tokens(shape: tuple[int, ...] = (64, 512), seed: int = 0) -> torch.Tensor:
    """Token ids with no special tokens at all."""
    return torch.randint(7, VOCAB, shape, generator=gen(seed))


def within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    """|observed - p| is within ``sigmas`` binomial standard deviations for ``n`` trials."""
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_selection_rate_is_25_percent() -> None:
    ids = plain_tokens()
    _, labels = MlmMasker(MASK, VOCAB, SPECIAL)(ids, gen(1))
    selected = labels != IGNORE_INDEX
    assert within(selected.float().mean().item(), 0.25, ids.numel())


def test_rate_bound_rejects_a_wrong_rate() -> None:
    # Negative control: the bound above is tight enough to catch BERT's 15%, or 30%.
    ids = plain_tokens()
    for wrong in (0.15, 0.30):
        masker = MlmMasker(MASK, VOCAB, SPECIAL, MaskingConfig(rate=wrong))
        _, labels = masker(ids, gen(1))
        assert not within((labels != IGNORE_INDEX).float().mean().item(), 0.25, ids.numel())


def test_80_10_10_split_of_selected_tokens() -> None:
    ids = plain_tokens()
    masked, labels = MlmMasker(MASK, VOCAB, SPECIAL)(ids, gen(2))
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    as_mask = (masked[selected] == MASK).float().mean().item()
    unchanged = (masked[selected] == ids[selected]).float().mean().item()
    replaced = ((masked[selected] != MASK) & (masked[selected] != ids[selected])).float().mean()
    # A random replacement equals the original with probability 1/993; fold that into the bounds.
    p_same = 0.1 / (VOCAB - len(SPECIAL))
    assert within(as_mask, 0.8, n)
    assert within(unchanged, 0.1 + p_same, n)
    assert within(replaced.item(), 0.1 - p_same, n)


def test_unselected_positions_are_untouched_and_labels_hold_originals() -> None:
    ids = plain_tokens((8, 128))
    masked, labels = MlmMasker(MASK, VOCAB, SPECIAL)(ids, gen(3))
    selected = labels != IGNORE_INDEX
    assert torch.equal(masked[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    assert labels.dtype == torch.int64 and masked.dtype == ids.dtype
    assert masked.shape == labels.shape == ids.shape


def test_special_tokens_and_padding_are_never_selected() -> None:
    ids = plain_tokens((32, 128))
    ids[:, :1] = 4  # <cls>
    ids[:, 60:] = 0  # padding
    ids[:, 30::7] = 5  # <sep> inside the text
    masked, labels = MlmMasker(MASK, VOCAB, SPECIAL)(ids, gen(4))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert bool((labels[special] == IGNORE_INDEX).all())
    assert torch.equal(masked[special], ids[special])
    assert bool((labels[~special] != IGNORE_INDEX).any())


def test_random_replacements_are_never_special() -> None:
    vocab = 10  # only ids 7, 8, 9 may be drawn
    ids = torch.full((64, 256), 8)
    config = MaskingConfig(rate=1.0, mask_frac=0.0, random_frac=1.0)
    masked, _ = MlmMasker(MASK, vocab, SPECIAL, config)(ids, gen(5))
    assert set(masked.unique().tolist()) == {7, 8, 9}


def test_same_seed_same_masks_other_seed_differs() -> None:
    ids = plain_tokens((16, 128))
    masker = MlmMasker(MASK, VOCAB, SPECIAL)
    a, la = masker(ids, gen(10))
    b, lb = masker(ids, gen(10))
    c, lc = masker(ids, gen(11))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_generator_state_resumes_the_mask_sequence() -> None:
    batches = [plain_tokens((4, 64), seed=s) for s in range(3)]
    masker = MlmMasker(MASK, VOCAB, SPECIAL)
    g = gen(12)
    straight = [masker(b, g) for b in batches]
    g2 = gen(12)
    masker(batches[0], g2)
    saved = g2.get_state()
    g3 = torch.Generator()
    g3.set_state(saved)
    for b, (m, lab) in zip(batches[1:], straight[1:], strict=True):
        m2, lab2 = masker(b, g3)
        assert torch.equal(m, m2) and torch.equal(lab, lab2)


def test_draws_do_not_depend_on_content() -> None:
    # The generator advances by the same amount whatever the tokens are, so data with more or
    # fewer special tokens cannot shift the random stream of later batches.
    masker = MlmMasker(MASK, VOCAB, SPECIAL)
    g1, g2 = gen(13), gen(13)
    masker(plain_tokens((4, 64)), g1)
    masker(torch.zeros(4, 64, dtype=torch.long), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_input_is_not_modified_and_int32_works() -> None:
    ids = plain_tokens((4, 64)).to(torch.int32)
    before = ids.clone()
    masked, labels = mask_tokens(ids, gen(14), mask_id=MASK, vocab_size=VOCAB,
                                 special_ids=SPECIAL)
    assert torch.equal(ids, before)
    assert masked.dtype == torch.int32 and labels.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rate": 0.0}, "rate must be in"), ({"rate": 1.5}, "rate must be in"),
     ({"mask_frac": 0.9, "random_frac": 0.2}, "sum to at most 1"),
     ({"random_frac": -0.1}, "must be >= 0")],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


def test_vocab_with_only_special_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="no non-special token"):
        MlmMasker(MASK, 7, SPECIAL)
