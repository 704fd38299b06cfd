"""Validation on held-out data while training (`val` section), for both trainers.

Both read the first `val.max_samples` samples of `val.shards` in the same order on every rank
(one world-size-1 view of the shards, seeded by run.seed), sort them by key and give rank r
every world-th one; each rank scores its share with the EMA weights and one all-reduce sums
the scores. Sums are float64, so the result depends only on the weights and the data: not
on the world size, the batch size or the step.

Denoiser: the training loss of docs/math.md (7) (`diffusion.loss`, conditional, no caption
dropout) of every sample at `val.t_values` fixed times t (`validation_times`), on z_t drawn
with noise seeded by (run.seed, t, sample key) alone (`keyed_z_t`). Logged as `val/loss` and
`val/loss_t{t}`.

Autoencoder: the deterministic code's reconstructions: `val/l1`, `val/psnr`, `val/ssim`, the
colour error `val/colour_error` (per image and RGB channel, |mean reconstructed value - mean
input value| in 8-bit levels, averaged: a hue shift such as red turning orange) with the signed
mean shift per channel `val/colour_shift_{r,g,b}`, and the code's bit usage over the held-out
set: per-channel rates of ones (min and max logged, all in eval.json), dead (rate < 1%) and
saturated (> 99%) channels, their fraction `val/dead_bits`, and the mean per-bit entropy
`val/bit_entropy` (MaskBit and BSQ-ViT track bit usage: dead bits are the binary tokenizers'
common failure).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from bld_t2i import distributed as D
from bld_t2i.config import Config
from bld_t2i.data.images import image_loader
from bld_t2i.data.latents import latent_loader, unpack_bits_tensor
from bld_t2i.diffusion import flip_loss
from bld_t2i.diffusion.bernoulli import flip_prob
from bld_t2i.models.ae_losses import psnr, ssim

DEAD, SATURATED = 0.01, 0.99  # a channel whose rate of ones is below / above is dead / saturated


def validation_times(T: int, n: int) -> list[int]:
    """n fixed times in 1..T: the midpoints of n equal bins of (0, T], rounded up (distinct for n <= T)."""
    if not 1 <= n <= T:
        raise ValueError(f"val.t_values must be in [1, diffusion.T = {T}], got {n}")
    return [min(T, max(1, -(-(2 * k + 1) * T // (2 * n)))) for k in range(n)]


def key_seed(seed: int, t: int, key: str) -> int:
    """A 63-bit seed from (run seed, t, sample key) alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{t}/{key}".encode()).digest()[:8], "little") >> 1


def keyed_z_t(z_0: torch.Tensor, a_t: float, keys: list[str], seed: int, t: int) -> torch.Tensor:
    """z_t ~ q(z_t | z_0) of docs/math.md (3) per sample, each drawn from its own `key_seed`:
    z_0 (B, ...) 0/1 -> z_t, the same for a sample whatever batch it is in."""
    u = torch.stack([torch.rand(z_0.shape[1:], generator=torch.Generator().manual_seed(key_seed(seed, t, k)))
                     for k in keys]).to(z_0.device)
    return (z_0 != (u < flip_prob(torch.tensor(a_t)))).to(z_0.dtype)


class Share(NamedTuple):
    """This rank's held-out samples, as the loader gives them (dicts of one sample each)."""

    samples: list[dict]
    total: int  # held-out samples over all ranks


