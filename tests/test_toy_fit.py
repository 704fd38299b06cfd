"""End to end on a known distribution: a tiny denoiser learns a mixture of 8 bit patterns.

The patterns are 4x4 grids of 8 bits with unequal weights. After at most 60 s of CPU
training, 16-step samples must be exact patterns (>= 95%) with frequencies within total
variation 0.1 of the true weights.
"""

import time

import torch

from bld_t2i.config import DenoiserConfig
from bld_t2i.diffusion import diffusion_loss, keep_factors, sample
from bld_t2i.models.denoiser import Denoiser


def test_toy_mixture_fit():
    g = torch.Generator().manual_seed(0)
    K, L, C = 8, 16, 8
    patterns = torch.randint(0, 2, (K, L, C), generator=g).float()
    weights = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    a = keep_factors(64, "linear").float()
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(preset="tiny", conditioning="none"), (4, 4, C))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    def model_fn(z, t, cond):
        return model(z, t, cond)

    start = time.time()
    step = 0
    while time.time() - start < 45 and step < 3000:
        idx = torch.multinomial(weights, 256, replacement=True, generator=g)
        loss, _, _ = diffusion_loss(model_fn, patterns[idx], None, a, "bce", generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    assert time.time() - start < 60

    model.eval()
    n = 2000
    z = sample(model_fn, (n, L, C), a, steps=16, generator=torch.Generator().manual_seed(1))
    match = (z[:, None] == patterns[None]).flatten(2).all(-1)  # (n, K)
    exact = match.any(1)
    assert exact.float().mean() >= 0.95, f"only {exact.float().mean():.3f} exact patterns after {step} steps"
    freq = match.float().sum(0) / exact.sum()
    tv = 0.5 * (freq - weights).abs().sum().item()
    assert tv <= 0.1, f"total variation {tv:.3f} (freq {freq.tolist()})"
