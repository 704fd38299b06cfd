"""Multivariate Bernoulli diffusion: noising, posterior, model step and loss.

Plain tensor functions, docs/math.md (1)-(7). Latents are float tensors of 0/1 of any shape;
keep factors `a_*` broadcast against them (pass per-sample values shaped (B, 1, 1)).
Every random draw takes an optional torch.Generator so results are reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bernoulli(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """B(p) as a float 0/1 tensor."""
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
    return (u < p).to(p.dtype if p.is_floating_point() else torch.float32)


def flip_prob(a: torch.Tensor) -> torch.Tensor:
    """Probability that a bit flips under keep factor a: (1 - a) / 2."""
    return (1.0 - a) / 2.0


def q_sample(z_0: torch.Tensor, a_t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_t ~ q(z_t | z_0) = B(z_0 a_t + (1 - a_t) / 2), drawn as z_0 xor B((1 - a_t)/2)."""
    flips = bernoulli(flip_prob(a_t).to(z_0.dtype).expand_as(z_0), generator)
    return (z_0 != flips).to(z_0.dtype)


def q_step_sample(
    z_s: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z_t ~ q(z_t | z_s) for s < t: the same flip with keep factor a_t / a_s."""
    return q_sample(z_s, a_t / a_s, generator)


def posterior_one(z_t: torch.Tensor, z_0: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """q(z_s = 1 | z_t, z_0) for any s < t, by Bayes: docs/math.md (4).

    z_0 may be a 0/1 tensor or a probability (the result is then linear in it only
    through q(z_s | z_0); use `p_step_prob` for the model's mixture over z_0).
    """
    r = a_t / a_s  # keep factor from s to t
    lik1 = torch.where(z_t > 0.5, (1 + r) / 2, (1 - r) / 2)  # q(z_t | z_s = 1)
    lik0 = torch.where(z_t > 0.5, (1 - r) / 2, (1 + r) / 2)  # q(z_t | z_s = 0)
    prior1 = z_0 * a_s + (1 - a_s) / 2  # q(z_s = 1 | z_0)
    num1 = lik1 * prior1
    num0 = lik0 * (1 - prior1)
    return num1 / (num1 + num0)


def z0_prob_from_flip_logits(z_t: torch.Tensor, flip_logits: torch.Tensor) -> torch.Tensor:
    """p_theta(z_0 = 1 | z_t) = z_t (1 - sigmoid(l)) + (1 - z_t) sigmoid(l)."""
    p_flip = torch.sigmoid(flip_logits)
    return z_t * (1 - p_flip) + (1 - z_t) * p_flip


def p_step_prob(z_t: torch.Tensor, flip_logits: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """p_theta(z_s = 1 | z_t) = sum_x q(z_s = 1 | z_t, z_0 = x) p_theta(z_0 = x | z_t)."""
    p0 = z0_prob_from_flip_logits(z_t, flip_logits)
    one = posterior_one(z_t, torch.ones_like(z_t), a_s, a_t)
    zero = posterior_one(z_t, torch.zeros_like(z_t), a_s, a_t)
    return one * p0 + zero * (1 - p0)


def flip_loss(
    flip_logits: torch.Tensor,
    z_0: torch.Tensor,
    z_t: torch.Tensor,
    kind: str = "balanced",
    per_sample: bool = False,
) -> torch.Tensor:
    """BCE of the flip logits against the flip target z_0 xor z_t, docs/math.md (7).

    Flipped bits weigh w = 1 - r and kept bits r, r the sample's flip fraction (clamped to
    [1/(2N), 1 - 1/(2N)] so a sample without flips keeps a finite weight):
    kind="balanced": sum(w bce) / sum(w), each sample weighs the same;
    kind="authors": mean(w bce) over the N bits, the authors' default, a sample weighs 2 r (1 - r);
    kind="bce": the plain mean over all bits.
    """
    target = (z_0 != z_t).to(flip_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(flip_logits, target, reduction="none")
    bce = bce.flatten(1)  # (B, N)
    if kind == "bce":
        loss = bce.mean(1)
    else:
        t = target.flatten(1)
        n = t.shape[1]
        r = t.mean(1, keepdim=True).clamp(0.5 / n, 1 - 0.5 / n)
        w = torch.where(t > 0.5, 1 - r, r)
        loss = (w * bce).sum(1) / w.sum(1) if kind == "balanced" else (w * bce).mean(1)
    return loss if per_sample else loss.mean()


def aux_posterior_loss(
    flip_logits: torch.Tensor, z_0: torch.Tensor, z_t: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor
) -> torch.Tensor:
    """The optional variational term: BCE between p_theta(z_s | z_t) and q(z_s | z_t, z_0)."""
    target = posterior_one(z_t, z_0, a_s, a_t).detach()
    pred = p_step_prob(z_t, flip_logits, a_s, a_t).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(pred, target)


def check_t_power(t_power: float) -> float:
    """diffusion.t_power must be > 0 (docs/math.md (7a))."""
    if not t_power > 0:
        raise ValueError(f"diffusion.t_power must be > 0, got {t_power}")
    return t_power


def draw_times(B: int, T: int, t_power: float = 1.0, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) training times in 1..T, docs/math.md (7a): U{1..T} for t_power 1, else
    t = ceil(T u^(1 / t_power)), u ~ U(0, 1), whose density grows as t^(t_power - 1)."""
    if check_t_power(t_power) == 1.0:
        return torch.randint(1, T + 1, (B,), generator=generator, device=device)
    u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    return (u.pow(1.0 / t_power) * T).ceil().clamp(1, T).long()


def training_example(
    z_0: torch.Tensor, a: torch.Tensor, generator: torch.Generator | None = None, t_power: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw t per sample (`draw_times`) and z_t ~ q(z_t | z_0).

    Returns (z_t, t (B,) long, t / T (B,) float): the model's time input is t / T,
    never normalised by the number of sampling steps (docs/math.md (5)).
    """
    T = a.numel() - 1
    B = z_0.shape[0]
    t = draw_times(B, T, t_power, generator, z_0.device)
    a_t = a.to(z_0.device, z_0.dtype)[t].view(B, *([1] * (z_0.dim() - 1)))
    z_t = q_sample(z_0, a_t, generator)
    return z_t, t, t.to(torch.float32) / T


def diffusion_loss(
    model_fn,
    z_0: torch.Tensor,
    cond,
    a: torch.Tensor,
    kind: str = "balanced",
    aux_weight: float = 0.0,
    generator: torch.Generator | None = None,
    t_power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training loss: returns (scalar loss, per-sample flip loss, t)."""
    z_t, t, t_in = training_example(z_0, a, generator, t_power)
    logits = model_fn(z_t, t_in, cond)
    per_sample = flip_loss(logits, z_0, z_t, kind, per_sample=True)
    loss = per_sample.mean()
    if aux_weight > 0:
        shape = (-1, *([1] * (z_0.dim() - 1)))
        a_dev = a.to(z_0.device, z_0.dtype)
        loss = loss + aux_weight * aux_posterior_loss(
            logits, z_0, z_t, a_dev[t - 1].view(shape), a_dev[t].view(shape)
        )
    return loss, per_sample.detach(), t
