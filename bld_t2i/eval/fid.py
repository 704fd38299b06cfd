"""FID and KID against reference image shards, with the reference features cached.

The feature extractor is torch-fidelity's InceptionV3 as torchmetrics wraps it
(`NoTrainInceptionV3`, "inception-v3-compat", antialiased resize to 299 px), from a local
weights file (`pt_inception-2015-12-05-6726825d.pth`); never downloaded. The reference
set's features (N, F) are computed once and kept in the evaluation's cache
(bld_t2i/eval/cache.py), keyed by the shards (their manifest), the image count and size,
the feature layer and the weights file's SHA-256, so a second evaluation on the same
reference set reads them back instead of decoding and embedding the images again.

Both metrics are computed from features, the same way whether they were computed or read:

- FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), in float64, the trace of the
  root from the eigenvalues of S_r S_g (torchmetrics' formula);
- KID = the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / F + 1)^3,
  mean and standard deviation over 100 random subsets of min(1000, N_r, N_g) of each set;
  the subsets are drawn from a fixed seed, so the same features give the same KID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bld_t2i.eval.cache import Reuse, file_digest, lookup, shards_fingerprint
from bld_t2i.eval.metrics import Skipped, read_images
from bld_t2i.progress import progress

KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0


class InceptionFeatures:
    """uint8 (N, 3, H, W) images -> (N, F) float32 features of one Inception layer."""

    def __init__(self, weights: str, features: int, device: torch.device):
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                                      feature_extractor_weights_path=weights).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, desc: str = "") -> np.ndarray:
        out = []
        with progress(total=len(images), desc=desc, unit="img", mode=None if desc else "off") as bar:
            for batch in images.split(32):
                out.append(self.net(batch.to(self.device)).float().cpu().reshape(len(batch), -1))
                bar.update(len(batch))
        return torch.cat(out).numpy()


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two (N, F) feature sets, N >= 2 each."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    mu_r, mu_f = r.mean(0), f.mean(0)
    cov_r, cov_f = torch.cov(r.T), torch.cov(f.T)
    root_trace = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * root_trace)


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two (m, F) float64 sets under (x.y / F + 1)^3."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_distance(real: np.ndarray, fake: np.ndarray, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """KID (mean, std over subsets) of two (N, F) feature sets."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least two images in each set")
    rng = np.random.default_rng(seed)
    r, f = real.astype(np.float64), fake.astype(np.float64)
    scores = [_mmd2(r[rng.choice(len(r), m, replace=False)], f[rng.choice(len(f), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(scores)), float(np.std(scores))


class FidKid:
    """FID and KID of generated sets against one reference set's features."""

    def __init__(self, extractor: InceptionFeatures, reference: np.ndarray, reuse: Reuse):
        self.extractor, self.reference, self.reuse = extractor, reference, reuse

    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """generated: uint8 (N, 3, H, W), N >= 2 -> {"fid", "kid", "kid_std"}."""
        fake = self.extractor(generated)
        kid, kid_std = kernel_distance(self.reference, fake)
        return {"fid": frechet_distance(self.reference, fake), "kid": kid, "kid_std": kid_std}


def reference_description(reference: str, size: int, limit: int, features: int, inception: str) -> dict:
    """What the reference features depend on: the cache key's inputs."""
    import torchmetrics

    return {"kind": "fid-reference-features", "shards": shards_fingerprint(reference), "limit": limit, "size": size,
            "resize": "center_crop", "features": features, "weights_sha256": file_digest(inception),
            "extractor": f"torchmetrics {torchmetrics.__version__} NoTrainInceptionV3 inception-v3-compat"}


def fid_kid(inception: str, reference: str, size: int, limit: int, device: torch.device, features: int = 2048,
            cache_dir: str | Path = "", cache: str = "use") -> FidKid | Skipped:
    """features: the Inception layer, 2048 (the standard FID) or 64 / 192 / 768 (cheaper, not
    comparable). The reference features come from `cache_dir` when they are there."""
    if not reference:
        return Skipped("no --reference image shards given")
    if not inception:
        return Skipped("no --inception weights given")
    if not Path(inception).is_file():
        return Skipped(f"--inception weights {inception} not found")
    extractor = InceptionFeatures(inception, features, device)

    def compute() -> tuple[dict[str, np.ndarray], int]:
        images, _ = read_images(reference, size, limit, desc="reference images")
        return {"features": extractor(images, desc="reference features")}, len(images)

    arrays, reuse = lookup("reference statistics", Path(cache_dir) / "fid_reference",
                           reference_description(reference, size, limit, features, inception), cache, compute, "images")
    return FidKid(extractor, arrays["features"], reuse)
