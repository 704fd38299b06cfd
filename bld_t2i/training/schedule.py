"""What depends on progress: the learning rate, the EMA decay and every step's random draws."""

from __future__ import annotations

import math

import numpy as np
import torch

from bld_t2i.config import OptimConfig


def lr_at(cfg: OptimConfig, samples: int, total: int) -> float:
    """Linear warm-up over `warmup_samples`, then cosine/linear decay to `min_lr_ratio * lr`."""
    if samples < cfg.warmup_samples:
        return cfg.lr * (samples + 1) / cfg.warmup_samples
    progress = min(1.0, (samples - cfg.warmup_samples) / max(1, total - cfg.warmup_samples))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[cfg.decay]
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def ema_decay_at(decay: float, warmup: bool, updates: int) -> float:
    """The EMA decay of the update after `updates` earlier ones: `decay`, or with warm-up
    min(decay, (1 + n) / (10 + n)) (docs/math.md (12)), so the average forgets the random
    initial weights within the first steps and a short run's export is not mostly init."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def step_generator(seed: int, rank: int, samples: int, device: torch.device | str) -> torch.Generator:
    """The RNG of one micro-step, from (seed, rank, samples seen before it): a resumed run,
    on any number of ranks, draws from the same streams as an uninterrupted one would."""
    state = int(np.random.SeedSequence([seed, rank, samples]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)
