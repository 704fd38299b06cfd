"""Caption dropout for classifier-free guidance (docs/math.md (9)).

Each sample's condition is replaced by the null condition with probability p, independently
per sample. Two defects this avoids (docs/math.md, where we differ, 3): dropping the whole batch's condition
at once (the authors' code), and an inverted mask that drops 1 - p (a peer's); the tests
check the realised rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_tokens(cond: dict, n: int) -> dict:
    """Pad a text condition's token sequence to length n; the padding is masked out."""
    N = cond["tokens"].shape[1]
    return {
        **cond,
        "tokens": F.pad(cond["tokens"], (0, 0, 0, n - N)),  # (B, n, D) zeros appended
        "mask": F.pad(cond["mask"], (0, n - N), value=False),  # (B, n)
    }


def align_null(cond: dict, null: dict) -> tuple[dict, dict]:
    """A condition and its null with the same keys and token length N, so that they can be
    mixed per sample (caption dropout) or stacked for one guided forward; a learned null
    carries a "null" flag (B,) and one token, and the condition gets the flag, False."""
    first = next(iter(cond.values()))
    if "null" in null and "null" not in cond:
        cond = {**cond, "null": torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)}
    if set(cond) != set(null):
        raise ValueError(f"condition keys {sorted(cond)} differ from the null condition's {sorted(null)}")
    if "tokens" in cond:
        n = max(cond["tokens"].shape[1], null["tokens"].shape[1])
        cond, null = pad_tokens(cond, n), pad_tokens(null, n)
    return cond, null


def drop_condition(
    cond: dict | None, null_cond: dict | None, p: float, generator: torch.Generator | None = None
) -> tuple[dict | None, torch.Tensor | None]:
    """Replace each sample's condition by `null_cond` with probability p.

    cond: a batch condition (text {"tokens", "mask", "pooled"} or class {"label"}), batch B.
    null_cond: `Denoiser.null_condition(...)`, batch B or 1. Text token sequences of different
      lengths are padded to the longer one with mask False. A key only the null condition
      has, "null" (the learned-null flag), counts as False for the kept samples.
    generator: draws the coin flips (on its own device; the default generator when None).
    Returns (the mixed condition, dropped (B,) bool). An unconditional model (cond None)
    has nothing to drop: (None, None).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"denoiser.cond_drop_prob must be in [0, 1], got {p}")
    if cond is None:
        return None, None
    if null_cond is None:
        raise ValueError("drop_condition: a conditional batch needs a null condition (Denoiser.null_condition)")
    first = next(iter(cond.values()))
    B, device = first.shape[0], first.device
    draw_device = generator.device if generator is not None else device
    dropped = (torch.rand(B, generator=generator, device=draw_device) < p).to(device)  # (B,) bool

    cond, null_cond = align_null(cond, null_cond)
    mixed = {}
    for key, value in cond.items():
        null = null_cond[key].to(device=device, dtype=value.dtype)
        d = dropped.view(B, *[1] * (value.dim() - 1))  # broadcast over the non-batch dims
        mixed[key] = torch.where(d, null, value)
    return mixed, dropped
