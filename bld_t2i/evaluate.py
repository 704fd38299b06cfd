"""Offline prompt-sheet evaluation of an exported model, with an HTML report.

    python -m bld_t2i.evaluate --model FOLDER --prompts SHEET --out DIR [--guidance 0,2.5,10]
        [--temperature 1.0,0.9] [--steps 16,64] [--guidance-interval 0:1,0.2:0.8] [--images-per-prompt N]
        [--seed S] [--batch-size B]
        [--clip-model ViT-L-14 --clip-checkpoint FILE] [--inception FILE --reference SHARDS]
        [--neighbours LATENT_FOLDER] [--inpaint-image IMG --inpaint-mask MASK] [--wandb]
    torchrun --nproc_per_node=N -m bld_t2i.evaluate ...    (prompts split across ranks)

SHEET: .txt (a prompt a line), .csv / .tsv with a prompt column (PartiPrompts works as
is) or .jsonl with prompt [, id, category, seed]. Rerunning skips finished images.

--inpaint-image/--inpaint-mask (white = regenerate, fitted to the model's resolution like
`bld_t2i.sample --init-image/--mask`): every (setting, prompt, image) is drawn again from
its same seed with the image's bits kept outside the mask, into inpaint/, and the report
gets an Inpainting section (original, reconstruction, mask, results, known bits kept).
See bld_t2i/eval/run.py for the output layout.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bld_t2i import distributed as D
from bld_t2i.eval.generate import EvalOptions, InpaintError, settings_grid
from bld_t2i.eval.run import evaluate
from bld_t2i.eval.sheets import SheetError, read_sheet
from bld_t2i.pipeline import BLDPipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _intervals(text: str) -> list[tuple[float, float]]:
    """"0:1,0.2:0.8" -> [(0.0, 1.0), (0.2, 0.8)]: t/T intervals where guidance applies."""
    try:
        return [tuple(float(x) for x in part.split(":", 1)) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of lo:hi, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--prompts", required=True, help="prompt sheet: .txt, .csv, .tsv or .jsonl")
    p.add_argument("--out", required=True, help="output folder (reruns resume in it)")
    p.add_argument("--steps", type=_list(int), default=None, help="comma list; default config.diffusion.sample_steps")
    p.add_argument("--guidance", type=_list(float), default=None, help="comma list of w; default config.diffusion.guidance")
    p.add_argument("--temperature", type=_list(float), default=None, help="comma list of tau; default config.diffusion.temperature")
    p.add_argument("--guidance-interval", type=_intervals, default=None,
                   help="comma list of lo:hi, guidance only for t/T in [lo, hi]; default config.diffusion.guidance_interval")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling batch; default 32 on CPU, 64 on GPU")
    p.add_argument("--clip-model", default="", help="OpenCLIP architecture (with --clip-checkpoint) or local-dir:FOLDER")
    p.add_argument("--clip-checkpoint", default="", help="local OpenCLIP checkpoint file")
    p.add_argument("--inception", default="", help="local torch-fidelity InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--reference", default="", help="reference image shards for FID/KID")
    p.add_argument("--reference-limit", type=int, default=10_000, help="reference images read at most")
    p.add_argument("--fid-features", type=int, default=2048, choices=(64, 192, 768, 2048),
                   help="Inception layer for FID/KID; 2048 is the standard, smaller ones are cheaper and not comparable")
    p.add_argument("--neighbours", default="", help="latent data set folder to search for nearest training samples")
    p.add_argument("--neighbours-k", type=int, default=10)
    p.add_argument("--neighbours-clip", action="store_true",
                   help="also search in CLIP image space (needs --clip-model; decodes every training latent)")
    p.add_argument("--inpaint-image", default="", help="image to inpaint for every prompt and setting (with --inpaint-mask)")
    p.add_argument("--inpaint-mask", default="", help="inpainting mask: white = regenerate")
    p.add_argument("--wandb", action="store_true", help="log grids and the metrics table to wandb (offline)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.images_per_prompt < 1:
        sys.exit("--images-per-prompt must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        sys.exit("--batch-size must be >= 1")
    try:
        rows = read_sheet(args.prompts)
    except SheetError as e:
        sys.exit(f"bad prompt sheet: {e}")
    device = D.pick_device(args.device)
    D.init(device)
    try:
        pipe = BLDPipeline.from_pretrained(args.model, device=device, dtype=DTYPES[args.dtype])
        d = pipe.cfg.diffusion
        try:
            settings = settings_grid(args.steps or [d.sample_steps], args.guidance or [d.guidance],
                                     args.temperature or [d.temperature],
                                     args.guidance_interval or [tuple(d.guidance_interval)])
        except ValueError as e:
            sys.exit(f"--guidance-interval: {e}")
        opts = EvalOptions(settings=settings, images_per_prompt=args.images_per_prompt, seed=args.seed,
                           batch_size=args.batch_size, clip_model=args.clip_model, clip_checkpoint=args.clip_checkpoint,
                           inception=args.inception, reference=args.reference, reference_limit=args.reference_limit,
                           fid_features=args.fid_features,
                           neighbours=args.neighbours, neighbours_k=args.neighbours_k,
                           neighbours_clip=args.neighbours_clip, wandb=args.wandb,
                           inpaint_image=args.inpaint_image, inpaint_mask=args.inpaint_mask,
                           sheet=args.prompts, model=args.model)
        try:
            report = evaluate(pipe, rows, args.out, opts)
        except SheetError as e:
            sys.exit(f"bad prompt sheet {args.prompts}: {e}")
        except InpaintError as e:
            sys.exit(f"bad inpainting input: {e}")
        if report is not None:
            for s in report["settings"]:
                D.print0(f"[evaluate] {s['setting']}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in s.items() if isinstance(v, float) and k not in ("guidance", "temperature", "guidance_interval")))
            for k, v in report["skipped"].items():
                D.print0(f"[evaluate] {k}: skipped ({v})")
            D.print0(f"[evaluate] report: {args.out}/index.html")
    finally:
        D.teardown()


if __name__ == "__main__":
    main()
