"""Bit-packed latent shards (format version 3; versions 1-2 read too) and the latent loader.

A latent data set is a folder (local or ``s3://``) with ``manifest.json`` and tar shards
``latents-000000.tar, ...``; see docs/data_formats.md. Per sample:

- ``{key}.bits``: ``np.packbits`` of the (h, w, C) bits flattened in C order, most
  significant bit first (numpy's default big-endian bit order), ``ceil(h*w*C / 8)`` bytes;
- ``{key}.grid``: its latent grid, JSON ``[h, w]`` (version 2; aspect-ratio buckets give
  each sample the grid of its bucket). A version 1 sample has none: its grid is the
  manifest's ``latent_shape[:2]``;
- ``{key}.txt`` caption, ``{key}.json`` metadata (the image shard's, with ``label``);
- optionally ``{key}.emb.npy``: (N, D) float16 text-encoder tokens trimmed to the
  caption's real length.

The null caption's embedding is stored once per data set (``null_emb.npy``). Batches hold
samples of one grid (the stream's buckets, data/stream.py): ``packed`` uint8 (B, nbytes),
the bits still packed (8x fewer bytes to copy to the device; `unpack_bits_tensor` unpacks
them there), ``grid`` (h, w) ints, ``caption``, ``key``, ``label``, ``json`` as for images;
with embeddings ``emb`` float16 (B, N, D) zero-padded and ``emb_mask`` bool (B, N)
(models.text_encoders.condition_from_embeddings turns them into a condition), N the batch's
longest caption, or `text_length` where one is given (a compiled step sees one shape); with
a `tokenize` (a text encoder's), the captions' ``text_ids`` and ``text_mask``, tokenized in
the loader's workers.
Tensors are pinned with `pin_memory`, so the trainer copies them with non_blocking.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import NamedTuple

import numpy as np
import torch

from bld_t2i.config import LatentsConfig
from bld_t2i.data.shards import RawSample, expand_urls, join, read_bytes
from bld_t2i.data.stream import Decoder, ShardDataset, ShardLoader, SkipSample, json_member, label_of, rank_and_world

FORMAT = "bld-latents"
# 2: per-sample grids ({key}.grid) and the manifest's buckets and grid counts; 3: the
# manifest's autoencoder_fingerprint is the encoder's (BinaryAutoencoder.fingerprint), no
# longer the sha256 of all the weights
VERSION = 3
READ_VERSIONS = (1, 2, 3)
BIT_ORDER = "np.packbits over the (h, w, C) bits flattened in C order, most significant bit first"
MANIFEST = "manifest.json"
NULL_EMBEDDING = "null_emb.npy"
PARTS = "_parts"  # one small JSON per finished shard, merged into the manifest at the end


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(B, h, w, C) bool -> (B, ceil(h*w*C/8)) uint8, the documented bit order."""
    return np.packbits(bits.reshape(bits.shape[0], -1).astype(bool), axis=1)


def unpack_bits(packed: np.ndarray, latent_shape: tuple[int, int, int]) -> np.ndarray:
    """(B, nbytes) uint8 -> (B, h*w, C) uint8 0/1: one vectorised call for the batch."""
    h, w, c = latent_shape
    return np.unpackbits(packed, axis=1, count=h * w * c).reshape(packed.shape[0], h * w, c)


def unpack_bits_tensor(packed: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """`unpack_bits` on packed's device: (B, nbytes) uint8 -> (B, h*w, C) uint8 0/1."""
    h, w, c = latent_shape
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)  # most significant bit first
    bits = (packed[:, :, None] >> shifts) & 1  # (B, nbytes, 8)
    return bits.reshape(packed.shape[0], -1)[:, : h * w * c].reshape(packed.shape[0], h * w, c)


def packed_size(latent_shape) -> int:
    h, w, c = latent_shape
    return (h * w * c + 7) // 8


