"""Generate images from an exported model folder.

    python -m bld_t2i.cli.sample --model FOLDER --prompt "red apple" --out DIR [--steps 16]
        [--temperature 1.0] [--guidance 2.5] [--guidance-interval 0.2 0.8] [--seed 0] [--num-images 4]
        [--batch-size B] [--device cuda --dtype bf16 --compile]
    python -m bld_t2i.cli.sample --model FOLDER --class-label 3 --out DIR      (class-conditional)
    python -m bld_t2i.cli.sample --model FOLDER --out DIR --num-images 8       (unconditional)
    ... --init-image IMG --mask MASK [--inpaint clamp|renoise]                 (white = regenerate)

Every flag sets a field of the `sample` config section (`--recipe`, `sample.key=value` and
`--dry-run` work too); unset sampler settings come from the model's config.diffusion.
Image i is drawn with its own generator seeded with seed + i, in batches of --batch-size
(default 32 on a CPU, 64 on a GPU), so `--seed S+i --num-images 1` regenerates image i of a
run alone, bit for bit (these are `BLDPipeline.sample_latents`' w and seeds; in Python,
`pipe(...)` takes guidance_scale = 1 + w and torch generators). Writes `{i:04d}.png`,
`grid.png` and the resolved `sample.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from bld_t2i.checkpoint import atomic_write_text
from bld_t2i.config import Flag, entry_config, to_sections
from bld_t2i.distributed import pick_device
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.utils import DTYPES, make_grid, save_png, to_pil

FLAGS = [Flag("--model", "sample.model", "exported model folder"), Flag("--out", "sample.out", "output folder"),
         Flag("--prompt", "sample.prompt", "text prompt"), Flag("--class-label", "sample.class_label"),
         Flag("--num-images", "sample.num_images"), Flag("--steps", "sample.steps", "sampling steps S <= T"),
         Flag("--temperature", "sample.temperature", "tau"), Flag("--guidance", "sample.guidance", "w"),
         Flag("--guidance-interval", "sample.guidance_interval", "guidance only for t/T in [LO, HI]", nargs=2),
         Flag("--seed", "sample.seed"), Flag("--batch-size", "sample.batch_size"),
         Flag("--init-image", "sample.init_image", "image to inpaint"),
         Flag("--mask", "sample.mask", "inpainting mask: white = regenerate"), Flag("--inpaint", "sample.inpaint"),
         Flag("--device", "sample.device"), Flag("--dtype", "sample.dtype"),
         Flag("--compile", "sample.compile", "torch.compile the denoiser (CUDA graphs; batches padded to --batch-size)")]


def main(argv=None) -> None:
    cfg = entry_config(__doc__.split("\n")[0], ("sample",), FLAGS, argv, required=("sample.model", "sample.out"))
    if cfg is None:
        return
    s = cfg.sample
    pipe = BLDPipeline.from_pretrained(s.model, device=pick_device(s.device), dtype=DTYPES[s.dtype], compile=s.compile)
    n = s.num_images
    # The flags are in the recipes' terms (w, seed + i), as is sample_latents; pipe(...) takes 1 + w and generators.
    latents = pipe.sample_latents(
        prompts=[s.prompt] * n if s.prompt else None,
        class_labels=[s.class_label] * n if s.class_label is not None else None,
        n=n if not s.prompt and s.class_label is None else None,
        steps=s.steps, temperature=s.temperature, guidance=s.guidance, guidance_interval=s.guidance_interval,
        seed=s.seed, batch_size=s.batch_size or None,
        init_image=s.init_image or None, mask=s.mask or None, inpaint=s.inpaint,
    )
    images = to_pil(pipe.decode(latents, s.batch_size or None))
    folder = Path(s.out)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:04d}.png")
    save_png(make_grid(images), folder / "grid.png")
    atomic_write_text(folder / "sample.json", json.dumps(to_sections(cfg, ("sample",)), indent=2))
    print(f"wrote {n} images and grid.png to {folder}")


if __name__ == "__main__":
    main()
