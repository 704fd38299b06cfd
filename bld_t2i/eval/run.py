"""Prompt-sheet evaluation: generate every (setting, prompt, image), then measure and report.

Layout of the output folder:

    images/{setting}/{prompt id}/{i:03d}.png   the samples, and {i:03d}.bits their packed latents
    grids/{setting}/{prompt id}.png             one grid per prompt and setting
    neighbours/{shard}/{key}.png                decoded nearest training latents (with --neighbours)
    timing/rank{r}.json                         generation and decode seconds per setting, per rank
    metrics.json, metrics.csv, prompts.csv, neighbours.json, index.html
    inpaint/images/..., inpaint/grids/...       with an inpainting image and mask: the same layout,
    inpaint/{input,reconstruction,mask}.png     plus the image and mask as the model sees them

Inpainting (`EvalOptions.inpaint_image` and `inpaint_mask`, white in the mask = regenerate)
draws every (setting, prompt, image) a second time from the same seed with the image's bits
kept outside the mask, and measures the fraction of those known bits the samples kept.

Generation (settings, seeds, batches, rank split, resuming) is bld_t2i/eval/generate.py;
this module measures and reports.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bld_t2i import distributed as D
from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.data.latents import unpack_bits
from bld_t2i.eval import metrics as M
from bld_t2i.eval.generate import (
    EvalOptions,
    Setting,
    condition_args,
    generate,
    grid_path,
    image_path,
    read_inpainting,
    write_if_changed,
)
from bld_t2i.eval.neighbours import Neighbour, clip_neighbours, nearest_neighbours, unpack_neighbour
from bld_t2i.eval.report import log_wandb, render_report
from bld_t2i.eval.sheets import PromptRow
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.utils import make_grid, png_bytes, to_pil

# ----------------------------------------------------------------------------- measuring


def load_latents(out: Path, setting: Setting, row: PromptRow, n: int, shape) -> np.ndarray:
    """(n, h, w, C) uint8 0/1 latents of a prompt's images."""
    nbytes = (int(np.prod(shape)) + 7) // 8
    packed = []
    for i in range(n):
        data = image_path(out, setting, row, i, "bits").read_bytes()
        if len(data) != nbytes:
            raise ValueError(f"{image_path(out, setting, row, i, 'bits')}: {len(data)} bytes, expected {nbytes}")
        packed.append(np.frombuffer(data, np.uint8))
    return unpack_bits(np.stack(packed), shape).reshape(n, *shape)


def _timing(out: Path, settings: list[Setting]) -> tuple[dict, dict]:
    """Seconds per sample per setting and per step count, summed over the ranks' files."""
    per_setting: dict[str, dict] = {}
    for path in sorted((out / "timing").glob("rank*.json")):
        for name, s in json.loads(path.read_text()).items():
            t = per_setting.setdefault(name, {"steps": s["steps"], "gen_s": 0.0, "decode_s": 0.0, "n": 0})
            for k in ("gen_s", "decode_s", "n"):
                t[k] += s[k]
    per_steps: dict[str, dict] = {}
    for setting in settings:
        s = per_setting.get(setting.name)
        if s is None or s["n"] == 0:
            continue
        t = per_steps.setdefault(str(setting.steps), {"gen_s": 0.0, "decode_s": 0.0, "n": 0})
        for k in ("gen_s", "decode_s", "n"):
            t[k] += s[k]
    return ({k: _rates(v) for k, v in per_setting.items() if v["n"]}, {k: _rates(v) for k, v in per_steps.items()})


def _rates(s: dict) -> dict:
    return {"generation_s_per_sample": s["gen_s"] / s["n"], "decode_s_per_sample": s["decode_s"] / s["n"],
            "samples_timed": s["n"]}


def _decoded_neighbours(pipe: BLDPipeline, out: Path, found: list[list[Neighbour]]) -> None:
    """Decode each distinct neighbour latent once to neighbours/{shard}/{key}.png."""
    shape = pipe.latent_shape
    todo = {}
    for ns in found:
        for n in ns:
            path = out / "neighbours" / Path(n.shard).stem / f"{n.key}.png"
            if not path.is_file():
                todo[path] = n
    paths = list(todo)
    for lo in range(0, len(paths), 32):
        chunk = paths[lo : lo + 32]
        bits = torch.from_numpy(np.stack([unpack_neighbour(todo[p], shape) for p in chunk])).bool()
        for p, img in zip(chunk, to_pil(pipe.decode(bits))):
            atomic_write_bytes(p, png_bytes(img))


