"""The binary autoencoder, docs/math.md (A1)-(A3).

A VQGAN-family convolutional encoder maps an image to per-bit probabilities
`p = sigmoid(logits)` on an (h, w) grid with C bits per position. Training samples the
bits `b ~ B(p)` with the straight-through gradient `b_st = b + p - stopgrad(p)`; encoding
a data set uses the deterministic code `b = 1[logits > 0]` = `1[p > 0.5]` (the authors'
extraction samples). Logits, p and the uniforms u are float32 under any autocast: a bf16
sigmoid rounds every logit in (0, 0.0078] to p = 0.5 exactly, so `p > 0.5` flipped 1.1% of
a tiny autoencoder's bits, all towards 0. The stored code is computed in float32 throughout
(`encode` ignores autocast): a bf16 encoder body still flipped 0.5% of them. The
decoder maps the bits through a bias-free linear layer to its embedding width and
mirrors the encoder with nearest-neighbour upsampling.

The blocks are in models/ae_blocks.py; sizes are the literal table `AE_PRESETS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bld_t2i.config import AutoencoderConfig
from bld_t2i.data.shards import sync_file, sync_tree
from bld_t2i.models.ae_blocks import Decoder, Encoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA_FILE = "fingerprint"  # sha256 of model.safetensors (the file name predates `fingerprint`'s meaning)
# The rule that turns the encoder's output into the stored code: part of the fingerprint, so a
# change of rule (not only of weights) invalidates latents encoded by the old one.
CODE_RULE = "bld-code-2: b = 1[to_logits(encoder(x)) > 0] in float32, (B, h, w, C)"
ENCODER_PREFIXES = ("encoder.", "to_logits.")  # the tensors that determine the code


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class AEArch:
    """A fully resolved architecture: what `config.json` stores and the model is built from."""

    resolution: int
    bits: int  # C, bits per grid position
    base_width: int
    mults: tuple[int, ...]  # one entry per level; f = 2 ** (len(mults) - 1)
    res_blocks: int  # ResBlocks per level (the decoder has one more, as in VQGAN)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.mults) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample


# The authors' 256px models (f=16, 16x16 grid, base 128, mults (1,1,2,2,4)); the poster's
# 1024px model downsamples by 32 (one more level) to a 32x32 grid (docs/math.md, where we differ, 4);
# small presets for CPU runs.
AE_PRESETS: dict[str, AEArch] = {
    "bae256-c32": AEArch(resolution=256, bits=32, base_width=128, mults=(1, 1, 2, 2, 4), res_blocks=2),
    "bae256-c64": AEArch(resolution=256, bits=64, base_width=128, mults=(1, 1, 2, 2, 4), res_blocks=2),
    "bae256-c128": AEArch(resolution=256, bits=128, base_width=128, mults=(1, 1, 2, 2, 4), res_blocks=2),
    "bae1024-f32": AEArch(resolution=1024, bits=64, base_width=128, mults=(1, 1, 2, 2, 4, 4), res_blocks=2),
    "ae64-tiny": AEArch(resolution=64, bits=16, base_width=32, mults=(1, 2, 2, 4), res_blocks=1),
    "ae64-f4": AEArch(resolution=64, bits=32, base_width=16, mults=(1, 2, 4), res_blocks=1),
    "ae128-small": AEArch(resolution=128, bits=32, base_width=32, mults=(1, 2, 2, 4), res_blocks=1),
}


def resolve_arch(cfg: AutoencoderConfig) -> AEArch:
    """The preset named by `cfg.preset`, with the config's non-zero overrides applied."""
    if cfg.preset not in AE_PRESETS:
        raise ValueError(f"autoencoder.preset: unknown preset {cfg.preset!r}; choose from {sorted(AE_PRESETS)}")
    arch = AE_PRESETS[cfg.preset]
    overrides = {k: getattr(cfg, k) for k in ("resolution", "bits", "base_width") if getattr(cfg, k)}
    arch = dataclasses.replace(arch, **overrides)
    if arch.resolution % arch.downsample:
        raise ValueError(
            f"autoencoder.resolution={arch.resolution} is not divisible by the preset's downsampling f={arch.downsample}"
        )
    return arch


class AEOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W)
    probs: torch.Tensor  # (B, C, h, w) p = sigmoid(logits)
    bits: torch.Tensor  # (B, C, h, w) sampled 0/1 with the straight-through gradient


def _safetensors_bytes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("",)) -> bytes:
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state.items() if k.startswith(prefixes)})


