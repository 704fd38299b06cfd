"""Write WebDataset image-caption shards plus a manifest.

    python data_tools/make_shards.py --source emoji --size 64 --out data/emoji64
    python data_tools/make_shards.py --source fashion-mnist --size 32 --out s3://bucket/fmnist32
    python data_tools/make_shards.py --source folder --input DIR --out OUT
    python data_tools/make_shards.py --source csv --input pairs.tsv --image-col path --caption-col text --out OUT

Each sample is ``{key}.{jpg|png}``, ``{key}.txt`` (caption), ``{key}.json`` (metadata);
shards are ``{prefix}-000000.tar, ...``, each written to a temp name and published
atomically; ``manifest.json`` has the sample count of every shard, the total, the skipped
inputs by reason and the label names.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from collections import Counter
from itertools import islice

from PIL import Image

from bld_t2i.data import sources
from bld_t2i.data.images import RESIZE_MODES, decode_image, fit, to_rgb
from bld_t2i.data.shards import TarShardWriter, join, write_bytes_atomic
from bld_t2i.data.stream import SkipSample

SOURCES = ("folder", "csv", "emoji", "fashion-mnist")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", default="", help="folder (folder) or CSV/TSV/parquet file (csv)")
    p.add_argument("--image-col", default="image", help="csv: column with image paths (relative to the file)")
    p.add_argument("--caption-col", default="caption", help="csv: column with captions")
    p.add_argument("--out", required=True, help="local folder or s3:// URL")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--size", type=int, default=0, help="square output size; 0 keeps the source's images")
    p.add_argument("--resize", default="center_crop", choices=RESIZE_MODES)
    p.add_argument("--format", default="png", choices=("png", "jpg"), help="encoding of resized images")
    p.add_argument("--min-size", type=int, default=8, help="smaller source images are skipped as tiny")
    p.add_argument("--limit", type=int, default=0, help="stop after this many samples (0: all)")
    p.add_argument("--skip-caption", type=caption_pattern, default=None, metavar="REGEX",
                   help="skip samples whose caption matches this regular expression, e.g. 'skin tone' "
                        "(counted in the manifest's skipped)")
    p.add_argument("--contact-sheet", default="", help="save a grid of the first 256 images to this PNG")
    return p.parse_args(argv)


def caption_pattern(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None


def items(args):
    if args.source == "folder":
        return sources.folder(args.input)
    if args.source == "csv":
        return sources.table(args.input, args.image_col, args.caption_col)
    if args.source == "emoji":
        return sources.emoji_images()
    return sources.fashion_mnist()


def kept(stream, skipped: Counter, skip_caption: re.Pattern | None):
    for item in stream:
        if isinstance(item, sources.Skip):
            skipped[item.reason] += 1
        elif skip_caption is not None and skip_caption.search(item.caption):
            skipped["caption_matched_skip"] += 1
        else:
            yield item


def encode(item: sources.Item, args) -> tuple[bytes, str]:
    """The image file to store: the source's bytes, or resized and re-encoded."""
    if isinstance(item.image, bytes):
        if args.size == 0:
            return item.image, "jpg" if item.ext == "jpeg" else item.ext
        image = decode_image(item.image, args.size, args.resize, args.min_size)
    else:
        image = to_rgb(item.image)
        if args.size:
            image = fit(image, args.size, args.resize)
    buf = io.BytesIO()
    if args.format == "jpg":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG", compress_level=6)
    return buf.getvalue(), args.format


def contact_sheet(images: list[bytes], path: str) -> None:
    thumbs = [Image.open(io.BytesIO(b)).convert("RGB").resize((64, 64)) for b in images]
    cols = 16
    sheet = Image.new("RGB", (cols * 64, math.ceil(len(thumbs) / cols) * 64), (255, 255, 255))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * 64, (i // cols) * 64))
    sheet.save(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.source in ("folder", "csv") and not args.input:
        sys.exit(f"--source {args.source} needs --input")
    skipped: Counter = Counter()
    shards, labels, sheet = [], {}, []
    stream = kept(items(args), skipped, args.skip_caption)
    if args.limit:
        stream = islice(stream, args.limit)
    key, done = 0, False
    while not done:
        name = f"{args.prefix}-{len(shards):06d}.tar"
        batch = list(islice(stream, args.shard_size))
        done = len(batch) < args.shard_size
        if not batch:
            break
        with TarShardWriter(join(args.out, name)) as writer:
            for item in batch:
                try:
                    data, ext = encode(item, args)
                except SkipSample as e:
                    skipped[e.reason] += 1
                    continue
                meta = {**item.meta, "key": f"{key:09d}"}
                if "label" in meta:
                    labels[meta["label"]] = meta.get("category", item.caption)
                writer.write({"__key__": f"{key:09d}", ext: data, "txt": item.caption.encode(), "json": json.dumps(meta).encode()})
                if len(sheet) < 256:
                    sheet.append(data)
                key += 1
        shards.append({"name": name, "count": writer.count})
        print(f"{join(args.out, name)}: {writer.count} samples", flush=True)
    manifest = {"format": "bld-image-shards", "version": 1, "source": args.source, "size": args.size,
                "resize": args.resize, "total": sum(s["count"] for s in shards), "shards": shards,
                "skipped": dict(skipped), "labels": {str(k): labels[k] for k in sorted(labels)}}
    write_bytes_atomic(join(args.out, "manifest.json"), json.dumps(manifest, indent=1).encode())
    if args.contact_sheet and sheet:
        contact_sheet(sheet, args.contact_sheet)
    print(f"{manifest['total']} samples in {len(shards)} shard(s), skipped: {dict(skipped)}")


if __name__ == "__main__":
    main()
