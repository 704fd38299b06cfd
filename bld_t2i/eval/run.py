"""Prompt-sheet evaluation: generate every (setting, prompt, image), then measure and report.

Layout of the output folder:

    images/{setting}/{prompt id}/{i:03d}.png   the samples, and {i:03d}.bits their packed latents
    grids/{setting}/{prompt id}.png             one grid per prompt and setting
    neighbours/{shard}/{key}.png                decoded nearest training latents (with --neighbours; safe names)
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bld_t2i import distributed as D
from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.data.latents import unpack_bits
from bld_t2i.eval import metrics as M
from bld_t2i.eval.cache import default_cache_dir
from bld_t2i.eval.classifier import Classifier
from bld_t2i.eval.data_metrics import measure_against_data
from bld_t2i.eval.fid import FidKid, fid_kid
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
from bld_t2i.eval.report import log_wandb, render_report
from bld_t2i.eval.sheets import PromptRow
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.progress import progress
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


@dataclass
class Tools:
    """The metrics that need weights, each loaded once, or the reason it is skipped."""

    scorer: M.ClipScorer | M.Skipped
    fidkid: FidKid | M.Skipped
    classifier: Classifier | M.Skipped


def metric_tools(pipe: BLDPipeline, opts: EvalOptions) -> tuple[Tools, dict[str, str]]:
    skipped: dict[str, str] = {}
    scorer = M.clip_scorer(opts.clip_model, opts.clip_checkpoint, pipe.device) if pipe.conditioning in TEXT_MODES \
        else M.Skipped("the model is not text-conditioned")
    if isinstance(scorer, M.Skipped):
        skipped["clip_score"] = scorer.reason
    fidkid = fid_kid(opts.inception, opts.reference, pipe.autoencoder.resolution, opts.reference_limit, pipe.device,
                     opts.fid_features, opts.cache_dir, opts.cache)
    if isinstance(fidkid, M.Skipped):
        skipped["fid"] = skipped["kid"] = fidkid.reason
    if pipe.conditioning != "class":
        classifier = M.Skipped("the model is not class-conditional")
    elif not opts.classifier:
        classifier = M.Skipped("no --classifier given")
    else:
        try:
            classifier = Classifier.load(opts.classifier, pipe.device)
        except FileNotFoundError as e:
            classifier = M.Skipped(str(e))
    if isinstance(classifier, M.Skipped):
        skipped["class_accuracy"] = classifier.reason
    if opts.images_per_prompt < 2:
        skipped["diversity"] = "needs at least 2 images per prompt"
    return Tools(scorer, fidkid, classifier), skipped


def measure_setting(out: Path, setting: Setting, rows: list[PromptRow], opts: EvalOptions, tools: Tools,
                    per_prompt: dict, shape) -> tuple[dict, np.ndarray, list[torch.Tensor]]:
    """One setting's row of the metrics table, its latents (n, h, w, C) ordered prompt, image,
    and the CLIP image features of its samples (empty without CLIP)."""
    N = opts.images_per_prompt
    latents, features, clip_scores, images_u8, hits = [], [], [], [], []
    for row in rows:
        pil = _images_and_grid(out, setting, row, N)
        lat = load_latents(out, setting, row, N, shape)
        latents.append(lat)
        p = per_prompt[row.id]
        if N >= 2:
            p["diversity"][setting.name] = M.diversity(lat)
        if not isinstance(tools.scorer, M.Skipped):
            f = tools.scorer.image_features(pil)  # (N, E)
            s = tools.scorer.score(f, [row.prompt] * N)
            clip_scores.append(s)
            features.append(f)
            p["clip_score"][setting.name] = float(s.mean())
        u8 = torch.from_numpy(np.stack([np.asarray(img) for img in pil])).permute(0, 3, 1, 2)  # (N, 3, H, W)
        if not isinstance(tools.fidkid, M.Skipped):
            images_u8.append(u8)
        if not isinstance(tools.classifier, M.Skipped):
            hit = tools.classifier.predict(u8) == int(row.prompt)  # the prompt of a class model is its label
            hits.append(hit)
            p["class_accuracy"][setting.name] = float(hit.mean())
    entry = {"setting": setting.name, **asdict(setting), "images": N * len(rows)}
    if N >= 2:
        entry["diversity"] = float(np.mean([per_prompt[r.id]["diversity"][setting.name] for r in rows]))
    if clip_scores:
        entry["clip_score"] = float(torch.cat(clip_scores).mean())
    if images_u8:
        entry.update(tools.fidkid(torch.cat(images_u8)))
    if hits:
        entry["class_accuracy"] = float(np.concatenate(hits).mean())
    return entry, np.concatenate(latents), features


def measure(pipe: BLDPipeline, rows: list[PromptRow], out: Path, opts: EvalOptions,
            inpainting: tuple[Image.Image, Image.Image] | None = None) -> dict:
    """Grids, metrics, neighbours and the report (rank 0, after every rank has generated)."""
    opts = replace(opts, cache_dir=str(opts.cache_dir or default_cache_dir()))
    N, shape = opts.images_per_prompt, pipe.latent_shape
    tools, skipped = metric_tools(pipe, opts)
    clip_search = opts.neighbours and opts.neighbours_clip
    if clip_search and isinstance(tools.scorer, M.Skipped):
        skipped["neighbours_clip"] = f"no CLIP model: {tools.scorer.reason}"
        clip_search = False
    per_prompt = {row.id: {"id": row.id, "prompt": row.prompt, "category": row.category, "line": row.line,
                           "diversity": {}, "clip_score": {}, "class_accuracy": {}} for row in rows}
    setting_rows, query_latents, query_features = [], [], []
    timing_setting, timing_steps = _timing(out, opts.settings)
    for setting in progress(opts.settings, desc="measure", unit="setting"):
        entry, latents, features = measure_setting(out, setting, rows, opts, tools, per_prompt, shape)
        entry.update(timing_setting.get(setting.name, {}))
        setting_rows.append(entry)
        query_latents.append(latents)
        query_features += features
    reuse = {} if isinstance(tools.fidkid, M.Skipped) else {"reference_statistics": tools.fidkid.reuse.to_dict()}
    neighbours_out, data_metrics = measure_against_data(pipe, out, rows, opts, np.concatenate(query_latents),
                                                        torch.cat(query_features) if clip_search else None,
                                                        tools.scorer, skipped, reuse)
    for entry in setting_rows:
        entry.update(data_metrics.get(entry["setting"], {}))
    report = {
        "model": opts.model, "sheet": opts.prompts, "images_per_prompt": N, "seed": opts.seed,
        "latent_bits": int(np.prod(shape)), "conditioning": pipe.conditioning,
        "settings": setting_rows, "timing_by_steps": timing_steps, "skipped": skipped, "reuse": reuse,
        "prompts": list(per_prompt.values()),
    }
    if not isinstance(tools.classifier, M.Skipped):
        report["classifier"] = {"path": opts.classifier, **tools.classifier.heldout}
    if inpainting is not None:
        report["inpainting"] = measure_inpainting(pipe, rows, out, opts, inpainting)
    _write_outputs(out, report, rows, opts, neighbours_out)
    if opts.wandb:
        log_wandb(out, report, [grid_path(out, s, r) for s in opts.settings for r in rows], opts.log, pipe.cfg.run.name)
    return report


PROMPT_METRICS = ("diversity", "clip_score", "class_accuracy")


def _write_outputs(out: Path, report: dict, rows: list[PromptRow], opts: EvalOptions, neighbours: dict) -> None:
    write_if_changed(out / "metrics.json", json.dumps(report, indent=1).encode())
    write_if_changed(out / "metrics.csv", _csv(report["settings"]))
    write_if_changed(out / "prompts.csv", _csv([
        {"id": p["id"], "category": p["category"], "prompt": p["prompt"], "setting": s.name,
         **{k: p[k].get(s.name, "") for k in PROMPT_METRICS}} for p in report["prompts"] for s in opts.settings]))
    if opts.neighbours:
        write_if_changed(out / "neighbours.json", json.dumps(neighbours, indent=1).encode())
    write_if_changed(out / "index.html", render_report(report, rows, opts.settings, opts.images_per_prompt,
                                                       neighbours).encode())


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
    report = None

    def measure_on_main() -> None:  # cold caches (reference features, CLIP neighbours) can take hours
        nonlocal report
        report = measure(pipe, rows, out, opts, inpainting)

    D.main_work(measure_on_main, "measuring the samples")
    return report
