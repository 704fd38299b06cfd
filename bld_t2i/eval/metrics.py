"""Sample metrics: diversity, CLIP score, FID and KID.

Every metric that needs weights takes them from a local path; when the path is not given
or missing, the metric is reported as skipped with the reason (`Skipped`), never
downloaded.

- diversity: mean pairwise Hamming distance between the latents of one prompt's images,
  as a fraction of the bits (0: identical, 0.5: independent coin flips);
- CLIP score: 100 * max(cos(image, text), 0) with an OpenCLIP model (torchmetrics'
  definition), averaged over images;
- FID / KID: torchmetrics with torch-fidelity's InceptionV3 from a local weights file
  (`pt_inception-2015-12-05-6726825d.pth`), against reference images from image shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bld_t2i.data.images import ImageDecoder
from bld_t2i.data.shards import ShardError, expand_urls, iter_samples, open_shard
from bld_t2i.data.stream import SkipSample

log = logging.getLogger("bld_t2i.eval")


@dataclass(frozen=True)
class Skipped:
    reason: str


def diversity(latents: np.ndarray) -> float:
    """Mean pairwise Hamming distance of (n, ...) 0/1 latents, as a fraction of the bits; n >= 2."""
    n = len(latents)
    if n < 2:
        raise ValueError("diversity needs at least two images of a prompt")
    flat = latents.reshape(n, -1).astype(np.int64)  # (n, bits)
    ones = flat.sum(0)  # (bits,) images with the bit set
    # sum over pairs of [bit differs] = ones * (n - ones) per bit
    pair_diff = (ones * (n - ones)).sum()
    return float(pair_diff / (n * (n - 1) / 2) / flat.shape[1])


class ClipScorer:
    """An OpenCLIP model from a local checkpoint: `score(image_features(images), prompts)` per image.

    `model`: an OpenCLIP architecture name (with `checkpoint` a local file) or
    `local-dir:FOLDER` (an OpenCLIP export with open_clip_config.json and its weights).
    """

    def __init__(self, model: str, checkpoint: str, device: torch.device):
        import open_clip

        if model.startswith("local-dir:"):
            if not Path(model[len("local-dir:"):]).is_dir():
                raise FileNotFoundError(f"--clip-model: folder {model[len('local-dir:'):]} not found")
            pretrained = None
        else:
            if not checkpoint or not Path(checkpoint).is_file():
                raise FileNotFoundError(f"--clip-checkpoint: OpenCLIP checkpoint {checkpoint!r} not found")
            pretrained = checkpoint
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    @torch.no_grad()
    def image_features(self, pil_images: list) -> torch.Tensor:
        x = torch.stack([self.preprocess(img) for img in pil_images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)  # (B, E)

    @torch.no_grad()
    def score(self, image_features: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) CLIP scores of image i (its `image_features`) against prompt i."""
        txt = torch.nn.functional.normalize(
            self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (100 * (image_features * txt).sum(-1)).clamp_min(0).cpu()


def clip_scorer(model: str, checkpoint: str, device: torch.device) -> ClipScorer | Skipped:
    if not model:
        return Skipped("no --clip-model given")
    try:
        return ClipScorer(model, checkpoint, device)
    except FileNotFoundError as e:
        return Skipped(str(e))


def reference_images(spec: str, size: int, limit: int) -> torch.Tensor:
    """Up to `limit` images (uint8 (N, 3, size, size)) from image shards, centre-cropped."""
    decoder = ImageDecoder(size, "center_crop", 8)
    arrays = []
    for url in expand_urls(spec):
        with open_shard(url) as f:
            try:
                for raw in iter_samples(f, url):
                    try:
                        arrays.append(decoder.sample(raw)[0])
                    except SkipSample:
                        continue
                    if len(arrays) >= limit:
                        break
            except ShardError as e:  # keep the images before the damage
                log.warning("reference shard %s is damaged after %d images: %s", url, len(arrays), e)
        if len(arrays) >= limit:
            break
    if not arrays:
        raise ValueError(f"--reference {spec}: no readable images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidKid:
    """FID and KID of generated sets against one reference set (its features computed once)."""

    def __init__(self, inception: str, reference: torch.Tensor, device: torch.device, features: int = 2048):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.device = device
        self.reference = reference
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False,
                                            feature_extractor_weights_path=inception).to(device)
        # KID reuses the loaded extractor: one copy of the weights
        self.kid = KernelInceptionDistance(feature=self.fid.inception, reset_real_features=False,
                                           subset_size=2).to(device)
        for batch in reference.split(32):
            self.fid.update(batch.to(device), real=True)
            self.kid.update(batch.to(device), real=True)

    @torch.no_grad()
    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """generated: uint8 (N, 3, H, W), N >= 2 -> {"fid", "kid", "kid_std"}."""
        self.fid.reset()
        self.kid.reset()
        for batch in generated.split(32):
            self.fid.update(batch.to(self.device), real=False)
            self.kid.update(batch.to(self.device), real=False)
        self.kid.subset_size = min(1000, len(generated), len(self.reference))
        kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(inception: str, reference: str, size: int, limit: int, device: torch.device,
            features: int = 2048) -> FidKid | Skipped:
    """features: the Inception layer, 2048 (the standard FID) or 64 / 192 / 768 (cheaper, not comparable)."""
    if not reference:
        return Skipped("no --reference image shards given")
    if not inception:
        return Skipped("no --inception weights given")
    if not Path(inception).is_file():
        return Skipped(f"--inception weights {inception} not found")
    return FidKid(inception, reference_images(reference, size, limit), device, features)
