"""Nearest training samples of generated latents, by Hamming distance on the packed bits
(the poster's memorisation check).

The latent data set (bld_t2i/data/latents.py) stores each sample as `np.packbits` of its
(h, w, C) bits. The search reads one shard at a time and compares every query with the
whole shard at once: XOR of the packed bytes, then a 256-entry popcount table, summed
over the bytes; the running top-k is merged shard by shard, so memory stays at one shard.
An optional second search compares CLIP image features of the samples with those of the
decoded training latents (slow: it decodes the whole data set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bld_t2i.data.latents import pack_bits, packed_size, read_manifest, unpack_bits
from bld_t2i.data.shards import ShardError, iter_samples, join, open_shard

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)  # bits set in each byte value


@dataclass
class Neighbour:
    key: str
    caption: str
    shard: str
    distance: int | float  # differing bits (Hamming), or 1 - cosine similarity (CLIP)
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


def read_latent_shard(url: str, nbytes: int) -> tuple[np.ndarray, list[str], list[str]]:
    """One latent shard's packed bits (N, nbytes) uint8, keys and captions."""
    packed, keys, captions = [], [], []
    with open_shard(url) as f:
        try:
            for raw in iter_samples(f, url):
                bits = raw.members.get("bits")
                if bits is None or len(bits) != nbytes:
                    raise ValueError(f"{url}: sample '{raw.key}' has no .bits member of {nbytes} bytes")
                packed.append(np.frombuffer(bits, np.uint8))
                keys.append(raw.key)
                captions.append(raw.members.get("txt", b"").decode("utf-8", "replace"))
        except ShardError as e:
            raise ValueError(f"latent shard {url} is damaged: {e}") from e
    return (np.stack(packed) if packed else np.zeros((0, nbytes), np.uint8)), keys, captions


def _search(folder: str, shape: tuple, Q: int, k: int, distances) -> list[list[Neighbour]]:
    """The running top-k over the data set's shards: `distances(packed (N, nbytes)) -> (Q, N)`,
    smaller is nearer; ties keep the data set's order."""
    manifest = read_manifest(folder)
    if tuple(manifest["latent_shape"]) != tuple(shape):
        raise ValueError(f"latents of shape {tuple(shape)} cannot be searched in {folder}, "
                         f"whose latents are (h, w, C) = {tuple(manifest['latent_shape'])}")
    nbytes = packed_size(shape)
    best_d = np.zeros((Q, 0))
    best: list[list[Neighbour]] = [[] for _ in range(Q)]
    for entry in manifest["shards"]:
        packed, keys, captions = read_latent_shard(join(folder, entry["name"]), nbytes)
        if not len(keys):
            continue
        cand_d = np.concatenate([best_d, distances(packed)], axis=1)  # (Q, kept + N)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        m = best_d.shape[1]  # columns < m are the neighbours kept so far
        best = [[best[q][j] if j < m else
                 Neighbour(keys[j - m], captions[j - m], entry["name"], cand_d[q, j].item(), packed[j - m].tobytes())
                 for j in order[q]] for q in range(Q)]
        best_d = np.take_along_axis(cand_d, order, axis=1)
    return best


def nearest_neighbours(latents: np.ndarray, folder: str, k: int = 10) -> list[list[Neighbour]]:
    """For each latent (Q, h, w, C) 0/1, its k nearest training samples by Hamming distance
    in the latent data set `folder` (manifest + shards), nearest first."""
    queries = pack_bits(latents)  # (Q, nbytes)
    found = _search(folder, latents.shape[1:], len(queries), k, lambda packed: hamming(queries, packed))
    for ns in found:
        for n in ns:
            n.distance = int(n.distance)
    return found


def clip_neighbours(features: torch.Tensor, folder: str, shape: tuple, k: int, embed) -> list[list[Neighbour]]:
    """The optional search in CLIP image space: `features` (Q, E) normalised image features
    of the samples, `embed(packed (n, nbytes)) -> (n, E)` normalised features of decoded
    training latents; distance = 1 - cosine similarity."""
    q = features.float().cpu()

    def distances(packed: np.ndarray) -> np.ndarray:
        f = torch.cat([embed(packed[i : i + 64]) for i in range(0, len(packed), 64)]).float().cpu()  # (N, E)
        return (1 - q @ f.T).numpy()

    found = _search(folder, shape, len(q), k, distances)
    for ns in found:
        for n in ns:
            n.distance = round(n.distance, 4)
    return found


def unpack_neighbour(n: Neighbour, shape: tuple[int, int, int]) -> np.ndarray:
    """A neighbour's latent as (h, w, C) uint8 0/1."""
    return unpack_bits(np.frombuffer(n.packed, np.uint8)[None], shape).reshape(shape)
