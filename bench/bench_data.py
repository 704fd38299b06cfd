"""Data throughput on this machine: latent loader vs raw reads vs image decoding vs encoding.

    python bench/bench_data.py [--quick] [--work DIR]

(a) the latent loader on 16x16x64-bit latents (2 KiB packed) in the training process and
    with 1 and 2 loader workers, against reading the same shard files' raw bytes;
(b) the image-shard reader decoding 256px JPEG emoji to 64px and 256px tensors, in the
    training process and with 1 and 2 workers (what training pays without pre-encoding);
(c) encoding images to latent shards with data_tools/encode_latents.py (a random
    ae64-tiny autoencoder at 64px on the CPU, or bae256-c64 at 256px on a GPU).

Writes bench/results/data_<cpu|gpu>.md (bench/common.py: table and machine stamp).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import AutoencoderConfig, DataConfig, LatentsConfig
from bld_t2i.data.images import image_loader
from bld_t2i.data.latents import BIT_ORDER, FORMAT, VERSION, latent_loader, pack_bits
from bld_t2i.data.shards import TarShardWriter, join
from bld_t2i.models.binary_ae import BinaryAutoencoder

from common import device_suffix, machine_stamp, write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT_SHAPE = (16, 16, 64)


def write_latents(folder: str, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    for s in range(shards):
        packed = pack_bits(rng.random((per_shard, *LATENT_SHAPE)) > 0.5)
        with TarShardWriter(join(folder, f"latents-{s:06d}.tar")) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{s:03d}{i:06d}", "bits": packed[i].tobytes(),
                         "txt": f"a picture of thing number {i}".encode(), "json": json.dumps({"label": i % 10}).encode()})
    manifest = {"format": FORMAT, "version": VERSION, "latent_shape": list(LATENT_SHAPE), "bit_order": BIT_ORDER,
                "autoencoder_fingerprint": "bench", "shards": []}
    atomic_write_bytes(join(folder, "manifest.json"), json.dumps(manifest).encode())
    return join(folder, f"latents-{{000000..{shards - 1:06d}}}.tar")


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rate(loader, samples: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of all processes) over `samples`
    samples after one warm-up batch. On a shared machine the second is the fair one: it
    is what the loader would do with its cores to itself."""
    next(loader)
    n, start, cpu = 0, time.perf_counter(), cpu_seconds()
    while n < samples:
        n += len(next(loader)["key"])
    wall = time.perf_counter() - start
    loader.close()  # joins the workers, so their CPU time is counted
    return n / wall, n / (cpu_seconds() - cpu)


def raw_read_rate(folder: str, samples_per_file: int) -> tuple[float, float]:
    """(MB/s, samples/s) of reading the shard files' bytes, nothing parsed."""
    files = sorted(glob.glob(os.path.join(folder, "*.tar")))
    nbytes, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                nbytes += len(chunk)
    dt = time.perf_counter() - start
    return nbytes / dt / 1e6, len(files) * samples_per_file / dt


def encode_rate(work: str, image_spec: str, images: int) -> tuple[str, float]:
    gpu = torch.cuda.is_available()
    preset = "bae256-c64" if gpu else "ae64-tiny"
    torch.manual_seed(0)
    ae = BinaryAutoencoder.from_config(AutoencoderConfig(preset=preset))
    ae.save_pretrained(join(work, "ae"))
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "data_tools", "encode_latents.py"), "--shards", image_spec,
                    "--autoencoder", join(work, "ae"), "--out", join(work, "encoded"), "--batch-size", "64"],
                   check=True, stdout=subprocess.DEVNULL)
    total = json.loads(open(join(work, "encoded/manifest.json")).read())["total"]
    assert total == images, (total, images)
    where = "GPU" if gpu else "CPU"
    return f"{preset} at {ae.resolution}px on {where}, batch 64, incl. start-up", total / (time.perf_counter() - start)


def row(what: str, where: str, wall: float, cpu: float | None, note: str = "") -> dict:
    return {"what": what, "where": where, "samples/s (wall)": wall, "samples per CPU-second": cpu, "note": note}


NOTES = """Samples per CPU-second count the CPU time of the training process and its loader workers
together, so they do not depend on how busy a shared machine is; the wall rate is what this run
got; wall / CPU-second is the share of the cores the run got (a loaded 2-core machine gives a
fraction of one core). (a) is bound by Python parsing of the tar headers (three members per sample) and the
per-sample caption/JSON handling; reading the bytes is a small part (the bits stay packed:
the trainer unpacks them on its device). Worker rows add the pickling of each batch to the training process. (b) runs on
fewer samples than (a); the rates are per second either way."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (make bench)")
    p.add_argument("--work", default="", help="scratch folder (default: a temp folder)")
    args = p.parse_args()
    latent_samples, image_samples = (10_000, 400) if args.quick else (40_000, 1_600)
    work = args.work or tempfile.mkdtemp(prefix="bench_data.")
    stamp = machine_stamp()
    rows = []

    lat_spec = write_latents(join(work, "latents"), shards=4, per_shard=latent_samples // 8)
    mb_s, raw_samples_s = raw_read_rate(join(work, "latents"), latent_samples // 8)
    rows.append(row("(a) raw read of the latent shard files", "-", raw_samples_s, None, f"{mb_s:,.0f} MB/s"))
    for workers in (0, 1, 2):
        cfg = LatentsConfig(shards=lat_spec, batch_size=256, num_workers=workers, shuffle_window=1024)
        wall, cpu = rate(latent_loader(cfg, 0, "bench", LATENT_SHAPE), latent_samples)
        where = "in the training process" if workers == 0 else f"{workers} worker(s)"
        rows.append(row("(a) latent loader, 16x16x64 bits, batch 256", where, wall, cpu, "target >= 20,000"))

    images = join(work, "images")
    subprocess.run([sys.executable, os.path.join(REPO, "data_tools", "make_shards.py"), "--source", "emoji",
                    "--size", "256", "--format", "jpg", "--limit", str(image_samples), "--shard-size",
                    str(image_samples // 4), "--out", images], check=True, stdout=subprocess.DEVNULL)
    img_spec = join(images, "shard-{000000..000003}.tar")
    for size in (64, 256):
        for workers in (0, 1, 2):
            cfg = DataConfig(shards=img_spec, image_size=size, batch_size=32, num_workers=workers)
            wall, cpu = rate(image_loader(cfg, seed=0), image_samples)
            where = "in the training process" if workers == 0 else f"{workers} worker(s)"
            rows.append(row(f"(b) image reader, 256px JPEG -> {size}px tensors, batch 32", where, wall, cpu))

    what, images_s = encode_rate(work, join(images, "shard-000000.tar"), image_samples // 4)
    rows.append(row(f"(c) encode_latents.py, {what}", "1 process", images_s, None, "images/s"))

    path = write_result(f"data_{device_suffix()}", "Data throughput", rows, NOTES, stamp)
    print(path.read_text())


if __name__ == "__main__":
    main()
