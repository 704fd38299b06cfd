"""Caption dropout for classifier-free guidance: per sample, at the rate asked for, not inverted."""

import math

import pytest
import torch

from bld_t2i.models.conditioning import drop_condition

D = 8


def text_cond(B: int, N: int, fill: float) -> dict:
    return {
        "tokens": torch.full((B, N, D), fill),
        "mask": torch.ones(B, N, dtype=torch.bool),
        "pooled": torch.full((B, D), fill),
    }


def test_realised_rate_is_p_per_sample():
    """100k samples in one batch: the drop rate is within 4 standard errors of p = 0.1, so
    neither dropping whole batches nor an inverted mask (rate 0.9) could pass."""
    n, p = 100_000, 0.1
    labels = torch.arange(n) % 7
    cond, dropped = drop_condition({"label": labels}, {"label": torch.full((n,), 7)}, p, torch.Generator().manual_seed(0))
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
    # Dropped samples carry the null condition, the others their own.
    assert torch.equal(cond["label"][dropped], torch.full((int(dropped.sum()),), 7))
    assert torch.equal(cond["label"][~dropped], labels[~dropped])


def test_rate_over_many_small_batches():
    gen = torch.Generator().manual_seed(1)
    drops = [drop_condition(text_cond(8, 3, 1.0), text_cond(8, 2, 0.0), 0.1, gen)[1] for _ in range(2000)]
    dropped = torch.stack(drops)  # (2000, 8)
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    # Per sample, not per batch: batches with some but not all samples dropped are common.
    mixed = ((dropped.sum(1) > 0) & (dropped.sum(1) < 8)).float().mean().item()
    assert mixed > 0.5


@pytest.mark.parametrize("p,expected", [(0.0, False), (1.0, True)])
def test_edge_rates(p, expected):
    cond, dropped = drop_condition(text_cond(1000, 4, 1.0), text_cond(1000, 4, 0.0), p, torch.Generator().manual_seed(2))
    assert dropped.tolist() == [expected] * 1000
    assert (cond["tokens"] == (0.0 if expected else 1.0)).all()


def test_token_sequences_of_different_lengths_are_padded_and_masked():
    gen = torch.Generator().manual_seed(3)
    B = 64
    for n_cond, n_null in [(5, 2), (2, 5)]:
        null = text_cond(1, n_null, 0.0)  # batch 1 broadcasts
        cond, dropped = drop_condition(text_cond(B, n_cond, 1.0), null, 0.5, gen)
        n = max(n_cond, n_null)
        assert cond["tokens"].shape == (B, n, D) and cond["mask"].shape == (B, n)
        lengths = torch.where(dropped, n_null, n_cond)
        assert torch.equal(cond["mask"].sum(1), lengths)
        assert torch.equal(cond["pooled"][:, 0], (~dropped).float())
        assert (cond["tokens"][~cond["mask"]] == 0).all()  # padding is zeros, masked out


def test_learned_null_flag_and_reproducibility():
    null = {**text_cond(16, 1, 0.0), "null": torch.ones(16, dtype=torch.bool)}
    a, da = drop_condition(text_cond(16, 3, 1.0), null, 0.3, torch.Generator().manual_seed(4))
    b, db = drop_condition(text_cond(16, 3, 1.0), null, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a["null"], da) and torch.equal(da, db)


def test_unconditional_and_bad_input():
    assert drop_condition(None, None, 0.1) == (None, None)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        drop_condition({"label": torch.zeros(2, dtype=torch.long)}, {"label": torch.zeros(2, dtype=torch.long)}, 1.5)
    with pytest.raises(ValueError, match="keys"):
        drop_condition({"label": torch.zeros(2, dtype=torch.long)}, text_cond(2, 1, 0.0), 0.1)
