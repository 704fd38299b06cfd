"""The pieces of the denoiser (models/denoiser.py): embeddings of position and time, attention,
the transformer block with its two ways of taking the time (docs/math.md (D), (D1), (D2)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position embedding (MAE/DiT): half the channels encode the row, half the column.

    Returns (h*w, dim), row-major like the latent's L = h*w positions.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None] * omega[None]  # (L, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()  # (L, dim)


def resize_pos_embed(table: torch.Tensor, base: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The position embedding of a (h, w) grid from the learned table of the (h0, w0) one (docs/math.md (D1)).

    table (1, h0*w0, D) -> (1, h*w, D): the table itself for the base grid (bit for bit), else the
    table read as a D-channel (h0, w0) image and resized bicubically to (h, w), antialiased when
    it shrinks (ViT/DiT/timm practice). Positions are fractions of the image's extent, so every
    grid reads, and trains, the one table. Resized in float32 (bicubic has no bf16 CPU kernel).
    """
    if tuple(grid) == tuple(base):
        return table
    (h0, w0), (h, w), D = base, grid, table.shape[-1]
    image = table.float().reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    image = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return image.permute(0, 2, 3, 1).reshape(1, h * w, D).to(table.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t = t/T in [0, 1]: (B,) -> (B, dim) float32.

    t/T is scaled by 1000 first: the frequencies span periods 1..max_period, laid out for
    step counts in the hundreds (DDPM), and would barely turn over a unit interval.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([angle.cos(), angle.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, S, D) normalised, shift and scale (B, 1, D) -> x (1 + scale) + shift (docs/math.md (D2))."""
    return x * (1 + scale) + shift


def adaln_modulation(dim: int, n: int) -> nn.Sequential:
    """SiLU + Linear(D, n D): n modulation vectors of width D from the conditioning vector c;
    the denoiser zero-initialises the linear layer (adaLN-Zero)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, n * dim))


class Attention(nn.Module):
    """Multi-head attention of x over its own tokens, or over precomputed context keys and values."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> their keys and values (B, 2, H, N, D/H)."""
        B, N, D = ctx.shape
        return self.kv(ctx).view(B, N, 2, self.heads, D // self.heads).permute(0, 2, 3, 1, 4)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x.shape  # (B, S, D) queries
        kv = self.keys_values(x) if kv is None else kv  # (B, 2, H, N, D/H); self-attention when None
        q = self.q(x).view(B, S, self.heads, D // self.heads).transpose(1, 2)  # (B, H, S, D/H)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N), True = attend
        # SDPA picks the flash kernel (no mask: self-attention) or the memory-efficient one
        # (a boolean mask: cross-attention) on a GPU, its fused CPU kernels on a CPU.
        out = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=attn_mask)  # (B, H, S, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, [cross-attention to text,] 4x GELU MLP.

    `adaln`: adaLN-Zero (DiT, docs/math.md (D2)): the self-attention and MLP branches read
    LayerNorm(x) (1 + scale) + shift and are multiplied by a gate, the six vectors a linear map
    of the conditioning vector c (B, D); the norms then have no affine of their own. The
    cross-attention branch stays a plain pre-LN residual (PixArt-alpha).
    """

    def __init__(self, dim: int, heads: int, cross_attn: bool, adaln: bool = False):
        super().__init__()
        norm_args = {"elementwise_affine": False, "eps": 1e-6} if adaln else {}
        self.norm1 = nn.LayerNorm(dim, **norm_args)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if cross_attn else None
        self.cross = Attention(dim, heads) if cross_attn else None
        self.norm3 = nn.LayerNorm(dim, **norm_args)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = adaln_modulation(dim, 6) if adaln else None

    def forward(self, x: torch.Tensor, ctx_kv: torch.Tensor | None, ctx_mask: torch.Tensor | None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D); ctx_kv: this block's keys and values of the text tokens, (B, 2, H, N, D/H);
        c: the conditioning vector (B, D) of adaLN (None for the time-token block)."""
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))
            if self.cross is not None:
                x = x + self.cross(self.norm2(x), ctx_kv, ctx_mask)
            return x + self.mlp(self.norm3(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), ctx_kv, ctx_mask)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))
