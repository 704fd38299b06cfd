"""Nearest training samples of generated latents, by Hamming distance on the packed bits
(the poster's memorisation check).

The latent data set (bld_t2i/data/latents.py) stores each sample as `np.packbits` of its
(h, w, C) bits. The search reads one shard at a time and compares every query with the
whole shard at once: XOR of the packed bytes, then a 256-entry popcount table, summed
over the bytes; the running top-k is merged shard by shard, so memory stays at one shard.
Nothing is decoded: the search reads the latent shards' packed bits. The same pass hands
each shard to `on_shard`, which the evaluation uses for the data's per-bit statistics and
its set of captions and labels.

An optional second search compares CLIP image features of the samples with those of the
decoded training latents, given per shard by `embed(packed, shard name)` (the evaluation
decodes them once and keeps the features in its cache, bld_t2i/eval/cache.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bld_t2i.config import StreamConfig
from bld_t2i.data.latents import pack_bits, packed_size, read_manifest, unpack_bits
from bld_t2i.data.shards import ShardError, iter_samples, join, open_shard
from bld_t2i.progress import progress

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)  # bits set in each byte value


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def file_name(text: str) -> str:
    """A file name for a sample key or a shard name read from the data: the text itself when it
    is a plain name, else its safe characters and 8 hex digits of its hash (distinct keys stay
    distinct). A key like '../../x' or '/etc/x' never names a file outside the folder."""
    if _SAFE_NAME.fullmatch(text) and text not in (".", ".."):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{_UNSAFE_CHARS.sub('_', text).strip('._')[:80]}-{digest}"


@dataclass
class Neighbour:
    key: str
    caption: str
    label: int  # the sample's class label (its .json "label"), -1 without one
    shard: str
    distance: int | float  # differing bits (Hamming), or 1 - cosine similarity (CLIP)

    @property
    def thumbnail(self) -> str:
        """Its decoded image's path in the evaluation folder (names from the data made safe)."""
        return f"neighbours/{file_name(Path(self.shard).stem)}/{file_name(self.key)}.png"
    packed: bytes  # its packed latent, to decode for the report


CHUNK_BYTES = 2**26  # bound on one XOR block, Q x N x nbytes


