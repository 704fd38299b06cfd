"""Text-to-image (and class / unconditional) sampling from an exported model folder.

    pipe = BLDPipeline.from_pretrained("runs/x/checkpoints/step_000001000")
    out = pipe(["red apple"], steps=16, temperature=1.0, guidance=2.5, seed=0)
    bld_t2i.utils.to_pil(out.images)[0].save("apple.png")

An exported model is a folder with `config.json` (the resolved Config) and
`model.safetensors` (the EMA denoiser weights); `config.autoencoder.path` names the binary
autoencoder folder and `config.text_encoder` says how to build the text encoder for new
prompts (also for models trained on pre-computed embeddings).

Sampling is docs/math.md (8)-(11): S evenly spaced steps of T, temperature tau and classifier-free
guidance w on the flip logits (only for t/T in the guidance interval); inpainting keeps the
known bits outside a mask (clamp) or keeps them noised to the current time (renoise).
Images are drawn in batches, image i from its own generator, so it is the image its seed
gives alone; the condition's attention keys and values are computed once per batch
(`Denoiser.prepare_condition`). GPU: dtype bf16 (bf16 weights, autocast keeps norms and
softmax in fp32), `compile=True` (torch.compile with CUDA graphs: a batch's shapes are static).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from bld_t2i.config import Config, from_dict
from bld_t2i.data.images import fit, images_to_tensor, to_rgb
from bld_t2i.diffusion import check_guidance_interval, keep_factors, sample
from bld_t2i.distributed import pick_device
from bld_t2i.models.binary_ae import BinaryAutoencoder, check_state_dict
from bld_t2i.models.conditioning import align_null
from bld_t2i.models.denoiser import TEXT_MODES, Denoiser
from bld_t2i.models.text_encoders import build_text_encoder
from bld_t2i.utils import make_grid, save_png, to_pil

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INPAINT_MODES = ("clamp", "renoise")
GRID_IMAGES = 8  # save_grid's image count for class and unconditional models


def default_batch_size(device: torch.device) -> int:
    """Images per sampling batch: 32 on a CPU, 64 on a GPU (where batch 64 keeps it busy)."""
    return 64 if device.type == "cuda" else 32


class Samples(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1], on the CPU
    latents: torch.Tensor  # (B, h, w, C) bool, on the CPU


def image_to_tensor(image: Image.Image | str | Path, size: int) -> torch.Tensor:
    """An RGB image (file or PIL) centre-cropped to (size, size) -> (1, 3, size, size) in [-1, 1]."""
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    return images_to_tensor([np.asarray(fit(to_rgb(img), size, "center_crop"))])


def mask_to_grid(mask: Image.Image | str | Path | torch.Tensor, size: int, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (white = regenerate) -> keep mask m on the latent grid, (h*w, 1) float 0/1.

    The mask is fitted like the image, thresholded at half grey, and a grid cell is
    regenerated when any of its pixels is (max-pooling), so a kept cell never overlaps
    the region to fill. A mask must keep some cells and regenerate some (ValueError).
    """
    if isinstance(mask, torch.Tensor):
        regen = mask.float().reshape(1, 1, *mask.shape[-2:])  # (1, 1, H, W), 1 = regenerate
        if regen.shape[-2:] != (size, size):
            raise ValueError(f"mask tensor must be (H, W) = ({size}, {size}); got {tuple(mask.shape)}")
    else:
        img = Image.open(mask) if isinstance(mask, (str, Path)) else mask
        grey = np.asarray(fit(to_rgb(img), size, "center_crop").convert("L"), dtype=np.float32)
        regen = torch.from_numpy(grey >= 128).float()[None, None]  # (1, 1, H, W)
    h, w = grid
    regen_cells = F.adaptive_max_pool2d(regen, (h, w))  # (1, 1, h, w)
    # Either extreme is almost always an inverted or wrong mask, not a request.
    where = f"{mask}: " if isinstance(mask, (str, Path)) else ""
    if not regen_cells.any():
        raise ValueError(f"{where}the mask is all black: it regenerates nothing (white marks the region to regenerate)")
    if regen_cells.all():
        raise ValueError(f"{where}the mask regenerates every cell of the {h}x{w} latent grid, so it keeps nothing (a cell "
                         f"is kept when all its {size // h}x{size // w} pixels are black); black marks the region to keep")
    return (1 - regen_cells).reshape(h * w, 1)


def _rows(cond: dict | None, lo: int, hi: int) -> dict | None:
    """Samples lo..hi-1 of a batched condition."""
    return None if cond is None else {k: v[lo:hi] for k, v in cond.items()}


