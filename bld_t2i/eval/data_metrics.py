"""What the evaluation measures against its training data (the latent data set of
`--neighbours`), in one pass over the latent shards and nothing decoded:

- the Hamming nearest neighbours of every sample (bld_t2i/eval/neighbours.py);
- caption recall@1 and @10 of the samples of seen prompts (recall.py);
- the samples' per-channel bit rates against the data's (bitstats.py);

and, with `--neighbours-clip`, the search in CLIP image space, whose training features
(every training latent decoded and embedded) are computed once and kept in the cache,
keyed by the latent manifest, the autoencoder's weights (all of them: its decoder draws the
images) and the CLIP weights. Only the neighbours found are decoded, to PNGs for the report,
each once (a PNG on disk is reused).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.data.latents import packed_size, read_manifest, unpack_bits
from bld_t2i.data.shards import join
from bld_t2i.eval.bitstats import ChannelCounter, bit_stats, channel_rates
from bld_t2i.eval.cache import Reuse, file_digest, lookup
from bld_t2i.eval.generate import EvalOptions
from bld_t2i.eval.neighbours import (
    LatentShard,
    Neighbour,
    clip_neighbours,
    nearest_neighbours,
    read_latent_shard,
    unpack_neighbour,
)
from bld_t2i.eval.recall import TrainingConditions, recall_at
from bld_t2i.eval.sheets import PromptRow
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.progress import progress
from bld_t2i.utils import png_bytes, to_pil


@dataclass
class DataPass:
    """The one pass over the latent shards: neighbours of every sample and the data's summary."""

    found: list[list[Neighbour]]  # per sample, ordered setting, prompt, image; nearest first
    conditions: TrainingConditions
    channels: ChannelCounter
    seconds: float


def search_data(latents: np.ndarray, folder: str, k: int) -> DataPass:
    """latents (Q, h, w, C) 0/1."""
    conditions, channels = TrainingConditions(), ChannelCounter(latents.shape[1:])

    def on_shard(name: str, shard: LatentShard) -> None:
        conditions.add(name, shard)
        channels.add(shard.packed)

    start = time.perf_counter()
    found = nearest_neighbours(latents, folder, k, on_shard)
    return DataPass(found, conditions, channels, time.perf_counter() - start)


def per_setting_metrics(data: DataPass, latents: np.ndarray, rows: list[PromptRow], opts: EvalOptions,
                        conditioning: str, skipped: dict) -> dict[str, dict]:
    """{setting: {"recall_at_1", "recall_at_10", "seen_prompts", "bit_rate_diff_mean", ...}}."""
    n = opts.images_per_prompt * len(rows)
    by = "caption" if conditioning in TEXT_MODES else "label" if conditioning == "class" else None
    targets = [data.conditions.target(row.prompt, by) for row in rows] if by else [None] * len(rows)
    seen = sum(t is not None for t in targets)
    if by is None:
        skipped["caption_recall"] = "the model is unconditional"
    elif not seen:
        skipped["caption_recall"] = f"no prompt of the sheet is a training {by}"
    elif opts.neighbours_k < 10:
        skipped["recall_at_10"] = f"--neighbours-k {opts.neighbours_k} < 10"
    sample_targets = [t for t in targets for _ in range(opts.images_per_prompt)]
    data_rates = data.channels.rates
    out = {}
    for k, setting in enumerate(opts.settings):
        entry = {"seen_prompts": seen} if by else {}
        if seen:
            entry.update(recall_at(data.found[k * n : (k + 1) * n], sample_targets, by))
        entry.update(bit_stats(channel_rates(latents[k * n : (k + 1) * n]), data_rates))
        out[setting.name] = entry
    return out


