"""Generation for the prompt-sheet evaluation: settings, the images' seeds and batches.

A setting is (steps S, guidance w, temperature tau[, guidance interval [lo, hi]]), named
`s{S}_w{w}_t{tau}` (plus `_g{lo}-{hi}` for an interval other than [0, 1]). Image i of a
prompt is drawn with `derive_seed(seed, prompt id, i)` (the row's own seed if it has one),
the same in every setting, so settings compare the same noise and any image can be
regenerated alone; the images of several prompts are drawn in one batch, each from its own
seed, which gives the same images as one by one. Prompts are split across ranks (torchrun / srun); an image whose PNG
exists is not generated again, and every file is written atomically and only when its
content changes, so a rerun of a finished evaluation writes nothing (but metrics.json and
index.html when they record what the run reused or timed: FID/KID reference statistics,
the neighbour search).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from PIL import Image

from bld_t2i import distributed as D
from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import EvaluateConfig, LogConfig
from bld_t2i.data.images import fit, to_rgb
from bld_t2i.data.latents import pack_bits
from bld_t2i.diffusion import check_guidance_interval
from bld_t2i.eval.sheets import PromptRow, SheetError, derive_seed
from bld_t2i.models.denoiser import TEXT_MODES
from bld_t2i.pipeline import BLDPipeline, default_batch_size, mask_to_grid
from bld_t2i.progress import progress
from bld_t2i.utils import png_bytes, to_pil

FULL_INTERVAL = (0.0, 1.0)


@dataclass(frozen=True)
class Setting:
    steps: int
    guidance: float
    temperature: float
    guidance_interval: tuple[float, float] = FULL_INTERVAL  # t/T where guidance applies

    @property
    def name(self) -> str:
        lo, hi = self.guidance_interval
        interval = "" if self.guidance_interval == FULL_INTERVAL else f"_g{lo:g}-{hi:g}"
        return f"s{self.steps}_w{self.guidance:g}_t{self.temperature:g}{interval}"


def settings_grid(steps: list[int], guidance: list[float], temperature: list[float],
                  intervals: list[tuple[float, float]] = (FULL_INTERVAL,)) -> list[Setting]:
    """Every combination; w = 0 has no interval (nothing to limit), so it appears once."""
    intervals = [check_guidance_interval(g) for g in intervals]
    grid = [Setting(s, w, t, g if w != 0 else FULL_INTERVAL)
            for s, w, t, g in product(steps, guidance, temperature, intervals)]
    return list(dict.fromkeys(grid))


@dataclass
class EvalOptions(EvaluateConfig):
    """The `evaluate` config section (its defaults are there, not here), with the settings
    grid it expands to and the `log` section for wandb."""

    settings: list[Setting] = field(default_factory=list)
    log: LogConfig = field(default_factory=LogConfig)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write, skipped when the file already holds exactly `data`."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def image_path(out: Path, setting: Setting, row: PromptRow, i: int, ext: str = "png") -> Path:
    return out / "images" / setting.name / row.id / f"{i:03d}.{ext}"


def grid_path(out: Path, setting: Setting, row: PromptRow) -> Path:
    return out / "grids" / setting.name / f"{row.id}.png"


def condition_args(pipe: BLDPipeline, rows: list[PromptRow]) -> dict:
    """The pipeline's condition arguments for one image of each row."""
    if pipe.conditioning in TEXT_MODES:
        return {"prompts": [row.prompt for row in rows]}
    if pipe.conditioning == "class":
        labels = []
        for row in rows:
            try:
                labels.append(int(row.prompt))
            except ValueError:
                raise SheetError(f"line {row.line}: a class-conditional model takes an integer class label as the "
                                 f"prompt, got {row.prompt!r}") from None
        return {"class_labels": labels}
    return {"n": len(rows)}  # unconditional: a row only names a group of samples


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


Item = tuple[PromptRow, int]  # image i of a row


