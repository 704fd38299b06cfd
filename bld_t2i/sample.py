"""Generate images from an exported model folder.

    python -m bld_t2i.sample --model FOLDER --prompt "red apple" --out DIR [--steps 16]
        [--temperature 1.0] [--guidance 2.5] [--guidance-interval 0.2 0.8] [--seed 0] [--num-images 4]
        [--batch-size B] [--device cuda --dtype bf16 --compile]
    python -m bld_t2i.sample --model FOLDER --class-label 3 --out DIR      (class-conditional)
    python -m bld_t2i.sample --model FOLDER --out DIR --num-images 8       (unconditional)
    ... --init-image IMG --mask MASK [--inpaint clamp|renoise]             (white = regenerate)

Image i is drawn with its own generator seeded with seed + i, in batches of --batch-size
(default 32 on a CPU, 64 on a GPU), so `--seed S+i --num-images 1` regenerates image i of
a run alone, bit for bit. Writes `{i:04d}.png` and `grid.png`; defaults (steps, tau, w) come from
the model's config.diffusion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bld_t2i.distributed import pick_device
from bld_t2i.pipeline import INPAINT_MODES, BLDPipeline, make_grid, save_png, to_pil

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported model folder (config.json + model.safetensors)")
    p.add_argument("--out", required=True, help="output folder")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", help="text prompt (text-conditioned models)")
    cond.add_argument("--class-label", type=int, help="class label (class-conditional models)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="sampling steps S <= T; default config.diffusion.sample_steps")
    p.add_argument("--temperature", type=float, default=None, help="tau; default config.diffusion.temperature")
    p.add_argument("--guidance", type=float, default=None, help="w; default config.diffusion.guidance")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guidance only for t/T in [LO, HI]; default config.diffusion.guidance_interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="images per batch; default 32 on CPU, 64 on GPU")
    p.add_argument("--init-image", help="image to inpaint")
    p.add_argument("--mask", help="inpainting mask: white = regenerate")
    p.add_argument("--inpaint", default="clamp", choices=INPAINT_MODES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (CUDA graphs on a GPU)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if (args.init_image is None) != (args.mask is None):
        raise SystemExit("--init-image and --mask go together")
    pipe = BLDPipeline.from_pretrained(args.model, device=pick_device(args.device), dtype=DTYPES[args.dtype],
                                       compile=args.compile)
    n = args.num_images
    out = pipe(
        prompts=None if args.prompt is None else [args.prompt] * n,
        class_labels=None if args.class_label is None else [args.class_label] * n,
        n=n if args.prompt is None and args.class_label is None else None,
        steps=args.steps, temperature=args.temperature, guidance=args.guidance,
        guidance_interval=args.guidance_interval, seed=args.seed, batch_size=args.batch_size,
        init_image=args.init_image, mask=args.mask, inpaint=args.inpaint,
    )
    folder = Path(args.out)
    images = to_pil(out.images)
    for i, img in enumerate(images):
        save_png(img, folder / f"{i:04d}.png")
    save_png(make_grid(images), folder / "grid.png")
    print(f"wrote {n} images and grid.png to {folder}")


if __name__ == "__main__":
    main()
