"""Sample metrics: diversity and CLIP score, and the image reader of the metrics that
compare with real images.

Every metric that needs weights takes them from a local path; when the path is not given
or missing, the metric is reported as skipped with the reason (`Skipped`), never
downloaded. The others: FID / KID (bld_t2i/eval/fid.py), class accuracy under a local
classifier (classifier.py), caption recall (recall.py) and per-bit statistics (bitstats.py).

- diversity: mean pairwise Hamming distance between the latents of one prompt's images,
  as a fraction of the bits (0: identical, 0.5: independent coin flips);
- CLIP score: 100 * max(cos(image, text), 0) with an OpenCLIP model (torchmetrics'
  definition), averaged over images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bld_t2i.config import StreamConfig
from bld_t2i.data.images import ImageDecoder
from bld_t2i.data.shards import ShardError, expand_urls, iter_samples, open_shard
from bld_t2i.data.stream import SkipSample
from bld_t2i.progress import progress

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


def read_images(spec: str, size: int, limit: int, desc: str = "images") -> tuple[torch.Tensor, np.ndarray]:
    """Up to `limit` images (0: all) (uint8 (N, 3, size, size)) from image shards, centre-cropped,
    and their labels (N,) int64 (the .json "label", -1 where there is none)."""
    decoder = ImageDecoder(size, "center_crop", 8)
    arrays, labels = [], []
    with progress(total=limit or None, desc=desc, unit="img") as bar:
        for url in expand_urls(spec):
            with open_shard(url) as f:
                try:
                    for raw in iter_samples(f, url, max_member_bytes=StreamConfig.max_member_bytes):
                        try:
                            if raw.damage is not None:
                                continue
                            image, _, _, label, _ = decoder.sample(raw)
                        except SkipSample:
                            continue
                        arrays.append(image)
                        labels.append(label)
                        bar.update(1)
                        if len(arrays) == limit:
                            break
                except ShardError as e:  # keep the images before the damage
                    log.warning("shard %s is damaged after %d images: %s", url, len(arrays), e)
            if len(arrays) == limit:
                break
    if not arrays:
        raise ValueError(f"{spec}: no readable images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), np.array(labels, np.int64)
