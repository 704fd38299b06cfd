"""Per-bit statistics of sampled latents against the data's: they need no weights.

The bit rate of channel c is the fraction of ones in channel c over every sample and grid
cell, p_c = mean over (n, i, j) of z[n, i, j, c]. Against the data's rates q_c (from the
latent shards, counted during the neighbour search's one pass):

- `bit_rate_diff_mean` = mean_c |p_c - q_c|, `bit_rate_diff_max` = max_c |p_c - q_c|;
- `dead_or_saturated` = the fraction of channels with p_c < 0.01 or p_c > 0.99, beside
  `data_dead_or_saturated`, the same fraction of the data's channels.

A denoiser that ignores its condition still matches the data's rates overall, but one that
collapses (or a sampler with a bad temperature) leaves channels stuck at 0 or 1 and moves
the rates; compare per setting.
"""

from __future__ import annotations

import numpy as np

from bld_t2i.data.latents import unpack_bits

LOW, HIGH = 0.01, 0.99  # a channel below LOW is dead, above HIGH saturated


def channel_rates(bits: np.ndarray) -> np.ndarray:
    """(N, ..., C) 0/1 -> (C,) fraction of ones per channel (the last axis)."""
    flat = bits.reshape(-1, bits.shape[-1])
    return flat.mean(0, dtype=np.float64)


class ChannelCounter:
    """Ones per channel, accumulated over packed latents of one shape (the data's rates)."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(shape)
        self.ones = np.zeros(self.shape[-1], np.int64)
        self.latents = 0

    def add(self, packed: np.ndarray) -> None:
        """packed (N, nbytes) uint8, the latent shards' layout."""
        for lo in range(0, len(packed), 4096):  # bounded memory: 4096 unpacked latents at a time
            bits = unpack_bits(packed[lo : lo + 4096], self.shape)  # (n, h*w, C)
            self.ones += bits.sum((0, 1), dtype=np.int64)
        self.latents += len(packed)

    @property
    def rates(self) -> np.ndarray:
        if not self.latents:
            raise ValueError("no latents counted")
        h, w, _ = self.shape
        return self.ones / (self.latents * h * w)


def dead_or_saturated(rates: np.ndarray, low: float = LOW, high: float = HIGH) -> float:
    return float(((rates < low) | (rates > high)).mean())


def bit_stats(sample_rates: np.ndarray, data_rates: np.ndarray) -> dict[str, float]:
    """The per-setting numbers of the report from (C,) rates of the samples and of the data."""
    if sample_rates.shape != data_rates.shape:
        raise ValueError(f"sample rates {sample_rates.shape} and data rates {data_rates.shape} differ in channels")
    diff = np.abs(sample_rates - data_rates)
    return {"bit_rate_diff_mean": float(diff.mean()), "bit_rate_diff_max": float(diff.max()),
            "dead_or_saturated": dead_or_saturated(sample_rates),
            "data_dead_or_saturated": dead_or_saturated(data_rates)}
