"""Text-to-image (and class / unconditional) sampling from an exported model folder, with
diffusers' conventions (without depending on diffusers):

    pipe = BLDPipeline.from_pretrained("runs/x/export")
    out = pipe("red apple", num_inference_steps=16, guidance_scale=3.5, num_images_per_prompt=4,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("apple.png")  # PIL images; output_type "pt", "np" or "latent" for others
    pipe.save_pretrained("exports/apple")  # a self-contained folder that loads from any path

`guidance_scale` is 1 + w (diffusers' convention, 1: no guidance); recipes, the sample CLI,
the evaluation and `sample_latents` keep w (docs/math.md (9)). Unset sampler arguments come
from the model's `config.diffusion`. The folder layouts (the pipeline one `save_pretrained`
writes and the older flat one) are in bld_t2i/pretrained.py; argument checks in
bld_t2i/pipeline_inputs.py.

Sampling is docs/math.md (8)-(11): S evenly spaced steps of T, temperature tau and classifier-free
guidance w on the flip logits (only for t/T in the guidance interval); inpainting keeps the
known bits outside a mask (clamp) or keeps them noised to the current time (renoise).
Images are drawn in batches, image i from its own generator, so it is the image its seed
gives alone; `pipe(...)` draws those per-image seeds from `generator` (`seeds_from_generators`)
and returns them. The condition's attention keys and values are computed once per batch
(`Denoiser.prepare_condition`). GPU: dtype bf16 (bf16 weights, autocast keeps norms and
softmax in fp32), `compile=True` (torch.compile with CUDA graphs): every batch is then padded
to `batch_size` rows and a guided call runs its guided 2B-row forward at every step, so that
all calls of one batch size and guidance compile one graph shape and replay it
(`sample(one_shape=True)`; tests/test_compile_shapes.py); eager sampling does neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bld_t2i.config import Config
from bld_t2i.diffusion import check_guidance_interval, keep_factors, sample
from bld_t2i.distributed import pick_device
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.conditioning import align_null
from bld_t2i.models.denoiser import TEXT_MODES, Denoiser
from bld_t2i.pipeline_inputs import (
    check_output_type,
    check_steps,
    condition_inputs,
    guidance_w,
    image_to_tensor,
    mask_to_grid,
    seeds_from_generators,
    to_output,
)
from bld_t2i.pretrained import load_pretrained, write_pretrained
from bld_t2i.utils import make_grid, save_png, to_pil

INPAINT_MODES = ("clamp", "renoise")
GRID_IMAGES = 8  # save_grid's image count for class and unconditional models
__all__ = ["BLDPipeline", "BLDPipelineOutput", "default_batch_size", "image_to_tensor", "mask_to_grid"]


def default_batch_size(device: torch.device) -> int:
    """Images per sampling batch: 32 on a CPU, 64 on a GPU (where batch 64 keeps it busy)."""
    return 64 if device.type == "cuda" else 32


@dataclass
class BLDPipelineOutput:
    # output_type "pil": list of RGB images; "pt": float (B, 3, H, W) in [0, 1]; "np": float32
    # (B, H, W, 3) in [0, 1]; "latent": the bits, as `latents`
    images: list[Image.Image] | torch.Tensor | np.ndarray
    latents: torch.Tensor  # (B, h, w, C) bool, on the CPU
    seeds: list[int]  # image i is `sample_latents(its prompt or label, seed=[seeds[i]])`


def _rows(cond: dict | None, lo: int, hi: int, rows: int) -> dict | None:
    """Samples lo..hi-1 of a batched condition, the last repeated up to `rows` rows."""
    if cond is None:
        return None
    return {k: torch.cat([v[lo:hi], v[hi - 1 : hi].expand(rows - (hi - lo), *v.shape[1:])]) for k, v in cond.items()}


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
        self._compiled = compile

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, compile: bool = False) -> BLDPipeline:
        """Load an exported folder: the pipeline layout (`model_index.json`, everything relative
        to the folder) or the old flat one (config.json + model.safetensors); bld_t2i/pretrained.py."""
        device = pick_device("auto") if device is None else torch.device(device)
        parts = load_pretrained(folder, device)
        return cls(parts.cfg, parts.denoiser, parts.autoencoder, parts.text_encoder, device, dtype, compile)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the pipeline layout (`write_pretrained`): a self-contained folder that
        `from_pretrained` loads from any path. Needs a float32 pipeline (bf16 weights are rounded)."""
        if self.dtype != torch.float32:
            raise ValueError(f"save_pretrained needs a float32 pipeline, this one is {self.dtype} (its weights are "
                             "rounded): load the model with dtype=torch.float32 to export it")
        return write_pretrained(folder, self.cfg, self.denoiser.state_dict(), self.autoencoder, self.denoiser.text_dim)

    # ------------------------------------------------------------------ conditions

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    def latent_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) latent rows and columns of a height x width image (pixels; default the
        autoencoder's resolution). Both must be multiples of its downsampling factor."""
        f, res = self.autoencoder.arch.downsample, self.autoencoder.resolution
        sizes = {"height": res if height is None else height, "width": res if width is None else width}
        for name, v in sizes.items():
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the autoencoder's downsampling), got {v!r}")
        return int(sizes["height"]) // f, int(sizes["width"]) // f

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

    def _model_fn(self, z_t: torch.Tensor, t_in: torch.Tensor, prepared: dict | None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The sampler's model: the denoiser on a condition `Denoiser.prepare_condition` made;
        `grid` (h, w) only for a grid other than the denoiser's own."""
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        with self._precision():
            if grid is None:
                return self._denoise(z_t, t_in, prepared).float()
            return self._denoise(z_t, t_in, prepared, grid=grid).float()

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

    def inpainting_inputs(self, init_image, mask, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Known bits (1, L, C) of `init_image` and the keep mask (L, 1) on the latent grid of a
        size x size image (default the autoencoder's resolution)."""
        size = self.autoencoder.resolution if size is None else size
        h = w = size // self.autoencoder.arch.downsample
        C = self.latent_shape[2]
        x = image_to_tensor(init_image, size) if not isinstance(init_image, torch.Tensor) else init_image
        if x.shape[-2:] != (size, size):
            raise ValueError(f"init image must be {size}x{size} (the image size sampled); got {tuple(x.shape)}")
        known = self.autoencoder.encode(x.to(self.device, self.dtype)).reshape(1, h * w, C).float()
        return known, mask_to_grid(mask, size, (h, w)).to(self.device)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str] | None = None, class_labels: Sequence[int] | None = None,
                       n: int | None = None, steps: int | None = None, temperature: float | None = None,
                       guidance: float | None = None, guidance_interval: Sequence[float] | None = None,
                       seed: int | Sequence[int] = 0, batch_size: int | None = None, init_image=None, mask=None,
                       inpaint: str = "clamp", height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Bits (B, h, w, C) bool on the CPU: the lower-level API the evaluation uses, with w.
        Defaults come from `config.diffusion`.

        guidance: w (`pipe(...)` takes guidance_scale = 1 + w).
        seed: image i is drawn from its own generator seeded with seed[i] (an int s: s + i), so
          any image can be regenerated alone; batches of `batch_size` (default
          `default_batch_size`) give the same images as one by one.
        guidance_interval: [lo, hi], guidance only for t/T in it (`diffusion.sample`).
        init_image, mask: inpainting (white in the mask = regenerate), `inpaint` clamp | renoise;
          square images only.
        height, width: the image size in pixels (`latent_grid`); default the autoencoder's.
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
        h, w = grid = self.latent_grid(height, width)
        B = self._batch_size(prompts, class_labels, n)
        seeds = [int(seed) + i for i in range(B)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} images")
        known = keep = None
        if init_image is not None:
            if h != w:
                raise ValueError(f"inpainting needs a square image (height == width); got {h}x{w} latent cells")
            known, keep = self.inpainting_inputs(init_image, mask, h * self.autoencoder.arch.downsample)
        C = self.latent_shape[2]
        model_fn = self._model_fn if grid == self.latent_shape[:2] else partial(self._model_fn, grid=grid)
        cond, null = self._conditions(prompts, class_labels)  # encoded once, sliced per batch
        guided = guidance != 0 and null is not None
        out = []
        for lo in range(0, B, batch_size):
            hi = min(lo + batch_size, B)
            # compiled: batch_size rows, the padding repeating the last image (drawn from its own
            # generator, then dropped), so that every batch of every call has one shape
            rows = batch_size if self._compiled else hi - lo
            with self._precision():  # the condition's keys and values, once for every step
                c = self.denoiser.prepare_condition(_rows(cond, lo, hi, rows), rows)
                u = self.denoiser.prepare_condition(_rows(null, lo, hi, rows), rows) if guided else None
            z = sample(model_fn, (rows, h * w, C), self.a, steps, cond=c, null_cond=u,
                       temperature=temperature, guidance=guidance, guidance_interval=interval,
                       known=None if known is None else known.expand(rows, -1, -1), mask=keep, inpaint=inpaint,
                       generator=[torch.Generator(device=self.device).manual_seed(s)
                                  for s in seeds[lo:hi] + seeds[hi - 1 : hi] * (rows - (hi - lo))],
                       device=self.device, one_shape=self._compiled)
            out.append(z[: hi - lo].reshape(hi - lo, h, w, C).bool().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Bits (B, h, w, C) -> images (B, 3, H, W) float32 in [-1, 1] on the CPU, decoded in
        batches (default `default_batch_size`), in bf16 under a bf16 pipeline."""
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        with self._precision():
            return torch.cat([self.autoencoder.decode(latents[i : i + batch_size].to(self.device)).float().clamp(-1, 1)
                              .cpu() for i in range(0, len(latents), batch_size)])

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, output_type: str = "pil",
                 temperature: float | None = None, class_labels: int | Sequence[int] | None = None,
                 num_images: int | None = None, height: int | None = None, width: int | None = None,
                 guidance_interval: Sequence[float] | None = None, batch_size: int | None = None,
                 image=None, mask_image=None, inpaint: str = "clamp") -> BLDPipelineOutput:
        """Sample and decode, diffusers-style: BLDPipelineOutput(images, latents, seeds).

        prompt (text models) or class_labels (class models), each repeated
          num_images_per_prompt times in a row; num_images for an unconditional model.
        num_inference_steps: S <= T; guidance_scale: 1 + w (1: no guidance); temperature: tau;
          guidance_interval: [lo, hi]; each defaults to the model's config.diffusion.
        generator: one torch.Generator (the images' seeds are drawn from it in order), a list of
          one per image (a seed drawn from each), or None (torch's default generator):
          `seeds_from_generators`. The seeds are returned; `sample_latents(seed=seeds)`
          gives the same latents.
        output_type: "pil" (RGB images), "pt" ((B, 3, H, W) in [0, 1]), "np" ((B, H, W, 3) in
          [0, 1]) or "latent" (the bits, not decoded).
        height, width: pixels, multiples of the autoencoder's downsampling (default its resolution).
        image, mask_image: inpainting (white in the mask = regenerate), `inpaint` clamp | renoise.
        batch_size: images per sampling and decoding batch (default `default_batch_size`).
        """
        check_output_type(output_type)
        prompts, labels, n = condition_inputs(self.conditioning, prompt, class_labels, num_images,
                                              num_images_per_prompt)
        steps = check_steps(num_inference_steps, self.cfg.diffusion.T)
        w = None if guidance_scale is None else guidance_w(guidance_scale)
        self.latent_grid(height, width)  # a bad size fails before the generators are drawn from
        seeds = seeds_from_generators(generator, self._batch_size(prompts, labels, n))
        latents = self.sample_latents(prompts, labels, n, steps=steps, temperature=temperature, guidance=w,
                                      guidance_interval=guidance_interval, seed=seeds, batch_size=batch_size,
                                      init_image=image, mask=mask_image, inpaint=inpaint, height=height, width=width)
        images = latents if output_type == "latent" else to_output(self.decode(latents, batch_size), output_type)
        return BLDPipelineOutput(images, latents, seeds)

    def save_grid(self, prompts: Sequence[str], path: str | Path, seed: int = 0) -> Path:
        """One image per prompt (text models), or GRID_IMAGES images (class labels 0, 1, ...
        or unconditional), with the config's default steps, tau and w, as one PNG written
        atomically. Same seed, same grid (image i from seed + i)."""
        if self.conditioning in TEXT_MODES:
            if not prompts:
                raise ValueError("save_grid: a text-conditioned model needs at least one prompt (train.sample_prompts)")
            latents = self.sample_latents(list(prompts), seed=seed)
        elif self.conditioning == "class":
            latents = self.sample_latents(class_labels=[i % self.cfg.denoiser.num_classes for i in range(GRID_IMAGES)],
                                          seed=seed)
        else:
            latents = self.sample_latents(n=GRID_IMAGES, seed=seed)
        return save_png(make_grid(to_pil(self.decode(latents))), path)
