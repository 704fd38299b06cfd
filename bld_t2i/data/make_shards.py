"""Writing WebDataset image-caption shards plus a manifest, from a source (make_shards).

Each sample is ``{key}.{jpg|png}``, ``{key}.txt`` (caption), ``{key}.json`` (metadata);
shards are ``{prefix}-000000.tar, ...``, each written to a temp name and published
atomically; ``manifest.json`` has the sample count of every shard, the total, the skipped
inputs by reason and the label names (docs/data_formats.md).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from itertools import islice

from PIL import Image

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import ShardsConfig
from bld_t2i.data import sources
from bld_t2i.data.images import decode_image, fit, to_rgb
from bld_t2i.data.shards import TarShardWriter, join
from bld_t2i.data.stream import SkipSample
from bld_t2i.progress import progress
from bld_t2i.utils import make_grid, save_png

MANIFEST = "manifest.json"


def items(cfg: ShardsConfig):
    if cfg.source in ("folder", "csv") and not cfg.input:
        raise ValueError(f"shards.source {cfg.source} needs shards.input (--input)")
    if cfg.source == "folder":
        return sources.folder(cfg.input)
    if cfg.source == "csv":
        return sources.table(cfg.input, cfg.image_col, cfg.caption_col)
    if cfg.source == "emoji":
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


def encode(item: sources.Item, cfg: ShardsConfig) -> tuple[bytes, str]:
    """The image file to store: the source's bytes, or resized and re-encoded."""
    if isinstance(item.image, bytes):
        if cfg.size == 0:
            return item.image, "jpg" if item.ext == "jpeg" else item.ext
        image = decode_image(item.image, cfg.size, cfg.resize, cfg.min_size)
    else:
        image = to_rgb(item.image)
        if cfg.size:
            image = fit(image, cfg.size, cfg.resize)
    buf = io.BytesIO()
    if cfg.format == "jpg":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG", compress_level=6)
    return buf.getvalue(), cfg.format


def contact_sheet(images: list[bytes], path: str) -> None:
    thumbs = [Image.open(io.BytesIO(b)).convert("RGB").resize((64, 64)) for b in images]
    save_png(make_grid(thumbs, columns=16, pad=0), path)


def write_shard(writer: TarShardWriter, batch: list, cfg: ShardsConfig, key: int, skipped: Counter,
                labels: dict, sheet: list) -> int:
    """The samples of one shard; returns the next key."""
    for item in batch:
        try:
            data, ext = encode(item, cfg)
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
    return key


def make_shards(cfg: ShardsConfig) -> dict:
    """Write the shards and the manifest of `cfg.source` to `cfg.out`; returns the manifest.
    Progress in images (a bar on a terminal) and one line per shard written."""
    skipped: Counter = Counter()
    shards, labels, sheet = [], {}, []
    stream = kept(items(cfg), skipped, re.compile(cfg.skip_caption) if cfg.skip_caption else None)
    if cfg.limit:
        stream = islice(stream, cfg.limit)
    key, done = 0, False
    bar = progress(total=cfg.limit or None, desc="shards", unit="img")
    while not done:
        name = f"{cfg.prefix}-{len(shards):06d}.tar"
        batch = list(islice(stream, cfg.shard_size))
        done = len(batch) < cfg.shard_size
        if not batch:
            break
        with TarShardWriter(join(cfg.out, name)) as writer:
            key = write_shard(writer, batch, cfg, key, skipped, labels, sheet)
        shards.append({"name": name, "count": writer.count})
        bar.update(len(batch))
        bar.write(f"{join(cfg.out, name)}: {writer.count} samples")
    bar.close()
    manifest = {"format": "bld-image-shards", "version": 1, "source": cfg.source, "size": cfg.size,
                "resize": cfg.resize, "total": sum(s["count"] for s in shards), "shards": shards,
                "skipped": dict(skipped), "labels": {str(k): labels[k] for k in sorted(labels)}}
    atomic_write_bytes(join(cfg.out, MANIFEST), json.dumps(manifest, indent=1).encode())
    if cfg.contact_sheet and sheet:
        contact_sheet(sheet, cfg.contact_sheet)
    return manifest
