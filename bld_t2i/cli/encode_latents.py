"""Encode image shards once, offline, into bit-packed latent shards.

    python data_tools/encode_latents.py --shards 'data/emoji64/shard-{000000..000003}.tar' \\
        --autoencoder runs/ae/export --out data/emoji64-latents [--recipe R.yaml k=v ...]

Shards are divided among ranks (torchrun / srun environment) and SLURM array tasks
(--array-index/--array-count, default SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT). Rerun
the same command after a crash: finished shards are skipped. When the recipe's
`text_encoder` has a kind, captions are also embedded (fp16, trimmed to each caption's real
length). `encode.buckets` (--buckets 256x256,192x320,320x192: "HxW" pixels, multiples of the
autoencoder's downsampling factor) encodes each image at the bucket nearest its aspect ratio
instead of square. Every flag sets a field of the `encode` section; the resolved `encode` and
`text_encoder` sections are saved as `<out>/encode_latents.json`. The format is documented
in docs/data_formats.md.
"""

from __future__ import annotations

import json
import logging
import os

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import Flag, entry_config, to_dict, to_sections
from bld_t2i.data.encode import Encoder, encode_shards
from bld_t2i.data.images import ImageDecoder, parse_buckets
from bld_t2i.data.shards import join
from bld_t2i.distributed import dist_info, pick_device
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.text_encoders import build_text_encoder

SECTIONS = ("encode", "text_encoder")
FLAGS = [Flag("--shards", "encode.shards", "image shard URLs, '::'-separated"),
         Flag("--autoencoder", "encode.autoencoder", "exported autoencoder folder"),
         Flag("--out", "encode.out", "latent data set folder, local or s3://"),
         Flag("--batch-size", "encode.batch_size"), Flag("--resolution", "encode.resolution"),
         Flag("--resize", "encode.resize"), Flag("--buckets", "encode.buckets", "aspect-ratio buckets HxW,HxW,..."),
         Flag("--min-size", "encode.min_size"),
         Flag("--device", "encode.device"), Flag("--array-index", "encode.array_index"),
         Flag("--array-count", "encode.array_count")]


def main(argv=None) -> None:
    cfg = entry_config(__doc__.split("\n")[0], SECTIONS, FLAGS, argv,
                       required=("encode.shards", "encode.autoencoder", "encode.out"))
    if cfg is None:
        return
    e = cfg.encode
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = dist_info()
    array_index = e.array_index if e.array_index >= 0 else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    array_count = e.array_count or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    # Array tasks x processes per task: each process owns a distinct residue of shard indices.
    rank, world_size = array_index * info.world_size + info.rank, array_count * info.world_size
    device = pick_device(e.device)
    ae = BinaryAutoencoder.from_pretrained(e.autoencoder, device=device)
    text_encoder = build_text_encoder(cfg.text_encoder, device)
    text_cfg = to_dict(cfg.text_encoder) if text_encoder else None
    buckets = parse_buckets(e.buckets, ae.arch.downsample)
    decoder = ImageDecoder(e.resolution or ae.resolution, e.resize, e.min_size, buckets)
    done = encode_shards(e.shards, e.out, Encoder(ae, device, text_encoder), decoder,
                         e.batch_size, rank, world_size, text_cfg)
    if rank == 0:
        atomic_write_bytes(join(e.out, "encode_latents.json"), json.dumps(to_sections(cfg, SECTIONS), indent=2).encode())
    print(f"rank {rank}/{world_size}: done; manifest {'written' if done else 'waits for other ranks'}")


if __name__ == "__main__":
    main()
