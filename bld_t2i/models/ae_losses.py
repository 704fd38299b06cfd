"""Losses and metrics of the binary autoencoder (docs/math.md (A2), (A3)).

    L = l1 * |x - x_hat| + w_p * LPIPS(x, x_hat) + disc_weight * lambda * hinge-GAN(D(x_hat))
        + bit_balance * sum_c (mean(p_c) - 1/2)^2

with the adaptive weight `lambda = clamp(|grad L_rec| / (|grad L_gan| + 1e-4), 0, max)` taken
at the decoder's last layer (Esser et al., VQGAN eq. 7) and lambda = 0 before the start step.
LPIPS loads from local files only; nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from bld_t2i.config import AELossConfig
from bld_t2i.models.binary_ae import AEOutput

# The files an `ae_loss.lpips_path` folder holds, under their upstream names: torchvision's
# ImageNet VGG16 and the LPIPS v0.1 linear heads (the `lpips` package's weights/v0.1/vgg.pth).
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_LIN_FILE = "vgg.pth"


# ----------------------------------------------------------------------------- perceptual


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, v0.1): a frozen, weighted distance between VGG16 features."""

    TAPS = (4, 9, 16, 23, 30)  # ends of the slices at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.vgg16(weights=None).features[: self.TAPS[-1]]
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        # LPIPS's input scaling, for images in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path) -> LPIPS:
        folder = Path(folder)
        vgg_path, lin_path = folder / VGG16_FILE, folder / LPIPS_LIN_FILE
        for path in (vgg_path, lin_path):
            if not path.is_file():
                raise FileNotFoundError(f"ae_loss.lpips_path: {path} not found (expected {VGG16_FILE} and {LPIPS_LIN_FILE})")
        model = cls()
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        vgg = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        lin = {k.replace("lin", "").replace(".model.1", ""): v for k, v in lin.items()}  # lin0.model.1.weight -> 0.weight
        for module, state, path in ((model.features, vgg, vgg_path), (model.lin, lin, lin_path)):
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"ae_loss.lpips_path: {path} does not fit LPIPS-VGG: {e}") from e
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pair in [-1, 1] -> (B,) distances."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0.0
        start = 0
        for lin, end in zip(self.lin, self.TAPS):
            h = self.features[start:end](h)
            start = end
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise channels
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return total


# ----------------------------------------------------------------------------- adversarial


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as in VQGAN: (B, 3, H, W) -> (B, 1, H', W') patch logits."""

    def __init__(self, n_layers: int = 3, width: int = 64):
        super().__init__()
        layers = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for n in range(1, n_layers + 1):
            c_out = width * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float) -> torch.Tensor:
    """lambda = clamp(|grad_W L_rec| / (|grad_W L_gan| + 1e-4), 0, max) at the decoder's last layer W."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def bit_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """sum_c (mean(p_c) - 1/2)^2 over the C bit channels of (B, C, h, w): no channel may go constant."""
    return (probs.mean(dim=(0, 2, 3)) - 0.5).pow(2).sum()


def generator_loss(
    cfg: AELossConfig,
    x: torch.Tensor,
    out: AEOutput,
    last_layer: torch.Tensor,
    disc: PatchDiscriminator | None,
    lpips: LPIPS | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's loss for images x (B, 3, H, W); `disc` is None before the GAN starts.
    Its terms come back detached, on the device (read them at log time, not per step)."""
    x_hat = out.recon.float()
    l1 = (x - x_hat).abs().mean()
    rec = cfg.l1_weight * l1
    stats = {"l1": l1.detach()}
    if lpips is not None:
        perceptual = lpips(x, x_hat).mean()
        rec = rec + cfg.perceptual_weight * perceptual
        stats["perceptual"] = perceptual.detach()
    loss = rec
    if disc is not None:
        g = hinge_g_loss(disc(x_hat))
        lam = adaptive_weight(rec, g, last_layer, cfg.max_adaptive_weight)
        loss = loss + cfg.disc_weight * lam * g
        stats.update(g_loss=g.detach(), adaptive_weight=lam.detach())
    if cfg.bit_balance_weight > 0:
        balance = bit_balance_loss(out.probs.float())
        loss = loss + cfg.bit_balance_weight * balance
        stats["bit_balance"] = balance.detach()
    return loss, stats


# ----------------------------------------------------------------------------- metrics


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = ((x.float() - x_hat.float().clamp(-1, 1)) / 2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of images in [-1, 1]."""
    a = (x.float() + 1) / 2
    b = (x_hat.float().clamp(-1, 1) + 1) / 2
    g = torch.exp(-((torch.arange(11, dtype=torch.float32, device=a.device) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def bit_stats(bits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Usage of the code of a batch, bits (B, h, w, C) 0/1.

    dead_bits: the fraction of the C channels whose mean code is below 1% or above 99%;
    bit_entropy: the binary entropy (in bits) of each of the h*w*C bits over the batch, averaged.
    """
    bits = bits.float()
    channel_mean = bits.mean(dim=(0, 1, 2))  # (C,)
    dead = ((channel_mean < 0.01) | (channel_mean > 0.99)).float().mean()
    q = bits.mean(dim=0).clamp(1e-6, 1 - 1e-6)  # (h, w, C)
    entropy = -(q * q.log2() + (1 - q) * (1 - q).log2()).mean()
    return {"dead_bits": dead, "bit_entropy": entropy}  # 0-d tensors on the bits' device
