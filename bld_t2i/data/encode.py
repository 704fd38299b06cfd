"""Offline encoding of image shards to bit-packed latent shards (data_tools/encode_latents.py).

One latent shard per input shard: input ``i`` of the expanded URL list becomes
``latents-{i:06d}.tar``. Rank ``r`` of ``n`` encodes the inputs with ``i % n == r``. A
shard is written to a temp name and published atomically, then its manifest entry
``_parts/latents-{i:06d}.json``; an entry marks the shard done, so a rerun after a kill
at any moment skips finished shards and redoes the rest - every sample exactly once.
Whichever rank finds every entry present merges them into ``manifest.json`` (the same
content from any rank, published atomically), so concurrent ranks never write one file.

Aspect-ratio buckets (``encode.buckets``, "HxW" pixels): each image goes to the bucket
nearest its aspect ratio (data/images.py), is fitted to it, and is encoded at that size by
the fully convolutional autoencoder, in batches of one bucket; each latent sample records
its grid (``{key}.grid``), the manifest the buckets and the samples per grid.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter

import numpy as np
import torch

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import StreamConfig
from bld_t2i.data.images import ImageDecoder, images_to_tensor
from bld_t2i.data.latents import BIT_ORDER, FORMAT, MANIFEST, NULL_EMBEDDING, PARTS, VERSION, pack_bits, read_manifest
from bld_t2i.data.shards import (
    ShardError,
    TarShardWriter,
    exists,
    expand_urls,
    iter_samples,
    join,
    open_shard,
    read_bytes,
    remove_stale_temps,
)
from bld_t2i.data.stream import SkipSample
from bld_t2i.progress import progress

log = logging.getLogger("bld_t2i.data")


def shard_name(i: int) -> str:
    return f"latents-{i:06d}.tar"


def part_url(out: str, i: int) -> str:
    return join(join(out, PARTS), shard_name(i).replace(".tar", ".json"))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class Encoder:
    """The frozen autoencoder (and optional text encoder) applied to batches of samples."""

    def __init__(self, ae, device: torch.device, text_encoder=None):
        self.ae = ae.to(device).eval()
        self.device = device
        self.text_encoder = text_encoder

    def bits(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W, 3) uint8 images of one size -> (B, nbytes) packed codes and their grid (h, w)."""
        with torch.no_grad():  # the float32 code, whatever the device (BinaryAutoencoder.encode)
            codes = self.ae.encode(images_to_tensor(arrays).to(self.device))  # (B, h, w, C) bool
        return pack_bits(codes.cpu().numpy()), (codes.shape[1], codes.shape[2])

    def embeddings(self, captions: list[str]) -> list[np.ndarray]:
        """Per caption (N_i, D) float16, trimmed to its real tokens."""
        out = self.text_encoder.encode(captions)
        tokens, mask = out["tokens"].float().cpu(), out["mask"].cpu()  # (B, N, D), (B, N)
        return [t[m].numpy().astype(np.float16) for t, m in zip(tokens, mask)]


def _write_batch(writer: TarShardWriter, encoder: Encoder, items: list, grids: Counter) -> None:
    """Encode and write a batch of images of one size; counts its samples into `grids` ("hxw")."""
    arrays, captions, keys, labels, metas = zip(*items)
    packed, (h, w) = encoder.bits(list(arrays))
    embs = encoder.embeddings(list(captions)) if encoder.text_encoder else None
    grid = json.dumps([h, w]).encode()
    for j, key in enumerate(keys):
        sample = {"__key__": key, "bits": packed[j].tobytes(), "grid": grid, "txt": captions[j].encode(),
                  "json": json.dumps(metas[j]).encode()}
        if embs is not None:
            sample["emb.npy"] = npy_bytes(embs[j])
        writer.write(sample)
    grids[f"{h}x{w}"] += len(keys)


def encode_shard(url: str, out_url: str, encoder: Encoder, decoder: ImageDecoder, batch_size: int) -> dict:
    """Encode one image shard into one latent shard; returns its count, samples per grid and
    skips by reason. Images wait by size (their bucket) until `batch_size` of one size are in."""
    skipped, grids = Counter(), Counter()
    with TarShardWriter(out_url) as writer, open_shard(url) as f:
        waiting: dict[tuple, list] = {}  # (H, W) -> decoded samples of that size
        seen = 0
        try:
            for seen, raw in enumerate(iter_samples(f, url, max_member_bytes=StreamConfig.max_member_bytes), 1):  # noqa: B007 (seen: read after the loop)
                try:
                    if raw.damage is not None:
                        raise SkipSample(raw.damage)
                    item = decoder.sample(raw)
                except SkipSample as e:
                    skipped[e.reason] += 1
                    continue
                items = waiting.setdefault(item[0].shape[:2], [])
                items.append(item)
                if len(items) == batch_size:
                    _write_batch(writer, encoder, waiting.pop(item[0].shape[:2]), grids)
        except ShardError as e:  # keep the samples before the break
            skipped[e.reason] += 1
            log.warning("skipping the rest of a shard (%s): %s", e.reason, e)
        if not seen and not skipped:
            skipped["empty_shard"] += 1
        for items in waiting.values():
            _write_batch(writer, encoder, items, grids)
    return {"count": writer.count, "grids": dict(grids), "skipped": dict(skipped)}


