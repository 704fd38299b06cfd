"""Training the evaluation's classifier (bld_t2i/eval/classifier.py) on labelled image shards.

The label of a sample is its `.json` "label" (make_shards writes the class index there);
samples without one are left out. Held out for the reported accuracy: the `heldout` shards
when given (Fashion-MNIST: its test images), else a random 1 in `heldout_every` of the
labelled images of the training shards (drawn from the seed), never trained on. Adam with a
one-cycle schedule, cross-entropy, a fixed seed; the held-out accuracy after the last epoch
is saved in the folder's config.json.

With `autoencoder` (an exported binary autoencoder), the held-out images are also measured
after a round trip through it (encode, decode): a latent diffusion model's samples are no
sharper than its autoencoder's reconstructions, so this is the real images' accuracy to read
the samples' beside (guided samples can score above it: guidance draws typical members of a
class, easier than the average test image). With `reconstructions` = p > 0, each training draw is the image's
reconstruction with probability p, else the image itself, so the classifier also knows the
autoencoder's blur (Fashion-MNIST's sandals, shirts and coats lose their details in it).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from bld_t2i.config.tools import ClassifierConfig
from bld_t2i.distributed import pick_device
from bld_t2i.eval.classifier import ARCH, Classifier, SmallCNN, accuracy, to_input
from bld_t2i.eval.metrics import read_images
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.progress import progress


def labelled(spec: str, size: int, limit: int, desc: str) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = read_images(spec, size, limit, desc=desc)
    keep = labels >= 0
    if not keep.any():
        raise ValueError(f"{spec}: no sample has a .json label")
    return images[torch.from_numpy(keep)], labels[keep]


def split(cfg: ClassifierConfig) -> tuple[tuple[torch.Tensor, np.ndarray], tuple[torch.Tensor, np.ndarray]]:
    """(train images, labels), (held-out images, labels)."""
    images, labels = labelled(cfg.shards, cfg.resolution, cfg.limit, "classifier images")
    if cfg.heldout:
        return (images, labels), labelled(cfg.heldout, cfg.resolution, cfg.heldout_limit, "held-out images")
    held = np.zeros(len(labels), bool)  # a random 1 in heldout_every: shards are often ordered by class
    held[np.random.default_rng(cfg.seed).permutation(len(labels))[: len(labels) // cfg.heldout_every]] = True
    if held.all() or not held.any():
        raise ValueError(f"{len(labels)} labelled images cannot be split 1 in {cfg.heldout_every}")
    mask = torch.from_numpy(held)
    return (images[~mask], labels[~held]), (images[mask], labels[held])


@torch.no_grad()
def reconstruct(ae: BinaryAutoencoder, images: torch.Tensor, desc: str) -> torch.Tensor:
    """uint8 (N, 3, r, r) -> their uint8 round trips through the autoencoder (its resolution r)."""
    if images.shape[-1] != ae.resolution:
        raise ValueError(f"classifier.resolution {images.shape[-1]} differs from the autoencoder's {ae.resolution}")
    device = next(ae.parameters()).device
    out = []
    with progress(total=len(images), desc=desc, unit="img") as bar:
        for batch in images.split(256):
            x = ae.decode(ae.encode(to_input(batch, ae.resolution).to(device)))
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
            bar.update(len(batch))
    return torch.cat(out)


def train_epoch(model: SmallCNN, opt: torch.optim.Optimizer, sched, images: torch.Tensor, labels: torch.Tensor,
                cfg: ClassifierConfig, g: torch.Generator, device: torch.device, bar,
                recon: torch.Tensor | None = None) -> float:
    """One pass in a random order (each draw the reconstruction `recon` with probability
    cfg.reconstructions); returns the mean training loss."""
    model.train()
    order = torch.randperm(len(images), generator=g)
    total, seen = 0.0, 0
    for lo in range(0, len(order), cfg.batch_size):
        idx = order[lo : lo + cfg.batch_size]
        batch = images[idx]
        if recon is not None:
            use = torch.rand(len(idx), generator=g) < cfg.reconstructions
            batch = torch.where(use[:, None, None, None], recon[idx], batch)
        x = to_input(batch, cfg.resolution).to(device)
        if cfg.flip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()  # one-cycle: warm up, then anneal, per update
        total += loss.item() * len(idx)
        seen += len(idx)
        bar.update(len(idx))
        bar.set_postfix(loss=loss.item())
    return total / seen


def train_classifier(cfg: ClassifierConfig) -> dict:
    """Train, measure on the held-out images (and their reconstructions), save to cfg.out;
    returns the saved config."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    (train_x, train_y), (held_x, held_y) = split(cfg)
    ae = BinaryAutoencoder.from_pretrained(cfg.autoencoder, device=device).eval() if cfg.autoencoder else None
    held_rec = reconstruct(ae, held_x, "held-out reconstructions") if ae is not None else None
    train_rec = reconstruct(ae, train_x, "training reconstructions") if ae is not None and cfg.reconstructions else None
    num_classes = int(max(train_y.max(), held_y.max())) + 1
    model = SmallCNN(num_classes, cfg.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * -(-len(train_y) // cfg.batch_size))
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    config = {"arch": ARCH, "num_classes": num_classes, "width": cfg.width, "resolution": cfg.resolution,
              "shards": cfg.shards, "train_images": len(train_y), "epochs": cfg.epochs, "seed": cfg.seed,
              "autoencoder": cfg.autoencoder, "reconstructions": cfg.reconstructions if train_rec is not None else 0.0}
    classifier = Classifier(model, config, device)
    held = {"images": len(held_y), "shards": cfg.heldout or f"1 in {cfg.heldout_every} of the training shards' images"}
    with progress(total=cfg.epochs * len(train_y), desc="classifier", unit="img") as bar:
        for epoch in range(cfg.epochs):
            loss = train_epoch(model, opt, sched, train_x, torch.from_numpy(train_y), cfg, g, device, bar, train_rec)
            held["accuracy"] = accuracy(classifier.predict(held_x), held_y)
            line = f"held-out accuracy {held['accuracy']:.4f} ({len(held_y)} real images)"
            if held_rec is not None:
                held["reconstructed_accuracy"] = accuracy(classifier.predict(held_rec), held_y)
                line += f", {held['reconstructed_accuracy']:.4f} on their autoencoder reconstructions"
            bar.write(f"[classifier] epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, {line}")
    config["heldout"] = held
    config["train_s"] = time.perf_counter() - start
    classifier.save(cfg.out)
    return config
