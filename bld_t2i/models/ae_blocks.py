"""The binary autoencoder's convolutional blocks (VQGAN family): GroupNorm + SiLU ResBlocks,
single-head self-attention, stride-2 down- and nearest-neighbour upsampling, and the
encoder and decoder they make (docs/math.md (A1); the model is models/binary_ae.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from bld_t2i.models.binary_ae import AEArch

def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) as in VQGAN; fewer groups when a small preset has fewer channels."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Normalize(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Normalize(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the grid positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # VQGAN's asymmetric pad: exact halving


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, n_blocks: int, attn: bool) -> tuple[nn.ModuleList, int]:
    blocks = nn.ModuleList()
    for _ in range(n_blocks):
        blocks.append(ResBlock(c_in, c_out))
        c_in = c_out
        if attn:
            blocks.append(AttnBlock(c_out))
    return blocks, c_out


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels))


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, c_top, H/f, W/f) features."""

    def __init__(self, arch: AEArch):
        super().__init__()
        widths = [arch.base_width * m for m in arch.mults]
        self.conv_in = nn.Conv2d(3, arch.base_width, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = arch.base_width
        for i, w in enumerate(widths):
            lowest = i == len(widths) - 1
            blocks, c = _level(c, w, arch.res_blocks, attn=lowest)
            self.levels.append(blocks)
            if not lowest:
                self.downs.append(Downsample(c))
        self.mid = _middle(c)
        self.norm_out = Normalize(c)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return F.silu(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """(B, emb_width, h, w) embedded bits -> (B, 3, h*f, w*f) image, no output activation."""

    def __init__(self, arch: AEArch, emb_width: int):
        super().__init__()
        widths = [arch.base_width * m for m in arch.mults]
        c = widths[-1]
        self.conv_in = nn.Conv2d(emb_width, c, 3, padding=1)
        self.mid = _middle(c)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            lowest = i == len(widths) - 1
            blocks, c = _level(c, w, arch.res_blocks + 1, attn=lowest)
            self.levels.append(blocks)
            if i > 0:
                self.ups.append(Upsample(c))
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            if i < len(self.ups):
                h = self.ups[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