def clip_search(pipe: BLDPipeline, opts: EvalOptions, features: torch.Tensor, scorer) -> tuple[list, Reuse]:
    """The CLIP-space neighbours of `features` (Q, E), from the cached training features."""
    shape, folder = pipe.latent_shape, opts.neighbours
    manifest = read_manifest(folder)
    clip_weights = opts.clip_model[len("local-dir:"):] if opts.clip_model.startswith("local-dir:") else \
        opts.clip_checkpoint
    description = {"kind": "clip-neighbour-features", "latent_manifest": manifest,
                   "autoencoder": pipe.autoencoder.weights_sha256, "clip_model": opts.clip_model,
                   "clip_weights_sha256": file_digest(clip_weights), "dtype": str(pipe.dtype)}

    def compute() -> tuple[dict[str, np.ndarray], int]:
        names, chunks, offsets = [], [], [0]
        with progress(total=sum(e.get("count", 0) for e in manifest["shards"]) or None, desc="CLIP training features",
                      unit="latent") as bar:
            for entry in manifest["shards"]:
                shard = read_latent_shard(join(folder, entry["name"]), packed_size(shape))
                for lo in range(0, len(shard.keys), 64):
                    bits = torch.from_numpy(unpack_bits(shard.packed[lo : lo + 64], shape).reshape(-1, *shape)).bool()
                    chunks.append(scorer.image_features(to_pil(pipe.decode(bits))).float().cpu().numpy())
                    bar.update(len(bits))
                names.append(entry["name"])
                offsets.append(offsets[-1] + len(shard.keys))
        return {"features": np.concatenate(chunks), "names": np.array(names), "offsets": np.array(offsets)}, offsets[-1]

    arrays, reuse = lookup("CLIP features of the training latents", Path(opts.cache_dir) / "clip_neighbours",
                           description, opts.cache, compute, "latents")
    at = {str(name): i for i, name in enumerate(arrays["names"])}
    offsets = arrays["offsets"]

    def embed(packed: np.ndarray, name: str) -> torch.Tensor:
        i = at[name]
        if offsets[i + 1] - offsets[i] != len(packed):
            raise ValueError(f"cached CLIP features of {name} do not match its {len(packed)} latents")
        return torch.from_numpy(arrays["features"][offsets[i] : offsets[i + 1]])

    return clip_neighbours(features, folder, shape, opts.neighbours_k, embed), reuse


def decode_neighbours(pipe: BLDPipeline, out: Path, found: list[list[Neighbour]]) -> tuple[int, int]:
    """Decode each distinct neighbour latent once to neighbours/{shard}/{key}.png; returns
    (decoded now, already on disk)."""
    shape = pipe.latent_shape
    todo, distinct = {}, set()
    for ns in found:
        for n in ns:
            path = out / n.thumbnail
            distinct.add(path)
            if not path.is_file():
                todo[path] = n
    paths = list(todo)
    for lo in range(0, len(paths), 32):
        chunk = paths[lo : lo + 32]
        bits = torch.from_numpy(np.stack([unpack_neighbour(todo[p], shape) for p in chunk])).bool()
        for p, img in zip(chunk, to_pil(pipe.decode(bits))):
            atomic_write_bytes(p, png_bytes(img))
    return len(paths), len(distinct) - len(paths)


def neighbour_records(found: list[list[Neighbour]], rows: list[PromptRow], opts: EvalOptions) -> dict:
    """{setting: {prompt id: [[neighbour record, ...] per image]}} of one search."""
    N, per_setting = opts.images_per_prompt, opts.images_per_prompt * len(rows)
    return {s.name: {row.id: [[
        {"key": n.key, "caption": n.caption, "label": n.label, "shard": n.shard, "distance": n.distance,
         "image": n.thumbnail} for n in found[k * per_setting + r * N + i]]
        for i in range(N)] for r, row in enumerate(rows)} for k, s in enumerate(opts.settings)}


def measure_against_data(pipe: BLDPipeline, out: Path, rows: list[PromptRow], opts: EvalOptions, latents: np.ndarray,
                         features: torch.Tensor | None, scorer, skipped: dict, reuse: dict) -> tuple[dict, dict]:
    """({"hamming" [, "clip"]: neighbour records}, {setting: recall and per-bit statistics});
    `latents` (and `features`) are ordered setting, prompt, image. Adds to `skipped` and to
    `reuse` (what this run reused and what it computed)."""
    if not opts.neighbours:
        for key in ("caption_recall", "bit_stats"):
            skipped[key] = "no --neighbours latent data set given"
        return {}, {}
    data = search_data(latents, opts.neighbours, opts.neighbours_k)
    per_setting = per_setting_metrics(data, latents, rows, opts, pipe.conditioning, skipped)
    searches = {"hamming": data.found}
    if features is not None:
        searches["clip"], clip_reuse = clip_search(pipe, opts, features, scorer)
        reuse["clip_neighbour_features"] = clip_reuse.to_dict()
    decoded = [decode_neighbours(pipe, out, found) for found in searches.values()]
    new, kept = sum(d[0] for d in decoded), sum(d[1] for d in decoded)
    reuse["neighbours"] = {
        "latents_searched": data.channels.latents, "search_s": data.seconds, "training_latents_decoded": 0,
        "thumbnails_decoded": new, "thumbnails_reused": kept,
        "text": f"neighbours: Hamming search of the packed bits of {data.channels.latents} training latents read from "
                f"the latent shards, nothing decoded ({data.seconds:.1f} s); neighbour thumbnails: {new} decoded, "
                f"{kept} reused from {out / 'neighbours'}"}
    return {kind: neighbour_records(found, rows, opts) for kind, found in searches.items()}, per_setting