def _draw(pipe: BLDPipeline, setting: Setting, items: list[Item], folder: Path, opts: EvalOptions,
          **inpainting) -> tuple[float, float]:
    """Sample and write the images `items` (of any rows) in one batch under `folder`; returns
    (generation, decode) seconds."""
    seeds = [derive_seed(opts.seed if row.seed is None else row.seed, row.id, i) for row, i in items]
    t0 = time.perf_counter()
    latents = pipe.sample_latents(**condition_args(pipe, [row for row, _ in items]), steps=setting.steps,
                                  temperature=setting.temperature, guidance=setting.guidance,
                                  guidance_interval=setting.guidance_interval, seed=seeds, batch_size=len(items),
                                  **inpainting)
    t1 = time.perf_counter()
    images = to_pil(pipe.decode(latents, len(items)))
    t2 = time.perf_counter()
    packed = pack_bits(latents.numpy())
    for j, (row, i) in enumerate(items):  # bits first: a PNG on disk means the image is complete
        atomic_write_bytes(image_path(folder, setting, row, i, "bits"), packed[j].tobytes())
        atomic_write_bytes(image_path(folder, setting, row, i), png_bytes(images[j]))
    return t1 - t0, t2 - t1


def _todo(pipe: BLDPipeline, folder: Path, setting: Setting, rows: list[PromptRow], opts: EvalOptions) -> list[list[Item]]:
    """The rows' missing images under `folder`, in batches across the rows."""
    todo = [(row, i) for row in rows for i in range(opts.images_per_prompt)
            if not image_path(folder, setting, row, i).is_file()]
    size = opts.batch_size or default_batch_size(pipe.device)
    return [todo[lo : lo + size] for lo in range(0, len(todo), size)]


# ----------------------------------------------------------------------------- generation


def generate(pipe: BLDPipeline, rows: list[PromptRow], out: Path, opts: EvalOptions,
             inpainting: tuple[Image.Image, Image.Image] | None = None) -> dict:
    """This rank's share of the images (and of the inpaintings, untimed); returns
    {setting: {"gen_s", "decode_s", "n"}} spent now."""
    info = D.dist_info()
    mine = rows[info.rank :: info.world_size]
    spent: dict[str, dict] = {}
    warm = False
    folders = [out] + ([out / "inpaint"] if inpainting is not None else [])
    todo = {(s.name, f): _todo(pipe, f, s, mine, opts) for s in opts.settings for f in folders}
    bar = progress(total=sum(len(i) for batches in todo.values() for i in batches), desc="generate", unit="img")
    for setting in opts.settings:
        for items in todo[setting.name, out]:
            if not warm:  # one untimed 1-step sample: first-call costs stay out of the timing
                pipe.decode(pipe.sample_latents(**condition_args(pipe, [items[0][0]]), steps=1, seed=0))
                warm = True
            gen_s, decode_s = _draw(pipe, setting, items, out, opts)
            s = spent.setdefault(setting.name, {"steps": setting.steps, "gen_s": 0.0, "decode_s": 0.0, "n": 0})
            s["gen_s"] += gen_s
            s["decode_s"] += decode_s
            s["n"] += len(items)
            bar.update(len(items))
        if inpainting is not None:
            for items in todo[setting.name, out / "inpaint"]:
                _draw(pipe, setting, items, out / "inpaint", opts, init_image=inpainting[0], mask=inpainting[1])
                bar.update(len(items))
        bar.set_postfix(setting=setting.name)
    bar.close()
    if spent:  # add to this rank's earlier runs (a resumed evaluation times only new images)
        path = out / "timing" / f"rank{info.rank}.json"
        total = json.loads(path.read_text()) if path.is_file() else {}
        for name, s in spent.items():
            t = total.setdefault(name, {"steps": s["steps"], "gen_s": 0.0, "decode_s": 0.0, "n": 0})
            for k in ("gen_s", "decode_s", "n"):
                t[k] += s[k]
        atomic_write_bytes(path, json.dumps(total, indent=1, sort_keys=True).encode())
    return spent