def hamming(queries: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """(Q, nbytes) x (N, nbytes) packed uint8 -> (Q, N) differing-bit counts.

    Vectorised over the whole shard; the (Q, N, nbytes) XOR is cut into blocks of the
    shard's rows so a large query set does not need Q x N x nbytes bytes at once.
    """
    Q, nbytes = queries.shape
    rows = max(1, CHUNK_BYTES // max(1, Q * nbytes))
    out = np.empty((Q, len(packed)), np.int64)
    for lo in range(0, len(packed), rows):
        xor = np.bitwise_xor(queries[:, None, :], packed[None, lo : lo + rows, :])  # (Q, n, nbytes)
        out[:, lo : lo + rows] = POPCOUNT[xor].sum(axis=2, dtype=np.int64)
    return out


@dataclass
class LatentShard:
    packed: np.ndarray  # (N, nbytes) uint8
    keys: list[str]
    captions: list[str]
    labels: list[int]  # -1 where a sample has no label


def _label(meta: bytes | None) -> int:
    try:
        label = json.loads(meta).get("label") if meta else None
    except (ValueError, AttributeError):
        return -1
    return label if isinstance(label, int) and not isinstance(label, bool) else -1


def read_latent_shard(url: str, nbytes: int) -> LatentShard:
    """One latent shard's packed bits, keys, captions and labels."""
    packed, keys, captions, labels = [], [], [], []
    with open_shard(url) as f:
        try:
            for raw in iter_samples(f, url, max_member_bytes=StreamConfig.max_member_bytes):
                bits = raw.members.get("bits")
                if bits is None or len(bits) != nbytes:
                    raise ValueError(f"{url}: sample '{raw.key}' has no .bits member of {nbytes} bytes")
                packed.append(np.frombuffer(bits, np.uint8))
                keys.append(raw.key)
                captions.append(raw.members.get("txt", b"").decode("utf-8", "replace"))
                labels.append(_label(raw.members.get("json")))
        except ShardError as e:
            raise ValueError(f"latent shard {url} is damaged: {e}") from e
    return LatentShard(np.stack(packed) if packed else np.zeros((0, nbytes), np.uint8), keys, captions, labels)


Distances = Callable[[np.ndarray, str], np.ndarray]  # (packed (N, nbytes), shard name) -> (Q, N)
OnShard = Callable[[str, LatentShard], None]


def _search(folder: str, shape: tuple, Q: int, k: int, distances: Distances, on_shard: OnShard | None = None,
            desc: str = "neighbours") -> list[list[Neighbour]]:
    """The running top-k over the data set's shards, smaller distance is nearer; ties keep
    the data set's order. `on_shard(name, shard)` sees every shard once."""
    manifest = read_manifest(folder)
    if tuple(manifest["latent_shape"]) != tuple(shape):
        raise ValueError(f"latents of shape {tuple(shape)} cannot be searched in {folder}, "
                         f"whose latents are (h, w, C) = {tuple(manifest['latent_shape'])}")
    nbytes = packed_size(shape)
    best_d = np.zeros((Q, 0))
    best: list[list[Neighbour]] = [[] for _ in range(Q)]
    for entry in progress(manifest["shards"], desc=desc, unit="shard"):
        shard = read_latent_shard(join(folder, entry["name"]), nbytes)
        if on_shard is not None:
            on_shard(entry["name"], shard)
        if not len(shard.keys):
            continue
        cand_d = np.concatenate([best_d, distances(shard.packed, entry["name"])], axis=1)  # (Q, kept + N)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        m = best_d.shape[1]  # columns < m are the neighbours kept so far
        best = [[best[q][j] if j < m else
                 Neighbour(shard.keys[j - m], shard.captions[j - m], shard.labels[j - m], entry["name"],
                           cand_d[q, j].item(), shard.packed[j - m].tobytes())
                 for j in order[q]] for q in range(Q)]
        best_d = np.take_along_axis(cand_d, order, axis=1)
    return best


def nearest_neighbours(latents: np.ndarray, folder: str, k: int = 10,
                       on_shard: OnShard | None = None) -> list[list[Neighbour]]:
    """For each latent (Q, h, w, C) 0/1, its k nearest training samples by Hamming distance
    in the latent data set `folder` (manifest + shards), nearest first."""
    queries = pack_bits(latents)  # (Q, nbytes)
    found = _search(folder, latents.shape[1:], len(queries), k, lambda packed, _: hamming(queries, packed), on_shard)
    for ns in found:
        for n in ns:
            n.distance = int(n.distance)
    return found


def clip_neighbours(features: torch.Tensor, folder: str, shape: tuple, k: int,
                    embed: Callable[[np.ndarray, str], torch.Tensor]) -> list[list[Neighbour]]:
    """The optional search in CLIP image space: `features` (Q, E) normalised image features
    of the samples, `embed(packed (N, nbytes), shard name) -> (N, E)` normalised features of
    a shard's decoded training latents; distance = 1 - cosine similarity."""
    q = features.float().cpu()

    def distances(packed: np.ndarray, name: str) -> np.ndarray:
        return (1 - q @ embed(packed, name).float().cpu().T).numpy()

    found = _search(folder, shape, len(q), k, distances, desc="CLIP neighbours")
    for ns in found:
        for n in ns:
            n.distance = round(n.distance, 4)
    return found


def unpack_neighbour(n: Neighbour, shape: tuple[int, int, int]) -> np.ndarray:
    """A neighbour's latent as (h, w, C) uint8 0/1."""
    return unpack_bits(np.frombuffer(n.packed, np.uint8)[None], shape).reshape(shape)