def find_neighbours(pipe: BLDPipeline, out: Path, rows: list[PromptRow], opts: EvalOptions, latents: np.ndarray,
                    features: torch.Tensor | None, scorer) -> dict:
    """{"hamming" [, "clip"]: {setting: {prompt id: [[neighbour, ...] per image]}}}, with the
    neighbours decoded to PNGs. `latents` (and `features`) are ordered setting, prompt, image."""
    shape = pipe.latent_shape
    searches = {"hamming": nearest_neighbours(latents, opts.neighbours, opts.neighbours_k)}
    if features is not None:
        def embed(packed: np.ndarray) -> torch.Tensor:
            bits = torch.from_numpy(unpack_bits(packed, shape).reshape(-1, *shape)).bool()
            return scorer.image_features(to_pil(pipe.decode(bits)))

        searches["clip"] = clip_neighbours(features, opts.neighbours, shape, opts.neighbours_k, embed)
    N, per_setting = opts.images_per_prompt, opts.images_per_prompt * len(rows)
    result = {}
    for kind, found in searches.items():
        _decoded_neighbours(pipe, out, found)
        result[kind] = {s.name: {row.id: [[
            {"key": n.key, "caption": n.caption, "shard": n.shard, "distance": n.distance,
             "image": f"neighbours/{Path(n.shard).stem}/{n.key}.png"} for n in found[k * per_setting + r * N + i]]
            for i in range(N)] for r, row in enumerate(rows)} for k, s in enumerate(opts.settings)}
    return result


def _images_and_grid(folder: Path, setting: Setting, row: PromptRow, n: int) -> list[Image.Image]:
    """A row's n images under `folder`; its grid is (re)written when older than any of them."""
    pngs = [image_path(folder, setting, row, i) for i in range(n)]
    images = [Image.open(p).convert("RGB") for p in pngs]
    grid = grid_path(folder, setting, row)
    if not grid.is_file() or grid.stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in pngs):
        atomic_write_bytes(grid, png_bytes(make_grid(images, columns=n)))
    return images


def measure_inpainting(pipe: BLDPipeline, rows: list[PromptRow], out: Path, opts: EvalOptions,
                       inpainting: tuple[Image.Image, Image.Image]) -> dict:
    """Grids of the inpaintings, the inputs as PNGs, and per setting the fraction of the
    image's known bits (outside the mask, on the latent grid) that the samples kept."""
    image, mask = inpainting
    folder = out / "inpaint"
    h, w, C = pipe.latent_shape
    known, keep = pipe.inpainting_inputs(image, mask)  # (1, h*w, C), (h*w, 1) 1 = kept cell
    known = known.reshape(h, w, C).cpu().numpy().astype(np.uint8)
    kept = keep.reshape(h, w).cpu().numpy().astype(bool)  # (h, w)
    reconstruction = to_pil(pipe.decode(torch.from_numpy(known[None]).bool()))[0]
    for name, img in (("input", image), ("reconstruction", reconstruction), ("mask", mask)):
        write_if_changed(folder / f"{name}.png", png_bytes(img))
    N = opts.images_per_prompt
    per_setting = {}
    for setting in opts.settings:
        agree = []
        for row in rows:
            _images_and_grid(folder, setting, row, N)
            lat = load_latents(folder, setting, row, N, (h, w, C))  # (N, h, w, C)
            agree.append(lat[:, kept] == known[kept])
        per_setting[setting.name] = {"known_bits_kept": float(np.concatenate(agree).mean())}
    return {"image": opts.inpaint_image, "mask": opts.inpaint_mask, "kept_cells": int(kept.sum()),
            "cells": h * w, "settings": per_setting}


