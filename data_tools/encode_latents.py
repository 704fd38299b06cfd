"""Encode image shards once, offline, into bit-packed latent shards.

    python data_tools/encode_latents.py --shards 'data/emoji64/shard-{000000..000003}.tar' \
        --autoencoder runs/ae/export --out data/emoji64-latents [--recipe R.yaml k=v ...]

Shards are divided among ranks (torchrun / srun environment) and SLURM array tasks
(--array-index/--array-count, default SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT). Rerun
the same command after a crash: finished shards are skipped. With --recipe, captions are
also embedded by the recipe's text_encoder (fp16, trimmed to each caption's real length).
The format is documented in docs/data_formats.md.
"""

from __future__ import annotations

import argparse
import logging
import os

from bld_t2i.config import load_config, to_dict
from bld_t2i.data.encode import DTYPES, Encoder, encode_shards
from bld_t2i.data.images import RESIZE_MODES, ImageDecoder
from bld_t2i.distributed import dist_info, pick_device
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.text_encoders import build_text_encoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="image shard URLs, brace-expanded, '::'-separated, local or s3://")
    p.add_argument("--autoencoder", required=True, help="exported autoencoder folder (save_pretrained)")
    p.add_argument("--out", required=True, help="latent data set folder, local or s3://")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=0, help="image size fed to the encoder; 0: the autoencoder's")
    p.add_argument("--resize", default="center_crop", choices=RESIZE_MODES)
    p.add_argument("--min-size", type=int, default=8, help="smaller source images are skipped as tiny")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype of the encoder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--array-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    p.add_argument("--array-count", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    p.add_argument("--recipe", default="", help="recipe whose text_encoder embeds the captions")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = dist_info()
    # Array tasks x processes per task: each process owns a distinct residue of shard indices.
    rank = args.array_index * info.world_size + info.rank
    world_size = args.array_count * info.world_size
    device = pick_device(args.device)
    ae = BinaryAutoencoder.from_pretrained(args.autoencoder, device=device)
    text_encoder, text_cfg = None, None
    if args.recipe:
        cfg = load_config(args.recipe, args.overrides)
        text_encoder = build_text_encoder(cfg.text_encoder, device)
        text_cfg = to_dict(cfg.text_encoder) if text_encoder else None
    decoder = ImageDecoder(args.resolution or ae.resolution, args.resize, args.min_size)
    done = encode_shards(args.shards, args.out, Encoder(ae, device, args.dtype, text_encoder), decoder,
                         args.batch_size, rank, world_size, text_cfg)
    print(f"rank {rank}/{world_size}: done; manifest {'written' if done else 'waits for other ranks'}")


if __name__ == "__main__":
    main()
