"""EMA warm-up: the decay min(decay, (1 + n) / (10 + n)) (docs/math.md (12))."""

import torch

from bld_t2i.training.ema import EMA
from bld_t2i.training.schedule import ema_decay_at


def test_warmup_decay_grows_to_the_configured_one():
    assert ema_decay_at(0.999, False, 0) == 0.999
    assert [round(ema_decay_at(0.999, True, n), 4) for n in (0, 1, 10, 100)] == [0.1, 0.1818, 0.55, 0.9182]
    assert ema_decay_at(0.999, True, 10**6) == 0.999  # capped at the configured decay
    assert ema_decay_at(0.995, True, 1790) == 0.995  # (1 + n) / (10 + n) reaches 0.995 at n = 1790


def _average(warmup: bool, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA of a weight that walks from 0 to 1 in `steps` updates: (ema, weight)."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model)
    for n in range(steps):
        with torch.no_grad():
            model.weight.fill_((n + 1) / steps)
        ema.update(ema_decay_at(0.999, warmup, n))
    return ema.full_state()["weight"], model.weight.detach()


def test_a_short_run_with_warmup_averages_trained_weights_not_the_init():
    plain, w = _average(False, 200)
    warm, _ = _average(True, 200)
    assert float(plain) < 0.12  # 0.999 over 200 steps: ~90% of the average is still the zero init
    assert float(warm) > 0.85 and float(warm) < float(w)  # it trails the weights, as an average must
