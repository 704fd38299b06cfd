"""Noise schedules, given by the cumulative keep factor a_t (docs/math.md (2)).

q(z_t | z_0) = B(z_0 a_t + (1 - a_t) / 2): each bit flips with probability (1 - a_t)/2.
Everything downstream needs only a_t for t = 0..T, with a_0 = 1 and a_T = 0.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def keep_factors(T: int, schedule: str = "linear", dtype=torch.float64) -> torch.Tensor:
    """a_t for t = 0..T, shape (T + 1,).

    linear: the authors' beta_t = 1 / (T - t + 1), whose product is exactly a_t = 1 - t/T.
    cosine: a_t = 0.5 + 0.5 cos(pi t / T).
    """
    if T < 1:
        raise ValueError(f"diffusion.T must be >= 1, got {T}")
    t = torch.arange(T + 1, dtype=dtype)
    if schedule == "linear":
        a = 1.0 - t / T
    elif schedule == "cosine":
        a = 0.5 + 0.5 * torch.cos(math.pi * t / T)
    else:
        raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}")
    a[0], a[T] = 1.0, 0.0  # exact ends: z_0 is data, z_T is pure noise B(0.5)
    return a


def sampling_times(T: int, steps: int) -> list[int]:
    """S evenly spaced times T = t_S > ... > t_1 >= 1 (the sampler then jumps to 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in 1..T={T}, got {steps}")
    return torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
