"""Exponential moving average of the fp32 master weights, sharded like the optimizer."""

from __future__ import annotations

import torch

from bld_t2i import distributed as D


class EMA:
    """ema <- decay * ema + (1 - decay) * w for the weights w this rank's optimizer updates.

    Each rank averages only its own fragment of every parameter (`D.master_fragment`: the
    ZeRO-3 partition, the ZeRO 1/2 fragment, or the whole parameter without DeepSpeed), in
    fp32 and from the fp32 master weights, so under bf16 the average is of unrounded weights
    and no step needs a collective. `full_state` assembles the whole (a collective).
    """

    def __init__(self, model: torch.nn.Module):
        self.named = list(model.named_parameters())
        self.shadow = [D.master_fragment(p).detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        masters = [D.master_fragment(p).float() for _, p in self.named]
        torch._foreach_lerp_(self.shadow, masters, 1.0 - decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The consolidated EMA weights, fp32 on the CPU (call on every rank)."""
        return {n: D.full_from_fragment(e, p).cpu() for e, (n, p) in zip(self.shadow, self.named)}

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for e, (n, p) in zip(self.shadow, self.named):
            e.copy_(D.fragment_from_full(state[n].to(e.device, torch.float32), p))