class BLDPipeline:
    """A denoiser, its autoencoder and text encoder, and the sampler's defaults from the config."""

    def __init__(self, cfg: Config, denoiser: Denoiser, autoencoder: BinaryAutoencoder, text_encoder,
                 device: torch.device, dtype: torch.dtype, compile: bool = False):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.cfg = cfg
        self.denoiser = denoiser.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.autoencoder = autoencoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        self.a = keep_factors(cfg.diffusion.T, cfg.diffusion.schedule).float()  # (T + 1,)
        self.conditioning = cfg.denoiser.conditioning
        self._empty_caption = None
        check_guidance_interval(cfg.diffusion.guidance_interval)
        # CUDA graphs (mode reduce-overhead) replay a batch's static shapes without launch cost.
        mode = "reduce-overhead" if device.type == "cuda" else None
        self._denoise = torch.compile(denoiser.denoise, mode=mode, dynamic=False) if compile else denoiser.denoise
        self._graphs = compile and device.type == "cuda"

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, compile: bool = False) -> BLDPipeline:
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"exported model is missing {path}")
        try:
            cfg = from_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        if not cfg.autoencoder.path:
            raise ValueError(f"{config_path}: autoencoder.path is empty; it must name the exported autoencoder folder")
        device = pick_device("auto") if device is None else torch.device(device)
        ae_path = Path(cfg.autoencoder.path)
        if not ae_path.is_absolute() and not ae_path.exists():
            ae_path = folder / ae_path  # a path relative to the model folder
        autoencoder = BinaryAutoencoder.from_pretrained(ae_path, device=device)
        text_encoder = None
        text_dim = 0
        if cfg.denoiser.conditioning in TEXT_MODES:
            if cfg.text_encoder.kind == "none":
                raise ValueError(f"{config_path}: denoiser.conditioning '{cfg.denoiser.conditioning}' needs a text "
                                 "encoder for new prompts, but text_encoder.kind is 'none'")
            text_encoder = build_text_encoder(cfg.text_encoder, device)
            text_dim = text_encoder.dim
        denoiser = Denoiser(cfg.denoiser, autoencoder.latent_shape, text_dim)
        try:
            state = load_file(str(weights_path))
        except SafetensorError as e:
            raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
        check_state_dict(denoiser, state, weights_path)
        denoiser.load_state_dict(state, strict=True)
        return cls(cfg, denoiser, autoencoder, text_encoder, device, dtype, compile)

    # ------------------------------------------------------------------ conditions

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    def _conditions(self, prompts: Sequence[str] | None,
                    class_labels: Sequence[int] | None) -> tuple[dict | None, dict | None]:
        """(cond, null_cond) for the batch, or (None, None) for an unconditional model."""
        mode = self.conditioning
        if mode in TEXT_MODES:
            if prompts is None:
                raise ValueError(f"this model is text-conditioned (denoiser.conditioning '{mode}'): pass prompts")
            cond = self._encode(prompts)
            if self._empty_caption is None and self.cfg.denoiser.null_cond != "learned":
                self._empty_caption = self.text_encoder.encode([""])
            null = self.denoiser.null_condition(len(prompts), self.device, self._empty_caption)
            return align_null(cond, null)
        if mode == "class":
            if class_labels is None:
                raise ValueError("this model is class-conditioned: pass class_labels")
            K = self.cfg.denoiser.num_classes
            bad = [c for c in class_labels if not 0 <= int(c) < K]
            if bad:
                raise ValueError(f"class labels must be in 0..{K - 1} (denoiser.num_classes = {K}); got {bad}")
            label = torch.tensor([int(c) for c in class_labels], dtype=torch.long, device=self.device)
            return {"label": label}, self.denoiser.null_condition(len(label), self.device)
        return None, None

    def _encode(self, prompts: Sequence[str]) -> dict:
        """Each distinct prompt encoded alone, so an image's condition is the same in any batch
        (captions are padded to max_length: every encoding has the same N)."""
        unique = list(dict.fromkeys(prompts))
        encoded = [self.text_encoder.encode([p]) for p in unique]
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return {k: torch.cat([e[k] for e in encoded]).to(self.device)[index] for k in encoded[0]}

    def _precision(self):
        """bf16: autocast, matmuls in bf16 and norms and softmax in fp32; fp32: no context (free)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext()

    def _model_fn(self, z_t: torch.Tensor, t_in: torch.Tensor, prepared: dict | None) -> torch.Tensor:
        """The sampler's model: the denoiser on a condition `Denoiser.prepare_condition` made."""
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        with self._precision():
            return self._denoise(z_t, t_in, prepared).float()

    def _batch_size(self, prompts, class_labels, n) -> int:
        given = [x for x in (prompts, class_labels) if x is not None]
        if len(given) > 1:
            raise ValueError("pass prompts or class_labels, not both")
        if given:
            if n is not None and n != len(given[0]):
                raise ValueError(f"n={n} differs from the {len(given[0])} prompts/labels given")
            return len(given[0])
        if self.conditioning != "none":
            raise ValueError(f"this model is conditioned (denoiser.conditioning '{self.conditioning}'): "
                             "pass prompts or class_labels")
        if n is None or n < 1:
            raise ValueError("an unconditional model needs n >= 1 images")
        return n

    # ------------------------------------------------------------------ sampling

    def inpainting_inputs(self, init_image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Known bits (1, L, C) of `init_image` and the keep mask (L, 1) on the latent grid."""
        res = self.autoencoder.resolution
        h, w, C = self.latent_shape
        x = image_to_tensor(init_image, res) if not isinstance(init_image, torch.Tensor) else init_image
        if x.shape[-2:] != (res, res):
            raise ValueError(f"init image must be {res}x{res} (the autoencoder's resolution); got {tuple(x.shape)}")
        known = self.autoencoder.encode(x.to(self.device, self.dtype)).reshape(1, h * w, C).float()
        return known, mask_to_grid(mask, res, (h, w)).to(self.device)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str] | None = None, class_labels: Sequence[int] | None = None,
                       n: int | None = None, steps: int | None = None, temperature: float | None = None,
                       guidance: float | None = None, guidance_interval: Sequence[float] | None = None,
                       seed: int | Sequence[int] = 0, batch_size: int | None = None, init_image=None, mask=None,
                       inpaint: str = "clamp") -> torch.Tensor:
        """Bits (B, h, w, C) bool on the CPU. Defaults come from `config.diffusion`.

        seed: image i is drawn from its own generator seeded with seed[i] (an int s: s + i), so
          any image can be regenerated alone; batches of `batch_size` (default
          `default_batch_size`) give the same images as one by one.
        guidance_interval: [lo, hi], guidance only for t/T in it (`diffusion.sample`).
        init_image, mask: inpainting (white in the mask = regenerate), `inpaint` clamp | renoise.
        """
        d = self.cfg.diffusion
        steps = d.sample_steps if steps is None else steps
        temperature = d.temperature if temperature is None else temperature
        guidance = d.guidance if guidance is None else guidance
        interval = check_guidance_interval(d.guidance_interval if guidance_interval is None else guidance_interval)
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if inpaint not in INPAINT_MODES:
            raise ValueError(f"inpaint must be one of {INPAINT_MODES}, got {inpaint!r}")
        if (init_image is None) != (mask is None):
            raise ValueError("inpainting needs both init_image and mask")
        B = self._batch_size(prompts, class_labels, n)
        seeds = [int(seed) + i for i in range(B)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} images")
        known = keep = None
        if init_image is not None:
            known, keep = self.inpainting_inputs(init_image, mask)
        h, w, C = self.latent_shape
        cond, null = self._conditions(prompts, class_labels)  # encoded once, sliced per batch
        guided = guidance != 0 and null is not None
        out = []
        for lo in range(0, B, batch_size):
            hi = min(lo + batch_size, B)
            with self._precision():  # the condition's keys and values, once for every step
                c = self.denoiser.prepare_condition(_rows(cond, lo, hi), hi - lo)
                u = self.denoiser.prepare_condition(_rows(null, lo, hi), hi - lo) if guided else None
            z = sample(self._model_fn, (hi - lo, h * w, C), self.a, steps, cond=c, null_cond=u,
                       temperature=temperature, guidance=guidance, guidance_interval=interval,
                       known=None if known is None else known.expand(hi - lo, -1, -1), mask=keep, inpaint=inpaint,
                       generator=[torch.Generator(device=self.device).manual_seed(s) for s in seeds[lo:hi]],
                       device=self.device)
            out.append(z.reshape(hi - lo, h, w, C).bool().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Bits (B, h, w, C) -> images (B, 3, H, W) float32 in [-1, 1] on the CPU, decoded in
        batches (default `default_batch_size`), in bf16 under a bf16 pipeline."""
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        with self._precision():
            return torch.cat([self.autoencoder.decode(latents[i : i + batch_size].to(self.device)).float().clamp(-1, 1)
                              .cpu() for i in range(0, len(latents), batch_size)])

    def __call__(self, prompts: Sequence[str] | str | None = None, class_labels: Sequence[int] | None = None,
                 n: int | None = None, batch_size: int | None = None, **kwargs) -> Samples:
        """Sample and decode: Samples(images (B, 3, H, W) in [-1, 1], latents (B, h, w, C) bool).
        Keyword arguments as `sample_latents`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        latents = self.sample_latents(prompts, class_labels, n, batch_size=batch_size, **kwargs)
        return Samples(self.decode(latents, batch_size), latents)

    def save_grid(self, prompts: Sequence[str], path: str | Path, seed: int = 0) -> Path:
        """One image per prompt (text models), or GRID_IMAGES images (class labels 0, 1, ...
        or unconditional), with the config's default steps, tau and w, as one PNG written
        atomically. Same seed, same grid."""
        if self.conditioning in TEXT_MODES:
            if not prompts:
                raise ValueError("save_grid: a text-conditioned model needs at least one prompt (train.sample_prompts)")
            out = self(list(prompts), seed=seed)
        elif self.conditioning == "class":
            out = self(class_labels=[i % self.cfg.denoiser.num_classes for i in range(GRID_IMAGES)], seed=seed)
        else:
            out = self(n=GRID_IMAGES, seed=seed)
        return save_png(make_grid(to_pil(out.images)), path)