def code_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of what determines the latents: the code rule and the encoder's and logit head's
    tensors of an autoencoder's state dict. The decoder is left out: fine-tuning it alone keeps
    the fingerprint, and the latent shards encoded before stay valid. The resolution is left out
    too (the encoder is convolutional); the latent manifests check the grid on their own."""
    return hashlib.sha256(CODE_RULE.encode() + _safetensors_bytes(state, ENCODER_PREFIXES)).hexdigest()


# ----------------------------------------------------------------------------- the model


class BinaryAutoencoder(nn.Module):
    def __init__(self, arch: AEArch, encoder_of: tuple[str, ...] = ()):
        super().__init__()
        self.arch = arch
        # weights_sha256 of the autoencoders whose encoder this one kept bit for bit (a decoder
        # fine-tune's ancestry): latent manifests of version 1-2 name those (docs/data_formats.md)
        self.encoder_of = tuple(encoder_of)
        self.encoder = Encoder(arch)
        self.to_logits = nn.Conv2d(self.encoder.out_channels, arch.bits, 1)  # the 1x1 head to C bits
        emb_width = arch.base_width * arch.mults[-1]
        self.bit_embed = nn.Linear(arch.bits, emb_width, bias=False)  # bias-free C -> emb map
        self.decoder = Decoder(arch, emb_width)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig) -> BinaryAutoencoder:
        return cls(resolve_arch(cfg))

    # -- shapes

    @property
    def resolution(self) -> int:
        return self.arch.resolution

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the code of one image at the native resolution."""
        return (self.arch.grid, self.arch.grid, self.arch.bits)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    # -- the three steps of docs/math.md (A1)

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.arch.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must be (B, 3, H, W) with H, W divisible by {f}; got {tuple(images.shape)}")

    def bit_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> logits (B, C, H/f, W/f) float32 (the convolutions run in
        an enclosing autocast's dtype; the sigmoid and the threshold after them do not)."""
        self._check_images(images)
        return self.to_logits(self.encoder(images)).float()

    def bit_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> p = sigmoid(logits) float32, (B, C, H/f, W/f)."""
        return torch.sigmoid(self.bit_logits(images))

    def decode_channels_first(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) 0/1 (float, may carry gradients) -> (B, 3, H, W)."""
        z = self.bit_embed(bits.movedim(1, -1)).movedim(-1, 1)  # (B, emb, h, w)
        return self.decoder(z)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False
    ) -> AEOutput:
        """Training pass: b ~ B(p) (or b = 1[p > 0.5] when `deterministic`), b_st = b + p - stopgrad(p),
        then decode b_st."""
        p = self.bit_probs(images)  # float32
        if deterministic:
            b = (p > 0.5).to(p.dtype)
        else:
            u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
            b = (u < p).to(p.dtype)
        b_st = b + (p - p.detach())  # the value is exactly b; the gradient is that of p
        return AEOutput(recon=self.decode_channels_first(b_st), probs=p, bits=b_st)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic code 1[logits > 0]: (B, 3, H, W) in [-1, 1] -> bool (B, h, w, C).

        Computed in the weights' dtype with any enclosing autocast off, so that a data set
        encoded under bf16 autocast holds the float32 code bit for bit (module docstring)."""
        with torch.autocast(images.device.type, enabled=False):
            logits = self.bit_logits(images.to(self.to_logits.weight.dtype))
        return (logits > 0).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """bool/float 0/1 bits (B, h, w, C) -> images (B, 3, H, W), roughly in [-1, 1]."""
        if bits.ndim != 4 or bits.shape[-1] != self.arch.bits:
            raise ValueError(f"bits must be (B, h, w, {self.arch.bits}); got {tuple(bits.shape)}")
        dtype = self.bit_embed.weight.dtype
        return self.decode_channels_first(bits.to(dtype).permute(0, 3, 1, 2))

    # -- export

    def _weights_bytes(self) -> bytes:
        return _safetensors_bytes(self.state_dict())

    @property
    def fingerprint(self) -> str:
        """What latent manifests check: `code_fingerprint` of the weights."""
        return code_fingerprint(self.state_dict())

    @property
    def weights_sha256(self) -> str:
        """sha256 of all the weights, exactly as `save_pretrained` writes model.safetensors."""
        return hashlib.sha256(self._weights_bytes()).hexdigest()

    @property
    def legacy_fingerprints(self) -> tuple[str, ...]:
        """What latent manifests of versions 1-2 name for this encoder: the weights' sha256 of
        this autoencoder and of those whose encoder it kept (`encoder_of`)."""
        return (self.weights_sha256, *self.encoder_of)

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        """Write config.json (the architecture, the encoder's fingerprint and ancestry),
        model.safetensors and its sha256 (`fingerprint` file); atomic (temp folder, then rename).

        Returns the (encoder) fingerprint.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        data = self._weights_bytes()
        fingerprint = self.fingerprint
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            (tmp / WEIGHTS_FILE).write_bytes(data)
            config = {"arch": dataclasses.asdict(self.arch), "fingerprint": fingerprint,
                      "encoder_of": list(self.encoder_of)}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            (tmp / WEIGHTS_SHA_FILE).write_text(hashlib.sha256(data).hexdigest() + "\n")
            sync_tree(tmp)  # on disk before the rename publishes it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write (ENOSPC) leaves no temp folder
            raise
        if folder.exists():  # replace an older export: move it aside first so the swap is one rename
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
        sync_file(folder.parent)
        return fingerprint

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> BinaryAutoencoder:
        """Load an exported folder; the weights must match their sha256 and the architecture exactly."""
        folder = Path(folder)
        config_path, weights_path, fp_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE, folder / WEIGHTS_SHA_FILE
        for path in (config_path, weights_path, fp_path):
            if not path.is_file():
                raise FileNotFoundError(f"autoencoder export is missing {path}")
        try:
            config = json.loads(config_path.read_text())
            arch_dict = config["arch"]
            arch_dict["mults"] = tuple(arch_dict["mults"])
            arch = AEArch(**arch_dict)
            encoder_of = tuple(str(s) for s in config.get("encoder_of", ()))  # exports before it: none
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{config_path} does not describe a binary autoencoder: {e}") from e
        data = weights_path.read_bytes()
        expected = fp_path.read_text().strip()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(
                f"{weights_path} does not match {fp_path} (sha256 {actual[:16]}... != {expected[:16]}...): "
                "the weights file is truncated or was changed after export"
            )
        try:
            state = load_safetensors(data)
        except SafetensorError as e:
            raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
        with torch.device("meta"):  # the config checked against the weights before it allocates anything
            check_state_dict(cls(arch, encoder_of), state, weights_path)
        model = cls(arch, encoder_of)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise a clear error naming `source` unless `state` fits `model` exactly (no partial loads)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the architecture: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(mismatched)} of another shape {mismatched[:3]}"
        )
