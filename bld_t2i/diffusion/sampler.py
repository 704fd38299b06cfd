"""Ancestral sampling of binary latents with step skipping, temperature, guidance and inpainting.

`model_fn(z_t, t_over_T, cond) -> flip logits` with z_t (B, L, C) in {0, 1}, t_over_T (B,)
and any condition `cond` (a tensor, a dict or tuple of tensors batched on dim 0, or None).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .bernoulli import bernoulli, p_step_prob, q_sample, z0_prob_from_flip_logits
from .schedule import sampling_times

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


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


def guided_logits(
    model_fn: ModelFn, z_t: torch.Tensor, t_in: torch.Tensor, cond: Any, null_cond: Any, tau: float, w: float
) -> torch.Tensor:
    """Flip logits with temperature and classifier-free guidance (poster):
    sigmoid((1 + w) T(z_t, t, c) / tau - w T(z_t, t) / tau).
    w == 0 runs the conditional branch alone, so it is exactly the conditional prediction.
    """
    if w == 0 or null_cond is None:
        return model_fn(z_t, t_in, cond) / tau
    both = model_fn(torch.cat([z_t, z_t], 0), torch.cat([t_in, t_in], 0), _cat_cond(cond, null_cond))
    l_c, l_u = both.chunk(2, 0)
    return ((1 + w) * l_c - w * l_u) / tau


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
    known: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    inpaint: str = "clamp",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Sample z_0 of `shape` (B, L, C) with S = `steps` evenly spaced steps of T = len(a) - 1.

    Inpainting: `known` (B, L, C) bits and `mask` broadcastable to it, 1 where the bits are
    known and kept. After every step "clamp" sets z = m z_known + (1 - m) z; "renoise" keeps
    the known bits noised to the current time, z = m q(z_s | z_known) + (1 - m) z.
    `callback(i, t, z)` is called after each step. Returns float 0/1 latents.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (known is None) != (mask is None):
        raise ValueError("inpainting needs both `known` and `mask`")
    if inpaint not in ("clamp", "renoise"):
        raise ValueError(f"inpaint must be 'clamp' or 'renoise', got {inpaint!r}")
    T = a.numel() - 1
    B = shape[0]
    a = a.to(device=device, dtype=torch.float32)
    if known is not None:
        known = known.to(device=device, dtype=torch.float32)
        mask = mask.to(device=device, dtype=torch.float32).expand_as(known)
    times = sampling_times(T, steps)
    z = bernoulli(torch.full(shape, 0.5, device=device), generator)  # z_T ~ B(0.5)
    if known is not None and inpaint == "renoise":
        z = mask * q_sample(known, a[T], generator) + (1 - mask) * z
    elif known is not None:
        z = mask * known + (1 - mask) * z
    for i, t in enumerate(times):
        t_in = torch.full((B,), t / T, device=device)
        logits = guided_logits(model_fn, z, t_in, cond, null_cond, temperature, guidance).float()
        s = times[i + 1] if i + 1 < len(times) else 0
        if s == 0:
            z = (z0_prob_from_flip_logits(z, logits) > 0.5).float()  # final threshold
        else:
            z = bernoulli(p_step_prob(z, logits, a[s], a[t]), generator)
        if known is not None:
            kept = known if (inpaint == "clamp" or s == 0) else q_sample(known, a[s], generator)
            z = mask * kept + (1 - mask) * z
        if callback is not None:
            callback(i, s, z)
    return z
