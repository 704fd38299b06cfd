"""A small image classifier for class-conditional models: trained on labelled image shards
(`bld_t2i.cli.train_classifier`), it scores the evaluation's samples by the fraction the
classifier labels with the class they were drawn for (`--classifier FOLDER`).

The network: 3x3 convolutions (each with BatchNorm and ReLU) of widths w (stride 2), 2w,
4w, 4w with a 2x2 max-pool after the second and third, a global average pool and a linear
layer; 0.24M parameters at w = 32. On Fashion-MNIST at 32 px (20,000 training images, one
CPU thread, ~3 min for 5 epochs) it reaches about 90% on the test images.

A classifier folder holds `model.safetensors` and `config.json` (architecture, image size,
classes, and the accuracy on held-out real images that the report prints beside the
samples'), each written atomically, the config last: a folder with a config is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from bld_t2i.checkpoint import atomic_save_safetensors, atomic_write_text

WEIGHTS, CONFIG = "model.safetensors", "config.json"
ARCH = "small-cnn-v2"


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, classes) logits."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(3, w, stride=2), *_block(w, 2 * w), nn.MaxPool2d(2),
                                      *_block(2 * w, 4 * w), nn.MaxPool2d(2), *_block(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))  # (B, 4w) global average -> (B, classes)


def to_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, r, r) in [-1, 1], resized (antialiased) when H, W != r."""
    x = images.float().div(127.5).sub(1.0)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


def accuracy(predicted: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """The fraction of predicted labels equal to the true ones."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or not len(labels):
        raise ValueError(f"accuracy of {predicted.shape} predictions against {labels.shape} labels")
    return float((predicted == labels).mean())


class Classifier:
    """A trained SmallCNN with its config: `predict(uint8 images) -> labels`."""

    def __init__(self, model: SmallCNN, config: dict, device: torch.device):
        self.model, self.config, self.device = model.to(device).eval(), config, device

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> Classifier:
        folder = Path(folder)
        config_path = folder / CONFIG
        if not config_path.is_file() or not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(f"--classifier: {folder} is not a classifier folder ({CONFIG} and {WEIGHTS}; "
                                    "python -m bld_t2i.cli.train_classifier writes one)")
        config = json.loads(config_path.read_text())
        if config.get("arch") != ARCH:
            raise ValueError(f"{config_path}: architecture {config.get('arch')!r}, expected {ARCH!r}")
        model = SmallCNN(config["num_classes"], config["width"])
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(model, config, torch.device(device))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_save_safetensors(self.model.state_dict(), folder / WEIGHTS)
        atomic_write_text(folder / CONFIG, json.dumps(self.config, indent=1))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        self.model.eval()
        out = [self.model(to_input(b, self.config["resolution"]).to(self.device)).argmax(1).cpu()
               for b in images.split(batch_size)]
        return torch.cat(out).numpy()

    @property
    def heldout(self) -> dict:
        """{"accuracy", "images", "shards"} of the held-out real images it was measured on."""
        return self.config.get("heldout", {})
