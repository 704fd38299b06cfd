"""Session fixtures for the text-to-image stages: real tiny data through the real tools.

Fashion-MNIST images (Debian's dataset-fashion-mnist) -> image shards (make_shards.py) ->
a tiny random-initialised binary autoencoder -> latent shards (encode_latents.py). The
trainer tests and the SLURM tests train on these. Registered from conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "test" / "t2i_tiny.yaml"
N_IMAGES = 256
SHARD_SIZE = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> Path:
    import torch

    from bld_t2i.config import AutoencoderConfig
    from bld_t2i.models.binary_ae import BinaryAutoencoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_ae") / "ae"
    BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", base_width=8, bits=8)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_image_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fmnist_shards")
    run([sys.executable, "data_tools/make_shards.py", "--source", "fashion-mnist", "--limit", str(N_IMAGES),
         "--shard-size", str(SHARD_SIZE), "--size", "64", "--out", str(out)])
    return f"{out}/shard-{{000000..{N_IMAGES // SHARD_SIZE - 1:06d}}}.tar"


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory, tiny_ae, tiny_image_shards) -> str:
    out = tmp_path_factory.mktemp("fmnist_latents")
    run([sys.executable, "data_tools/encode_latents.py", "--shards", tiny_image_shards,
         "--autoencoder", str(tiny_ae), "--out", str(out), "--batch-size", "64"])
    return f"{out}/latents-{{000000..{N_IMAGES // SHARD_SIZE - 1:06d}}}.tar"


def train_command(nproc: int, out_dir: Path, latents: str, ae: Path, *overrides: str) -> list[str]:
    """torchrun over `nproc` CPU processes running the real trainer on the tiny recipe."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "bld_t2i.cli.train", "--recipe", str(TINY_RECIPE),
            f"run.out_dir={out_dir}", f"latents.shards={latents}", f"autoencoder.path={ae}", *overrides]


def train_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # as the Makefile
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    env["WANDB_MODE"] = "offline"
    return env