def encode_shards(spec: str, out: str, encoder: Encoder, decoder: ImageDecoder, batch_size: int,
                  rank: int, world_size: int, text_encoder_config: dict | None) -> bool:
    """Encode this rank's unfinished shards; merge the manifest if all are done.

    Returns True when the manifest was written (every shard of every rank finished).
    """
    urls = expand_urls(spec)
    ae = encoder.ae
    header = {"format": FORMAT, "version": VERSION, "latent_shape": list(ae.latent_shape), "bit_order": BIT_ORDER,
              "autoencoder_fingerprint": ae.fingerprint, "resolution": decoder.image_size, "resize": decoder.resize,
              "buckets": [list(b) for b in decoder.buckets] if decoder.buckets else None,
              "source": spec, "text_encoder": text_encoder_config}
    if exists(join(out, MANIFEST)):
        _check_same(read_manifest(out), header, join(out, MANIFEST))
    if encoder.text_encoder is not None and rank == 0 and not exists(join(out, NULL_EMBEDDING)):
        atomic_write_bytes(join(out, NULL_EMBEDDING), npy_bytes(encoder.embeddings([""])[0]))
    todo = []
    for i in range(rank, len(urls), world_size):
        if exists(part_url(out, i)):
            _check_same(json.loads(read_bytes(part_url(out, i))), header, part_url(out, i))
            log.info("%s already encoded", shard_name(i))
        else:
            todo.append(i)
    start, images = time.monotonic(), 0
    # rank 0 of all ranks and array tasks shows shards done, images and images/s, and the ETA
    with progress(total=len(todo), desc="encode", unit="shard", mode=None if rank == 0 else "off") as bar:
        for i in todo:
            remove_stale_temps(join(out, shard_name(i)))  # only this rank writes shard i
            entry = encode_shard(urls[i], join(out, shard_name(i)), encoder, decoder, batch_size)
            entry = {"name": shard_name(i), "source_shard": urls[i], **entry,
                     "version": header["version"], "autoencoder_fingerprint": header["autoencoder_fingerprint"],
                     "buckets": header["buckets"]}
            atomic_write_bytes(part_url(out, i), json.dumps(entry).encode())
            log.info("%s: %d samples, skipped %s", shard_name(i), entry["count"], entry["skipped"])
            images += entry["count"]
            bar.update(1)
            bar.set_postfix(images=images, img_per_s=images / max(time.monotonic() - start, 1e-9))
    return merge_manifest(out, len(urls), header)


def _check_same(existing: dict, header: dict, where: str) -> None:
    # a fingerprint means the weights' sha256 before version 3 and the encoder's from it on
    # (data/latents.py): compared only within one version; parts before version 3 name none
    version = existing.get("version", 2)
    if (version, existing["autoencoder_fingerprint"]) != (header["version"], header["autoencoder_fingerprint"]):
        raise ValueError(f"{where} was encoded by autoencoder {existing['autoencoder_fingerprint']} (format version "
                         f"{version}), this run uses {header['autoencoder_fingerprint']} (version {header['version']}): "
                         "use another --out")
    if existing.get("buckets") != header["buckets"]:  # before version 2: no buckets
        raise ValueError(f"{where} was encoded with encode.buckets {existing.get('buckets')}, this run uses "
                         f"{header['buckets']}: use another --out")


def merge_manifest(out: str, num_shards: int, header: dict) -> bool:
    parts = [part_url(out, i) for i in range(num_shards)]
    if not all(exists(p) for p in parts):
        return False
    entries = [json.loads(read_bytes(p)) for p in parts]
    skipped, grids = Counter(), Counter()
    for e in entries:
        skipped.update(e["skipped"])
        grids.update(e.get("grids", {}))  # a part of version 1 has no grid counts
    shards = [{**{k: e[k] for k in ("name", "source_shard", "count", "skipped")}, "grids": e.get("grids", {})}
              for e in entries]
    manifest = {**header, "total": sum(e["count"] for e in entries), "grids": dict(sorted(grids.items())),
                "skipped": dict(skipped), "shards": shards,
                "null_embedding": NULL_EMBEDDING if header["text_encoder"] else None}
    atomic_write_bytes(join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return True