def _unbatch(batches: Iterator[dict], limit: int) -> list[dict]:
    out = []
    for batch in batches:
        for i in range(len(batch["key"])):
            out.append({k: (v[i] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()})
            if len(out) == limit:
                return out
    return out


def _share(samples: list[dict]) -> Share:
    info = D.dist_info()
    ordered = sorted(samples, key=lambda s: s["key"])
    return Share(ordered[info.rank::info.world_size], len(ordered))


def _batches(share: list[dict], batch_size: int) -> Iterator[list[dict]]:
    """The share in key order, in batches of one grid (buckets may differ)."""
    by_grid: dict[tuple, list[dict]] = {}
    for s in share:
        by_grid.setdefault(tuple(s.get("grid") or ()), []).append(s)
    for group in by_grid.values():
        for i in range(0, len(group), batch_size):
            yield group[i: i + batch_size]


# ----------------------------------------------------------------------------- the denoiser


def read_heldout_latents(cfg: Config, fingerprint: str, latent_shape, legacy: tuple[str, ...],
                         tokenize=None) -> Share:
    """This rank's share of the held-out latents (checked against the autoencoder as training's),
    with the captions' token ids where the trainer encodes text (`tokenize`, its text encoder's)."""
    view = dataclasses.replace(cfg.latents, shards=cfg.val.shards, shuffle_window=1, num_workers=0, resampled=False)
    loader = latent_loader(view, cfg.run.seed, fingerprint, latent_shape, rank=0, world_size=1, finite=True,
                           legacy_fingerprints=legacy, tokenize=tokenize)
    return _share(_unbatch(iter(loader), cfg.val.max_samples))


def _collate_latents(samples: list[dict]) -> dict:
    batch = {"packed": torch.stack([s["packed"] for s in samples]), "grid": samples[0]["grid"],
             "key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
             "label": torch.stack([s["label"] for s in samples])}
    if "text_ids" in samples[0]:
        batch.update(text_ids=torch.stack([s["text_ids"] for s in samples]),
                     text_mask=torch.stack([s["text_mask"] for s in samples]))
    if "emb" in samples[0]:
        embs = [s["emb"][s["emb_mask"]] for s in samples]  # each caption's real tokens
        n = max(e.shape[0] for e in embs)
        batch["emb"] = torch.zeros(len(embs), n, embs[0].shape[-1], dtype=embs[0].dtype)
        batch["emb_mask"] = torch.zeros(len(embs), n, dtype=torch.bool)
        for i, e in enumerate(embs):
            batch["emb"][i, : len(e)], batch["emb_mask"][i, : len(e)] = e, True
    return batch


@torch.no_grad()
def denoiser_val_loss(model: torch.nn.Module, share: Share, condition: Callable[[dict], dict | None], cfg: Config,
                      a: torch.Tensor, device: torch.device) -> dict[str, float]:
    """`val/loss` and `val/loss_t{t}` of `model` (the EMA weights) on the held-out share; a
    collective. `condition(batch)`: the trainer's condition of a batch; `a`: the keep factors."""
    times = validation_times(cfg.diffusion.T, cfg.val.t_values)
    sums = torch.zeros(len(times) + 1, dtype=torch.float64, device=device)  # per t, then the sample count
    model.eval()
    for samples in _batches(share.samples, cfg.latents.batch_size):
        batch = _collate_latents(samples)
        shape = (*batch["grid"], model.latent_shape[2])
        z_0 = unpack_bits_tensor(batch["packed"].to(device), shape).float()  # (B, h*w, C)
        cond = condition(batch)
        for i, t in enumerate(times):
            z_t = keyed_z_t(z_0, float(a[t]), batch["key"], cfg.run.seed, t)
            t_in = torch.full((len(z_0),), t / cfg.diffusion.T, dtype=torch.float32, device=device)
            logits = model(z_t, t_in, cond, grid=tuple(batch["grid"])).float()
            sums[i] += flip_loss(logits, z_0, z_t, cfg.diffusion.loss, per_sample=True).double().sum()
        sums[-1] += len(z_0)
    total = D.all_reduce_sum(sums).tolist()
    n = total[-1]
    if n == 0:
        raise ValueError(f"val.shards {cfg.val.shards!r}: no held-out sample could be read")
    record = {f"val/loss_t{t}": s / n for t, s in zip(times, total)}
    return {"val/loss": sum(total[:-1]) / (n * len(times)), **record, "val/samples": int(n)}


# ----------------------------------------------------------------------------- the autoencoder


def read_heldout_images(cfg: Config) -> Share:
    view = dataclasses.replace(cfg.data, shuffle_window=1, num_workers=0, resampled=False)
    loader = image_loader(view, cfg.run.seed, rank=0, world_size=1, finite=True, shards=cfg.val.shards)
    return _share(_unbatch(iter(loader), cfg.val.max_samples))


@torch.no_grad()
def autoencoder_val_metrics(ae, share: Share, code_shape: tuple[int, int, int], batch_size: int,
                            device: torch.device, shown: int = 0) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """The held-out metrics of `ae` (the module docstring), a collective; and up to `shown`
    images of this rank's share with their reconstructions, for a grid. `code_shape`: (h, w, C)
    of the held-out images' codes."""
    ae.eval()
    sums = dict.fromkeys(("l1", "psnr", "ssim", "colour_error", "colour_shift_r", "colour_shift_g", "colour_shift_b"), 0.0)
    ones, count, picked = None, 0, None
    for samples in _batches(share.samples, batch_size):
        x = torch.stack([s["image"] for s in samples]).to(device)
        bits = ae.encode(x)  # (B, h, w, C) bool
        x_hat = ae.decode(bits).float()
        sums["l1"] += (x - x_hat).abs().flatten(1).mean(1).double().sum().item()
        sums["psnr"] += psnr(x, x_hat).double().sum().item()
        sums["ssim"] += ssim(x, x_hat).double().sum().item()
        shift = (x_hat.clamp(-1, 1) - x).mean(dim=(2, 3)).double() * 127.5  # (B, 3) in 8-bit levels
        sums["colour_error"] += shift.abs().mean(1).sum().item()
        for c, name in enumerate("rgb"):
            sums[f"colour_shift_{name}"] += shift[:, c].sum().item()
        per_bit = bits.double().sum(0)  # (h, w, C) ones over the batch
        ones = per_bit if ones is None else ones + per_bit
        count += len(x)
        if picked is None and shown:
            picked = (x[:shown].cpu(), x_hat[:shown].cpu())
    if ones is None:  # this rank has no share (fewer held-out images than ranks): zeros to the sum
        ones = torch.zeros(code_shape, dtype=torch.float64, device=device)
    totals = D.all_reduce_sum(torch.cat([torch.tensor([*sums.values(), count], dtype=torch.float64, device=device),
                                         ones.reshape(-1)]))
    n = totals[len(sums)].item()
    if n == 0:
        raise ValueError("val.shards: no held-out image could be read")
    q = (totals[len(sums) + 1:] / n).view(*code_shape)  # (h, w, C) rate of ones per bit
    rates = q.mean(dim=(0, 1))  # (C,) per channel
    p = q.clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log2() + (1 - p) * (1 - p).log2())
    dead, saturated = int((rates < DEAD).sum()), int((rates > SATURATED).sum())
    metrics = {**{f"val/{k}": v / n for k, v in zip(sums, totals.tolist())}, "val/images": int(n),
               "val/bit_entropy": float(entropy.mean()), "val/dead_channels": dead, "val/saturated_channels": saturated,
               "val/dead_bits": (dead + saturated) / len(rates), "val/bit_rate_min": float(rates.min()),
               "val/bit_rate_max": float(rates.max())}
    return {**metrics, "val/bit_rates": [round(float(r), 6) for r in rates]}, picked