def measure(pipe: BLDPipeline, rows: list[PromptRow], out: Path, opts: EvalOptions,
            inpainting: tuple[Image.Image, Image.Image] | None = None) -> dict:
    """Grids, metrics, neighbours and the report (rank 0, after every rank has generated)."""
    N = opts.images_per_prompt
    shape = pipe.latent_shape
    text_model = pipe.conditioning in TEXT_MODES
    skipped: dict[str, str] = {}
    scorer = M.clip_scorer(opts.clip_model, opts.clip_checkpoint, pipe.device) if text_model else \
        M.Skipped("the model is not text-conditioned")
    if isinstance(scorer, M.Skipped):
        skipped["clip_score"] = scorer.reason
    fidkid = M.fid_kid(opts.inception, opts.reference, pipe.autoencoder.resolution, opts.reference_limit, pipe.device,
                       opts.fid_features)
    if isinstance(fidkid, M.Skipped):
        skipped["fid"] = skipped["kid"] = fidkid.reason
    if N < 2:
        skipped["diversity"] = "needs at least 2 images per prompt"
    clip_search = opts.neighbours and opts.neighbours_clip
    if clip_search and isinstance(scorer, M.Skipped):
        skipped["neighbours_clip"] = f"no CLIP model: {scorer.reason}"
        clip_search = False

    per_prompt = {row.id: {"id": row.id, "prompt": row.prompt, "category": row.category, "line": row.line,
                           "diversity": {}, "clip_score": {}} for row in rows}
    setting_rows, query_latents, query_features = [], [], []
    timing_setting, timing_steps = _timing(out, opts.settings)
    for setting in opts.settings:
        images_u8, clip_scores = [], []
        for row in rows:
            pil = _images_and_grid(out, setting, row, N)
            lat = load_latents(out, setting, row, N, shape)
            query_latents.append(lat)
            if N >= 2:
                per_prompt[row.id]["diversity"][setting.name] = M.diversity(lat)
            if not isinstance(scorer, M.Skipped):
                features = scorer.image_features(pil)  # (N, E)
                s = scorer.score(features, [row.prompt] * N)
                clip_scores.append(s)
                query_features.append(features)
                per_prompt[row.id]["clip_score"][setting.name] = float(s.mean())
            if not isinstance(fidkid, M.Skipped):
                images_u8.append(torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2))
        entry = {"setting": setting.name, **asdict(setting), "images": N * len(rows)}
        if N >= 2:
            entry["diversity"] = float(np.mean([per_prompt[r.id]["diversity"][setting.name] for r in rows]))
        if clip_scores:
            entry["clip_score"] = float(torch.cat(clip_scores).mean())
        if images_u8:
            entry.update(fidkid(torch.cat(images_u8)))
        entry.update(timing_setting.get(setting.name, {}))
        setting_rows.append(entry)

    neighbours_out = {}
    if opts.neighbours:
        neighbours_out = find_neighbours(pipe, out, rows, opts, np.concatenate(query_latents),
                                         torch.cat(query_features) if clip_search else None, scorer)
    report = {
        "model": opts.model, "sheet": opts.prompts, "images_per_prompt": N, "seed": opts.seed,
        "latent_bits": int(np.prod(shape)), "conditioning": pipe.conditioning,
        "settings": setting_rows, "timing_by_steps": timing_steps, "skipped": skipped,
        "prompts": list(per_prompt.values()),
    }
    if inpainting is not None:
        report["inpainting"] = measure_inpainting(pipe, rows, out, opts, inpainting)
    write_if_changed(out / "metrics.json", json.dumps(report, indent=1).encode())
    write_if_changed(out / "metrics.csv", _csv(setting_rows))
    write_if_changed(out / "prompts.csv", _csv([
        {"id": p["id"], "category": p["category"], "prompt": p["prompt"], "setting": s.name,
         "diversity": p["diversity"].get(s.name, ""), "clip_score": p["clip_score"].get(s.name, "")}
        for p in per_prompt.values() for s in opts.settings]))
    if opts.neighbours:
        write_if_changed(out / "neighbours.json", json.dumps(neighbours_out, indent=1).encode())
    write_if_changed(out / "index.html", render_report(report, rows, opts.settings, N, neighbours_out).encode())
    if opts.wandb:
        log_wandb(out, report, [grid_path(out, s, r) for s in opts.settings for r in rows], opts.log, pipe.cfg.run.name)
    return report


def _csv(records: list[dict]) -> bytes:
    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue().encode()


def evaluate(pipe: BLDPipeline, rows: list[PromptRow], out: str | Path, opts: EvalOptions) -> dict | None:
    """Generate on every rank, then measure on rank 0. Returns the metrics on rank 0."""
    out = Path(out)
    if pipe.conditioning == "class":
        condition_args(pipe, rows)  # fail before generating anything
    inpainting = read_inpainting(opts, pipe)
    generate(pipe, rows, out, opts, inpainting)
    D.barrier()
    report = measure(pipe, rows, out, opts, inpainting) if D.dist_info().is_main else None
    D.barrier()
    return report
