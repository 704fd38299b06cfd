"""Seconds per sample of BLDPipeline at 16 and 64 steps, generation and decode timed apart.

    python bench/bench_sampling.py [--presets tiny authors] [--steps 16 64] [--guidance 0 10]
                                   [--batch 8 1] [--threads 1 2] [--device auto|cpu|cuda] [--dtype fp32|bf16]
                                   [--quick]

Presets (random weights: speed does not depend on them):
  tiny     denoiser "tiny" (2 x 64) on the ae64-tiny autoencoder: 64px, 8x8x16-bit latents;
  authors  denoiser "authors" (24 x 768, ~172M) on bae256-c64: 256px, 16x16x64 bits, the
           authors' text-to-image size (SPEC section 3).
The condition is one class token, the same compute as the authors' single pooled CLIP
token; guidance w > 0 runs the conditional and the null branch in one batched forward.
Generation is `sample_latents` (a whole batch under one seed), decode is the autoencoder;
each is timed after one warm-up batch. `--threads` lists torch CPU thread counts to try: on a
shared, loaded machine fewer threads can be much faster (threads wait on each other).
`--quick` (make bench) times the authors' model without guidance only: on a CPU its guided
64-step sample takes minutes. The poster's figures (BLD 0.20 s at 16 steps, 0.82 s at 64
steps, SPEC section 4) are from a GPU. Writes bench/results/sampling_<cpu|gpu>.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_suffix, machine_stamp, write_result  # noqa: E402

from bld_t2i.config import Config  # noqa: E402
from bld_t2i.distributed import pick_device  # noqa: E402
from bld_t2i.models.binary_ae import BinaryAutoencoder  # noqa: E402
from bld_t2i.models.denoiser import Denoiser  # noqa: E402
from bld_t2i.pipeline import BLDPipeline  # noqa: E402

PRESETS = {"tiny": ("tiny", "ae64-tiny"), "authors": ("authors", "bae256-c64")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(preset: str, device: torch.device, dtype: torch.dtype) -> BLDPipeline:
    cfg = Config()
    cfg.denoiser.preset, cfg.autoencoder.preset = PRESETS[preset]
    cfg.denoiser.conditioning, cfg.denoiser.num_classes = "class", 1000
    torch.manual_seed(0)
    ae = BinaryAutoencoder.from_config(cfg.autoencoder)
    return BLDPipeline(cfg, Denoiser(cfg.denoiser, ae.latent_shape), ae, None, device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_setting(pipe: BLDPipeline, steps: int, guidance: float, batch: int, repeats: int) -> dict:
    labels = list(range(batch))
    pipe.sample_latents(class_labels=labels, steps=1, guidance=guidance, seed=0, batch_size=batch)  # warm-up
    gen = dec = 0.0
    for r in range(repeats):
        sync(pipe.device)
        t0 = time.perf_counter()
        latents = pipe.sample_latents(class_labels=labels, steps=steps, guidance=guidance, seed=r, batch_size=batch)
        t1 = time.perf_counter()
        pipe.decode(latents, batch)
        sync(pipe.device)
        dec += time.perf_counter() - t1
        gen += t1 - t0
    n = batch * repeats
    return {"generation s/sample": gen / n, "decode s/sample": dec / n, "total s/sample": (gen + dec) / n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "authors"], choices=sorted(PRESETS))
    p.add_argument("--steps", nargs="+", type=int, default=[16, 64])
    p.add_argument("--guidance", nargs="+", type=float, default=[0.0, 10.0])
    p.add_argument("--batch", nargs="+", type=int, default=None, help="one per preset; default 8 tiny / 1 authors on CPU")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()], help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="the authors' model at w=0 only (make bench)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    default_batch = {"tiny": 8, "authors": 1} if device.type == "cpu" else {"tiny": 256, "authors": 32}
    batches = args.batch or [default_batch[x] for x in args.presets]
    rows = []
    for preset, batch in zip(args.presets, batches):
        pipe = build(preset, device, DTYPES[args.dtype])
        params = sum(p.numel() for p in pipe.denoiser.parameters()) / 1e6
        guidance = [0.0] if args.quick and preset == "authors" else args.guidance
        for threads, steps, w in product(args.threads, args.steps, guidance):
            torch.set_num_threads(threads)
            r = time_setting(pipe, steps, w, batch, args.repeats)
            row = {"preset": preset, "denoiser M params": round(params, 1),
                   "latent (h,w,C)": "x".join(map(str, pipe.latent_shape)), "image px": pipe.autoencoder.resolution,
                   "steps": steps, "w": w, "batch": batch, "dtype": args.dtype, "threads": threads, **r}
            print(row, flush=True)
            rows.append(row)
        del pipe
    notes = ("Random weights; class-token condition (the compute of the authors' one pooled CLIP token). "
             "w > 0 doubles the denoiser batch (conditional and null branch in one forward). "
             "Poster (GPU): BLD 0.20 s/sample at 16 steps, 0.82 s/sample at 64 steps.")
    path = write_result(f"sampling_{device_suffix()}", f"Sampling speed of BLDPipeline ({device.type})", rows, notes,
                        machine_stamp())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
