"""The binary autoencoder: training-step throughput per preset, and the emoji recipe end to end.

    python bench/bench_ae.py [--presets ae64-f4 ae64-tiny ...] [--batch 16] [--steps 3]
    python bench/bench_ae.py --train [--recipe recipes/ae/emoji64.yaml] [--out runs/bench-ae-train] [--nproc 1]

(a) Throughput (the default, a minute or two): one training step of each preset at its
    resolution (forward with sampled bits, L1, backward, AdamW), in this process, after one
    warm-up step; no GAN or LPIPS. Writes bench/results/ae_throughput_<cpu|gpu>.md.
(b) Real data (`--train`, about 20 minutes on 2 CPU cores): `python -m bld_t2i.cli.train_ae --recipe
    RECIPE` as one process using every core (the default; on 2 idle cores it beats two
    single-threaded DDP ranks, 24 against 21.6 images/s), or under torchrun as `--nproc` CPU
    ranks of one thread each, from an empty output folder, timed from start to export; the held-out metrics
    are the trainer's own final evaluation
    (`eval.json`: deterministic codes of the held-out val.shards). Writes bench/results/ae_<cpu|gpu>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bld_t2i.config import AutoencoderConfig, load_config
from bld_t2i.models.binary_ae import AE_PRESETS, BinaryAutoencoder
from bld_t2i.training.loop import EXPORT_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_suffix, machine_stamp, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_throughput(preset: str, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = BinaryAutoencoder.from_config(AutoencoderConfig(preset=preset)).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, model.resolution, model.resolution, device=device) * 2 - 1

    def step() -> None:
        loss = (model(x).recon - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    h, w, c = model.latent_shape
    return {"preset": preset, "resolution": model.resolution, "latent (h x w x C)": f"{h}x{w}x{c}",
            "bits/image": h * w * c, "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
            "batch": batch, "train images/s": batch * steps / (time.perf_counter() - t)}


def train_recipe(recipe: str, out: Path, nproc: int) -> dict:
    """The trainer in this interpreter (nproc 1) or under torchrun with `nproc` single-threaded CPU ranks."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(recipe, [f"run.out_dir={out}"])
    if nproc == 1:
        launcher, env = [sys.executable], dict(os.environ)
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "bld_t2i.cli.train_ae", "--recipe", recipe, f"run.out_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "eval.json").read_text())
    ae = BinaryAutoencoder.from_pretrained(out / EXPORT_DIR)
    h, w, c = ae.latent_shape
    return {"recipe": recipe, "preset": cfg.autoencoder.preset, "bits/image": h * w * c, "ranks": nproc,
            "train samples": cfg.train.total_samples, "wall time (min)": seconds / 60,
            "held-out images": metrics["val/images"], "PSNR (dB)": metrics["val/psnr"], "SSIM": metrics["val/ssim"],
            "dead bits": metrics["val/dead_bits"], "bit entropy": metrics["val/bit_entropy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["ae64-tiny", "ae64-f4", "ae128-small"], choices=sorted(AE_PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--train", action="store_true", help="train the recipe on real data instead (about 20 minutes)")
    p.add_argument("--recipe", default="recipes/ae/emoji64.yaml")
    p.add_argument("--out", default="runs/bench-ae-train")
    p.add_argument("--nproc", type=int, default=1, help="1: one process, all cores; more: ranks of one thread each")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stamp = machine_stamp()
    if args.train:
        result = train_recipe(args.recipe, ROOT / args.out, args.nproc)
        ranks = "one process using every core" if args.nproc == 1 else f"{args.nproc} ranks of one thread each"
        notes = (f"`python -m bld_t2i.cli.train_ae --recipe {args.recipe}` as {ranks}, "
                 "from scratch; wall time from launch to export. Metrics on the held-out shards with deterministic "
                 "codes (p > 0.5); dead bits: share of the C bit channels whose mean code is below 1% or above 99%; "
                 "bit entropy: mean binary entropy of each of the h*w*C bits over the held-out images.")
        path = write_result(f"ae_{device_suffix()}", "Binary autoencoder on real emoji", [result], notes, stamp)
    else:
        rows = [step_throughput(name, args.batch, args.steps, device) for name in args.presets]
        notes = "One training step (sampled bits, L1, backward, AdamW), fp32, after one warm-up step."
        path = write_result(f"ae_throughput_{device_suffix()}", "Binary autoencoder training throughput", rows, notes, stamp)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
