"""The arguments of `BLDPipeline.__call__`, checked and converted: prompts and class labels
repeated per image, generators turned into per-image seeds, guidance_scale into w, init
images and masks onto the latent grid, decoded images into the output type.

Every bad value is a ValueError that names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bld_t2i.data.images import fit, images_to_tensor, to_rgb
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.utils import to_pil

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
SEED_HIGH = 2**63 - 1  # drawn seeds lie in [0, 2**63 - 1): any int64 a generator takes


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


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


def condition_inputs(conditioning: str, prompt, class_labels, num_images, num_images_per_prompt: int
                     ) -> tuple[list[str] | None, list[int] | None, int | None]:
    """(prompts, class_labels, n) for `sample_latents`: each prompt or label repeated
    `num_images_per_prompt` times in a row ([p0, p0, p1, p1], as diffusers), or n =
    `num_images` for an unconditional model."""
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    k = int(num_images_per_prompt)
    if conditioning in TEXT_MODES:
        if prompt is None or class_labels is not None or num_images is not None:
            raise ValueError(f"this model is text-conditioned (denoiser.conditioning '{conditioning}'): pass prompt "
                             "(a string or a list), with num_images_per_prompt for several images of each")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return [p for p in prompts for _ in range(k)], None, None
    if conditioning == "class":
        if class_labels is None or prompt is not None or num_images is not None:
            raise ValueError("this model is class-conditioned: pass class_labels (an integer or a list), with "
                             "num_images_per_prompt for several images of each")
        labels = [class_labels] if _is_int(class_labels) else list(class_labels)
        if not labels or not all(_is_int(c) for c in labels):
            raise ValueError(f"class_labels must be an integer or a non-empty list of integers, got {class_labels!r}")
        return None, [int(c) for c in labels for _ in range(k)], None
    if prompt is not None or class_labels is not None or k != 1:
        raise ValueError("this model is unconditional (denoiser.conditioning 'none'): pass num_images, not prompt, "
                         "class_labels or num_images_per_prompt")
    if not _is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1 for an unconditional model, got {num_images!r}")
    return None, None, int(num_images)


def seeds_from_generators(generator: torch.Generator | Sequence[torch.Generator] | None, n: int) -> list[int]:
    """Per-image sampling seeds (the sampler draws image i from its own generator, seeded
    with seed i): one generator -> n seeds drawn from it in order; a list of n generators ->
    one seed drawn from each, so image i depends on generator i alone; None -> n seeds drawn
    from torch's default generator (random unless torch.manual_seed was set). Drawing
    advances a generator, so a second call with the same one gives new images, as diffusers."""
    if generator is None:
        return torch.randint(0, SEED_HIGH, (n,)).tolist()
    if isinstance(generator, torch.Generator):
        return torch.randint(0, SEED_HIGH, (n,), generator=generator, device=generator.device).tolist()
    gens = list(generator) if isinstance(generator, Sequence) else None
    if gens is None or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}")
    if len(gens) != n:
        raise ValueError(f"generator: a list of {len(gens)} generators for {n} images; give one per image "
                         "(prompts x num_images_per_prompt)")
    return [int(torch.randint(0, SEED_HIGH, (1,), generator=g, device=g.device)) for g in gens]


def guidance_w(guidance_scale) -> float:
    """diffusers' guidance_scale is 1 + w in our terms (docs/math.md (9)): 1 is no guidance."""
    if not isinstance(guidance_scale, (int, float, np.number)) or isinstance(guidance_scale, bool) \
            or not math.isfinite(guidance_scale) or guidance_scale < 1:
        raise ValueError(f"guidance_scale must be a number >= 1 (1 + w; 1: no guidance), got {guidance_scale!r}")
    return float(guidance_scale) - 1.0


def check_steps(num_inference_steps, T: int) -> int | None:
    if num_inference_steps is not None and (not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= T):
        raise ValueError(f"num_inference_steps must be an integer in 1..T={T} (diffusion.T), got {num_inference_steps!r}")
    return None if num_inference_steps is None else int(num_inference_steps)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def to_output(images: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor | np.ndarray:
    """Decoded images (B, 3, H, W) in [-1, 1] -> "pil": RGB images; "pt": float (B, 3, H, W)
    in [0, 1]; "np": float32 (B, H, W, 3) in [0, 1] (diffusers' layouts)."""
    if output_type == "pil":
        return to_pil(images)
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).numpy()
