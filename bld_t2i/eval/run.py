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

A setting is (steps S, guidance w, temperature tau), named `s{S}_w{w}_t{tau}`. Image i of a
prompt is drawn with `derive_seed(seed, prompt id, i)` (the row's own seed if it has one),
the same in every setting, so settings compare the same noise and any image can be
regenerated alone. Prompts are split across ranks (torchrun / srun); an image whose PNG
exists is not generated again, and every file is written atomically and only when its
content changes, so a rerun of a finished evaluation writes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bld_t2i import distributed as D
from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.data.latents import pack_bits, unpack_bits
from bld_t2i.eval import metrics as M
from bld_t2i.eval.neighbours import Neighbour, clip_neighbours, nearest_neighbours, unpack_neighbour
from bld_t2i.eval.report import log_wandb, render_report
from bld_t2i.eval.sheets import PromptRow, SheetError, derive_seed
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.data.images import fit, to_rgb
from bld_t2i.pipeline import BLDPipeline, make_grid, mask_to_grid, to_pil


@dataclass(frozen=True)
class Setting:
    steps: int
    guidance: float
    temperature: float

    @property
    def name(self) -> str:
        return f"s{self.steps}_w{self.guidance:g}_t{self.temperature:g}"


def settings_grid(steps: list[int], guidance: list[float], temperature: list[float]) -> list[Setting]:
    return [Setting(s, w, t) for s, w, t in product(steps, guidance, temperature)]


@dataclass
class EvalOptions:
    settings: list[Setting]
    images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 16
    clip_model: str = ""  # OpenCLIP architecture or local-dir:FOLDER; empty: CLIP score skipped
    clip_checkpoint: str = ""
    inception: str = ""  # torch-fidelity InceptionV3 weights file; empty: FID/KID skipped
    reference: str = ""  # image shards for FID/KID
    reference_limit: int = 10_000
    fid_features: int = 2048  # Inception layer: 2048 is the standard FID
    neighbours: str = ""  # latent data set folder; empty: no nearest-neighbour search
    neighbours_k: int = 10
    neighbours_clip: bool = False  # also search in CLIP image space (decodes the whole data set)
    wandb: bool = False
    inpaint_image: str = ""  # image file to inpaint (with inpaint_mask); empty: no inpainting
    inpaint_mask: str = ""  # mask file, white = regenerate
    sheet: str = ""  # recorded in metrics.json
    model: str = ""


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write, skipped when the file already holds exactly `data`."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def image_path(out: Path, setting: Setting, row: PromptRow, i: int, ext: str = "png") -> Path:
    return out / "images" / setting.name / row.id / f"{i:03d}.{ext}"


def grid_path(out: Path, setting: Setting, row: PromptRow) -> Path:
    return out / "grids" / setting.name / f"{row.id}.png"


def _condition(pipe: BLDPipeline, row: PromptRow, n: int) -> dict:
    """The pipeline's condition arguments for n images of a row."""
    if pipe.conditioning in TEXT_MODES:
        return {"prompts": [row.prompt] * n}
    if pipe.conditioning == "class":
        try:
            return {"class_labels": [int(row.prompt)] * n}
        except ValueError:
            raise SheetError(f"line {row.line}: a class-conditional model takes an integer class label as the "
                             f"prompt, got {row.prompt!r}") from None
    return {"n": n}  # unconditional: the row only names a group of samples


class InpaintError(ValueError):
    """An inpainting image or mask that cannot be used; the message names the file."""


def read_inpainting(opts: EvalOptions, pipe: BLDPipeline) -> tuple[Image.Image, Image.Image] | None:
    """The inpainting image and mask fitted to the model's resolution (as the pipeline fits
    them, for the report's PNGs), or None without inpainting; the mask is checked by the
    pipeline's own `mask_to_grid` here, before anything is drawn."""
    if not (opts.inpaint_image or opts.inpaint_mask):
        return None
    if not (opts.inpaint_image and opts.inpaint_mask):
        raise InpaintError("inpainting needs both an image and a mask")
    size = pipe.autoencoder.resolution
    fitted = []
    for path in (opts.inpaint_image, opts.inpaint_mask):
        try:
            with Image.open(path) as img:
                fitted.append(fit(to_rgb(img), size, "center_crop"))
        except (OSError, ValueError) as e:
            raise InpaintError(f"{path}: cannot read the image ({e})") from None
    image, mask = fitted
    try:
        mask_to_grid(mask, size, pipe.latent_shape[:2])
    except ValueError as e:
        raise InpaintError(f"{opts.inpaint_mask}: {e}") from None
    return image, mask


def _draw(pipe: BLDPipeline, row: PromptRow, setting: Setting, idx: list[int], folder: Path, opts: EvalOptions,
          **inpainting) -> tuple[float, float]:
    """Sample and write images idx of a row under `folder`; returns (generation, decode) seconds."""
    base = opts.seed if row.seed is None else row.seed
    t0 = time.perf_counter()
    latents = pipe.sample_latents(**_condition(pipe, row, len(idx)), steps=setting.steps,
                                  temperature=setting.temperature, guidance=setting.guidance,
                                  seed=[derive_seed(base, row.id, i) for i in idx], **inpainting)
    t1 = time.perf_counter()
    images = to_pil(pipe.decode(latents, opts.batch_size))
    t2 = time.perf_counter()
    packed = pack_bits(latents.numpy())
    for j, i in enumerate(idx):  # bits first: a PNG on disk means the image is complete
        atomic_write_bytes(image_path(folder, setting, row, i, "bits"), packed[j].tobytes())
        atomic_write_bytes(image_path(folder, setting, row, i), _png_bytes(images[j]))
    return t1 - t0, t2 - t1


def _todo(folder: Path, setting: Setting, row: PromptRow, opts: EvalOptions) -> list[list[int]]:
    """The row's missing images under `folder`, in batches."""
    todo = [i for i in range(opts.images_per_prompt) if not image_path(folder, setting, row, i).is_file()]
    return [todo[lo : lo + opts.batch_size] for lo in range(0, len(todo), opts.batch_size)]


# ----------------------------------------------------------------------------- generation


def generate(pipe: BLDPipeline, rows: list[PromptRow], out: Path, opts: EvalOptions,
             inpainting: tuple[Image.Image, Image.Image] | None = None) -> dict:
    """This rank's share of the images (and of the inpaintings, untimed); returns
    {setting: {"gen_s", "decode_s", "n"}} spent now."""
    info = D.dist_info()
    spent: dict[str, dict] = {}
    warm = False
    for setting in opts.settings:
        for row in rows[info.rank :: info.world_size]:
            batches = _todo(out, setting, row, opts)
            if batches and not warm:  # one untimed 1-step sample: first-call costs stay out of the timing
                pipe.decode(pipe.sample_latents(**_condition(pipe, row, 1), steps=1, seed=0))
                warm = True
            for idx in batches:
                gen_s, decode_s = _draw(pipe, row, setting, idx, out, opts)
                s = spent.setdefault(setting.name, {"steps": setting.steps, "gen_s": 0.0, "decode_s": 0.0, "n": 0})
                s["gen_s"] += gen_s
                s["decode_s"] += decode_s
                s["n"] += len(idx)
            if inpainting is not None:
                for idx in _todo(out / "inpaint", setting, row, opts):
                    _draw(pipe, row, setting, idx, out / "inpaint", opts, init_image=inpainting[0],
                          mask=inpainting[1])
        D.print0(f"[evaluate] {setting.name}: rank 0 done")
    if spent:  # add to this rank's earlier runs (a resumed evaluation times only new images)
        path = out / "timing" / f"rank{info.rank}.json"
        total = json.loads(path.read_text()) if path.is_file() else {}
        for name, s in spent.items():
            t = total.setdefault(name, {"steps": s["steps"], "gen_s": 0.0, "decode_s": 0.0, "n": 0})
            for k in ("gen_s", "decode_s", "n"):
                t[k] += s[k]
        atomic_write_bytes(path, json.dumps(total, indent=1, sort_keys=True).encode())
    return spent


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
            atomic_write_bytes(p, _png_bytes(img))


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
        atomic_write_bytes(grid, _png_bytes(make_grid(images, columns=n)))
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
        write_if_changed(folder / f"{name}.png", _png_bytes(img))
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
        "model": opts.model, "sheet": opts.sheet, "images_per_prompt": N, "seed": opts.seed,
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
        log_wandb(out, report, [grid_path(out, s, r) for s in opts.settings for r in rows])
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
        for row in rows:  # fail before generating anything
            _condition(pipe, row, 1)
    inpainting = read_inpainting(opts, pipe)
    generate(pipe, rows, out, opts, inpainting)
    D.barrier()
    report = measure(pipe, rows, out, opts, inpainting) if D.dist_info().is_main else None
    D.barrier()
    return report
