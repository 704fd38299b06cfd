"""Ancestral sampling of binary latents with step skipping, temperature, guidance and inpainting.

`model_fn(z_t, t_over_T, cond) -> flip logits` with z_t (B, L, C) in {0, 1}, t_over_T (B,)
and any condition `cond` (a tensor, a dict or tuple of tensors batched on dim 0, or None).

Random draws come from one generator for the whole batch, or from one generator per row:
then row i's draws are exactly those it gets when sampled alone from its own generator (same
shapes, same order), so a batch of B seeds gives, bit for bit, the images each seed gives
alone, up to the float rounding of the network's batched forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bernoulli import bernoulli, flip_prob, posterior_one, z0_prob_from_flip_logits
from .schedule import sampling_times

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def _cat_cond(c: Any, n: Any) -> Any:
    """Stack a condition and its null along the batch for one forward of both branches."""
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return torch.cat([c, n], 0)
    if isinstance(c, dict):
        return {k: _cat_cond(c[k], n[k]) for k in c}
    if isinstance(c, (tuple, list)):
        return type(c)(_cat_cond(x, y) for x, y in zip(c, n))
    raise TypeError(f"unsupported condition type {type(c).__name__}")


def check_guidance_interval(interval: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1, else a ValueError naming diffusion.guidance_interval."""
    try:
        lo, hi = (float(x) for x in interval)
    except (TypeError, ValueError):
        raise ValueError(f"diffusion.guidance_interval must be two numbers [lo, hi], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"diffusion.guidance_interval must satisfy 0 <= lo <= hi <= 1, got [{lo:g}, {hi:g}]")
    return lo, hi


def guided_logits(model_fn: ModelFn, z_t: torch.Tensor, t_in: torch.Tensor, cond: Any, both: Any, tau: float,
                  w: float, one_shape: bool = False) -> torch.Tensor:
    """Flip logits with temperature and classifier-free guidance (poster):
    sigmoid((1 + w) T(z_t, t, c) / tau - w T(z_t, t) / tau).

    `both` is the condition and its null stacked on the batch (`_cat_cond`), built once per
    sampling call. w == 0 or both None runs the conditional branch alone, so it is exactly
    the conditional prediction; with `one_shape` a guided call (both given) runs both branches
    at w == 0 too and keeps the conditional one, so that a compiled model sees one batch shape.
    """
    if both is None or (w == 0 and not one_shape):
        return model_fn(z_t, t_in, cond) / tau
    out = model_fn(torch.cat([z_t, z_t], 0), torch.cat([t_in, t_in], 0), both)
    l_c, l_u = out.chunk(2, 0)
    if w == 0:
        return l_c / tau
    return ((1 + w) * l_c - w * l_u) / tau


def _uniform(shape: tuple[int, ...], generator: Generators, device) -> torch.Tensor:
    """U(0, 1) of `shape`; with a generator per row, row i drawn alone from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=torch.float32) for g in generator])


def _bernoulli(p: torch.Tensor, generator: Generators) -> torch.Tensor:
    """B(p) as float 0/1, the same comparison as `bernoulli`, with per-row generators allowed."""
    if generator is None or isinstance(generator, torch.Generator):
        return bernoulli(p, generator)
    return (_uniform(tuple(p.shape), generator, p.device) < p).float()


def _noised(known: torch.Tensor, a_t: torch.Tensor, generator: Generators) -> torch.Tensor:
    """z_t ~ q(z_t | known), drawn as `q_sample` draws it: known xor B((1 - a_t) / 2)."""
    flips = _bernoulli(flip_prob(a_t).expand_as(known), generator)
    return (known != flips).float()


def posterior_table(a_s: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z_s = 1 | z_t, z_0 = 1) and q(z_s = 1 | z_t, z_0 = 0), each (..., 2) indexed by z_t.

    For binary z_t and z_0 the posterior takes only these four values per step (docs/math.md
    (4)); a_s, a_t shaped (S, 1) give every step's table in one call. They come from
    `posterior_one`'s own float32 arithmetic, elementwise, so they are its values bit for bit.
    """
    bits = torch.arange(2.0, device=a_t.device)  # z_t = 0, 1 (made on the device: no host copy)
    one = posterior_one(bits, torch.ones_like(bits), a_s, a_t)
    zero = posterior_one(bits, torch.zeros_like(bits), a_s, a_t)
    return one, zero


def step_prob(z_t: torch.Tensor, flip_logits: torch.Tensor, one: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`p_step_prob` bit for bit from a step's `posterior_table` (2,), (2,), at a fraction of
    the cost: the posterior is selected per bit instead of computed per bit; the mixture
    over p_theta(z_0 | z_t) is p_step_prob's own.

    The selection is z q[1] + (1 - z) q[0], exact for z in {0, 1} (x * 0 + y = y), and
    several times faster than torch.where on a CPU.
    """
    nz = 1 - z_t
    q1 = z_t * one[1] + nz * one[0]  # q(z_s = 1 | z_t, z_0 = 1)
    q0 = z_t * zero[1] + nz * zero[0]  # q(z_s = 1 | z_t, z_0 = 0)
    p0 = z0_prob_from_flip_logits(z_t, flip_logits)
    return q1 * p0 + q0 * (1 - p0)


def _check(temperature: float, known, mask, inpaint: str) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both `known` and `mask`")
    if inpaint not in ("clamp", "renoise"):
        raise ValueError(f"inpaint must be 'clamp' or 'renoise', got {inpaint!r}")


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    a: torch.Tensor,
    steps: int,
    cond: Any = None,
    null_cond: Any = None,
    temperature: float = 1.0,
    guidance: float = 0.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    inpaint: str = "clamp",
    generator: Generators = None,
    device: torch.device | str = "cpu",
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    one_shape: bool = False,
) -> torch.Tensor:
    """Sample z_0 of `shape` (B, L, C) with S = `steps` evenly spaced steps of T = len(a) - 1.

    Guidance w applies at the steps whose t/T lies in `guidance_interval` [lo, hi]
    (Kynkaanniemi et al., NeurIPS 2024: guidance in a limited interval of noise levels); the
    other steps run the unguided conditional forward alone, on half the batch. [0, 1] is
    guidance at every step; [0, 0] at none (sampling times are t >= 1).
    Inpainting: `known` (B, L, C) bits and `mask` broadcastable to it, 1 where the bits are
    known and kept. After every step "clamp" sets z = m z_known + (1 - m) z; "renoise" keeps
    the known bits noised to the current time, z = m q(z_s | z_known) + (1 - m) z.
    `generator`: one for the batch, or a sequence of B, one per row (see the module note).
    `callback(i, t, z)` is called after each step. `one_shape`: a guided call runs the guided
    forward (2B rows) at the steps outside the interval too (`guided_logits`), the same logits
    at twice the work there: a compiled model then sees one shape. Returns float 0/1 latents.
    """
    _check(temperature, known, mask, inpaint)
    lo, hi = check_guidance_interval(guidance_interval)
    T = a.numel() - 1
    B = shape[0]
    a = a.to(device=device, dtype=torch.float32)
    if known is not None:
        known = known.to(device=device, dtype=torch.float32)
        mask = mask.to(device=device, dtype=torch.float32).expand_as(known)
    times = sampling_times(T, steps)
    nxt = times[1:] + [0]  # s, the time each step goes to
    one, zero = posterior_table(a[nxt][:, None], a[times][:, None])  # (S, 2) each, every step's at once
    both = _cat_cond(cond, null_cond) if guidance != 0 and null_cond is not None else None  # once per call
    z = _bernoulli(torch.full(shape, 0.5, device=device), generator)  # z_T ~ B(0.5)
    if known is not None and inpaint == "renoise":
        z = mask * _noised(known, a[T], generator) + (1 - mask) * z
    elif known is not None:
        z = mask * known + (1 - mask) * z
    for i, t in enumerate(times):
        t_in = torch.full((B,), t / T, device=device)
        w = guidance if lo <= t / T <= hi else 0.0
        logits = guided_logits(model_fn, z, t_in, cond, both, temperature, w, one_shape).float()
        s = nxt[i]
        if s == 0:
            z = (z0_prob_from_flip_logits(z, logits) > 0.5).float()  # final threshold
        else:
            z = _bernoulli(step_prob(z, logits, one[i], zero[i]), generator)
        if known is not None:
            kept = known if (inpaint == "clamp" or s == 0) else _noised(known, a[s], generator)
            z = mask * kept + (1 - mask) * z
        if callback is not None:
            callback(i, s, z)
    return z