def read_manifest(folder: str) -> dict:
    url = join(folder, MANIFEST)
    try:
        manifest = json.loads(read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"latent manifest not found: {url} (encode_latents.py writes it when every shard is done)"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("version") not in READ_VERSIONS:
        raise ValueError(f"{url}: not a {FORMAT} manifest of version {' or '.join(map(str, READ_VERSIONS))} "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def encoded_by(manifest: dict, fingerprint: str, legacy_fingerprints: tuple[str, ...] = ()) -> bool:
    """Whether a manifest's latents come from the encoder of `fingerprint`. Version 3 names
    the encoder's fingerprint; versions 1-2 the sha256 of the weights they were encoded with,
    which `legacy_fingerprints` lists for the same encoder (BinaryAutoencoder.legacy_fingerprints)."""
    if manifest["version"] >= 3:
        return manifest["autoencoder_fingerprint"] == fingerprint
    return manifest["autoencoder_fingerprint"] in legacy_fingerprints


def check_manifests(spec: str, fingerprint: str, latent_shape, legacy_fingerprints: tuple[str, ...] = ()
                    ) -> list[dict]:
    """Read the manifest of every folder the shard URLs live in and refuse a data set
    encoded by another encoder (`encoded_by`); returns the manifests."""
    folders = sorted({posixpath.dirname(u) for u in expand_urls(spec)})
    manifests = [read_manifest(f) for f in folders]
    for folder, m in zip(folders, manifests):
        if not encoded_by(m, fingerprint, legacy_fingerprints):
            raise ValueError(
                f"latents in {folder} (manifest version {m['version']}) were encoded by autoencoder "
                f"{m['autoencoder_fingerprint']}, but the recipe's autoencoder is {fingerprint}"
                + (f" (weights {legacy_fingerprints[0]})" if legacy_fingerprints else "")
            )
        if tuple(m["latent_shape"]) != tuple(latent_shape):
            raise ValueError(
                f"latents in {folder} have shape (h, w, C) = {tuple(m['latent_shape'])}, "
                f"but the recipe's autoencoder gives {tuple(latent_shape)}"
            )
        if m["bit_order"] != BIT_ORDER:
            raise ValueError(f"latents in {folder} use bit order {m['bit_order']!r}, expected {BIT_ORDER!r}")
    return manifests


def manifest_grids(manifests: list[dict], latent_shape) -> set[tuple[int, int]]:
    """The latent grids (h, w) the data sets hold: their manifests' grid counts ("hxw"), the
    latent shape's grid for a version 1 manifest (which has none)."""
    grids = {tuple(latent_shape[:2])}
    for m in manifests:
        grids.update(tuple(int(n) for n in g.split("x")) for g in m.get("grids", {}))
    return grids


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def grid_member(data: bytes | None, default: tuple[int, int], grids: set[tuple[int, int]]) -> tuple[int, int]:
    """A sample's `{key}.grid` JSON [h, w] -> (h, w), one of the data set's `grids`; `default`
    (the manifest's) when absent."""
    if data is None:
        return default
    try:
        grid = json.loads(data)
    except (ValueError, RecursionError):
        raise SkipSample("corrupt_grid") from None
    if not (isinstance(grid, list) and len(grid) == 2 and all(type(n) is int for n in grid)):
        raise SkipSample("corrupt_grid")
    if tuple(grid) not in grids:  # a grid the manifest does not list: damage, and a batch of its own
        raise SkipSample("unknown_grid")
    return grid[0], grid[1]


def embedding_member(data: bytes | None, width: int) -> np.ndarray:
    """A sample's `{key}.emb.npy`: (N, width) float16, 1 <= N; SkipSample otherwise (the batch
    pads N, so a wrong width or rank would fail the whole batch, not one sample)."""
    if data is None:
        raise SkipSample("missing_embedding")
    try:
        emb = load_npy(data)
    except (ValueError, EOFError, OSError, OverflowError, MemoryError):
        raise SkipSample("corrupt_embedding") from None
    if emb.dtype != np.float16 or emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] != width:
        raise SkipSample("corrupt_embedding")
    return emb


class LatentItem(NamedTuple):
    bits: bytes  # packed, packed_size((*grid, C)) bytes
    caption: str
    key: str
    label: int
    meta: dict
    grid: tuple[int, int]
    emb: np.ndarray | None  # (N, D) float16 with embeddings


class LatentDecoder(Decoder):
    """Latent samples of the data set's grids of C bits; the stream batches them by grid
    (`bucket`). `emb_width` is D of the stored text embeddings (None: not read); `text_length` pads
    them to that many tokens (0: to the batch's longest); `tokenize` (a text encoder's Tokenizer)
    adds the captions' ids."""

    def __init__(self, latent_shape, grids: set[tuple[int, int]], emb_width: int | None, text_length: int = 0,
                 tokenize=None):
        self.latent_shape = tuple(latent_shape)
        self.grids = grids
        self.emb_width = emb_width
        self.text_length = text_length  # 0: pad text to the batch's longest caption
        self.tokenize = tokenize  # models.text_encoders.Tokenizer, or None

    def sample(self, raw: RawSample) -> LatentItem:
        m = raw.members
        grid = grid_member(m.get("grid"), self.latent_shape[:2], self.grids)
        bits = m.get("bits")
        if bits is None or len(bits) != packed_size((*grid, self.latent_shape[2])):
            raise SkipSample("corrupt_bits")
        caption = m.get("txt", b"").decode("utf-8", "replace")
        meta = json_member(m.get("json"))
        emb = None if self.emb_width is None else embedding_member(m.get("emb.npy"), self.emb_width)
        return LatentItem(bits, caption, raw.key, label_of(meta), meta, grid, emb)

    def bucket(self, item: LatentItem) -> tuple[int, int]:
        return item.grid

    def collate(self, items: list[LatentItem]) -> dict:
        columns = LatentItem(*zip(*items))
        grid = columns.grid[0]  # one grid per batch (the stream's buckets)
        # The batch crosses the worker -> trainer process boundary as numpy arrays, pickled by
        # value: packed bits are 8x fewer bytes than unpacked, and a 0.5 MiB copy is cheaper
        # than a shared-memory segment per tensor. `finish` makes tensors; the bits stay packed
        # until they are on the trainer's device (`unpack_bits_tensor`).
        packed = np.frombuffer(bytearray().join(columns.bits), np.uint8).reshape(len(items), -1)
        batch = {"packed": packed, "grid": grid, "caption": list(columns.caption), "key": list(columns.key),
                 "label": np.array(columns.label, np.int64), "json": list(columns.meta)}
        if self.emb_width is not None:
            embs = columns.emb
            n = max(e.shape[0] for e in embs)
            if self.text_length:
                if n > self.text_length:
                    key = columns.key[[e.shape[0] for e in embs].index(n)]
                    raise ValueError(f"sample {key} has {n} text tokens, more than text_encoder.max_length "
                                     f"{self.text_length} that a compiled step pads to: set it to the encoder's")
                n = self.text_length
            emb = np.zeros((len(embs), n, embs[0].shape[1]), np.float16)
            mask = np.zeros((len(embs), n), bool)
            for i, e in enumerate(embs):
                emb[i, : e.shape[0]], mask[i, : e.shape[0]] = e, True
            batch.update(emb=emb, emb_mask=mask)
        if self.tokenize is not None:
            tokens = self.tokenize(batch["caption"])
            batch.update(text_ids=tokens["ids"], text_mask=tokens["mask"])
        return batch

    def finish(self, batch: dict) -> dict:
        for name in ("packed", "label", "emb", "emb_mask", "text_ids", "text_mask"):
            if name in batch:
                batch[name] = torch.from_numpy(batch[name])
        return batch


def null_embedding(folder: str) -> torch.Tensor:
    """The data set's null-caption (empty string) embedding, (N, D) float16."""
    return torch.from_numpy(load_npy(read_bytes(join(folder, NULL_EMBEDDING))))


def latent_loader(cfg: LatentsConfig, seed: int, fingerprint: str, latent_shape, rank: int | None = None,
                  world_size: int | None = None, finite: bool = False,
                  legacy_fingerprints: tuple[str, ...] = (), text_length: int = 0, pin_memory: bool = False,
                  tokenize=None) -> ShardLoader:
    """The resumable latent loader of this rank. `fingerprint`, `legacy_fingerprints` and
    `latent_shape` are the recipe's autoencoder's; shards encoded by another are refused.
    `text_length`: pad the embeddings to it (0: to each batch's longest); `pin_memory`: batches
    in page-locked memory; `tokenize`: a text encoder's, run on each batch's captions in the workers."""
    rank, world_size = rank_and_world(rank, world_size)
    if not cfg.shards:
        raise ValueError("latents.shards is empty: set it to the latent shards' URL(s)")
    manifests = check_manifests(cfg.shards, fingerprint, latent_shape, legacy_fingerprints)
    emb_width = None
    if cfg.use_embeddings:  # D of the data set's embeddings: its null embedding's
        emb_width = int(null_embedding(posixpath.dirname(expand_urls(cfg.shards)[0])).shape[1])
    decoder = LatentDecoder(latent_shape, manifest_grids(manifests, latent_shape), emb_width, text_length, tokenize)
    dataset = ShardDataset(cfg.shards, decoder, cfg, seed, rank, world_size, finite)
    return ShardLoader(dataset, cfg.num_workers, pin_memory)
