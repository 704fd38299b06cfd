"""End to end on a known distribution: a tiny denoiser learns a mixture of 8 bit patterns.

The patterns are 4x4 grids of 8 bits with unequal weights. Training runs for 52 s on the
clock (the issue allows 60) with a linear warm-up and a cosine decay of the learning rate
over that time, so a slower machine gets fewer steps but the same schedule. The verdict, on
2,000 fresh 16-step samples, is the issue's bar: at least 95% exact patterns and pattern
frequencies within total variation 0.1 of the true weights.

Measured on the 2-core CPU machine (its speed varies by up to ~30% with the host's load):
2,383-2,392 steps in 52 s give 98.6-98.9% exact, TV 0.056; a budget cut to 30-35 s
(1,380-1,490 steps, a machine 1.6x slower) still gives 96.4%, TV 0.09. The exact-posterior
oracle with the same sampler gives 100% and TV 0.03 (the sampling noise of 2,000 draws).
What moved it from ~75% to above 95%: batch 48, the balanced loss, the fused AdamW step
(~20% faster than foreach here), and the denoiser's small init of its last layers (a CI run
on a slow day trained 2,251 steps with the xavier init and missed the bar at 93.7%).
"""

import math
import time

import torch

from bld_t2i.config import DenoiserConfig
from bld_t2i.diffusion import diffusion_loss, keep_factors, sample
from bld_t2i.models.denoiser import Denoiser

K, L, C = 8, 16, 8
WEIGHTS = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
BUDGET_S = 52
BATCH = 48
LR = 3e-3
WARMUP = 100


def _score(model_fn, patterns, a, n, seed):
    z = sample(model_fn, (n, L, C), a, steps=16, generator=torch.Generator().manual_seed(seed))
    match = (z[:, None] == patterns[None]).flatten(2).all(-1)  # (n, K)
    exact = match.any(1)
    freq = match.float().sum(0) / exact.sum().clamp(min=1)
    return exact.float().mean().item(), 0.5 * (freq - WEIGHTS).abs().sum().item()


def test_toy_mixture_fit():
    # At most two threads: the matmuls are tiny, and more threads only add sync overhead.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        _fit()
    finally:
        torch.set_num_threads(threads)


def _fit():
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2, (K, L, C), generator=g).float()
    a = keep_factors(64, "linear").float()
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(preset="tiny", conditioning="none"), (4, 4, C))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)

    def model_fn(z, t, cond):
        return model(z, t, cond)

    start = time.time()
    step = 0
    while (elapsed := time.time() - start) < BUDGET_S:
        lr = LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * elapsed / BUDGET_S))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.multinomial(WEIGHTS, BATCH, replacement=True, generator=g)
        loss, _, _ = diffusion_loss(model_fn, patterns[idx], None, a, "balanced", generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    assert time.time() - start < 60

    model.eval()
    exact, tv = _score(model_fn, patterns, a, 2000, seed=1)  # fresh samples for the verdict
    print(f"toy fit: {step} steps in {BUDGET_S} s, {exact:.3f} exact, TV {tv:.3f}")
    assert exact >= 0.95, f"only {exact:.3f} exact patterns after {step} steps"
    assert tv <= 0.1, f"total variation {tv:.3f} after {step} steps"
