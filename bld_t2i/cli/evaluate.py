"""Offline prompt-sheet evaluation of an exported model, with an HTML report.

    python -m bld_t2i.cli.evaluate --model FOLDER --prompts SHEET --out DIR [--guidance 0,2.5,10]
        [--temperature 1.0,0.9] [--steps 16,64] [--guidance-interval 0:1,0.2:0.8] [--images-per-prompt N]
        [--seed S] [--batch-size B]
        [--clip-model ViT-L-14 --clip-checkpoint FILE] [--inception FILE --reference SHARDS]
        [--neighbours LATENT_FOLDER] [--classifier FOLDER] [--cache-dir DIR] [--cache use|refresh|off]
        [--inpaint-image IMG --inpaint-mask MASK] [--wandb]
    torchrun --nproc_per_node=N -m bld_t2i.cli.evaluate ...    (prompts split across ranks)

SHEET: .txt (a prompt a line), .csv / .tsv with a prompt column (PartiPrompts works as
is) or .jsonl with prompt [, id, category, seed]. Rerunning skips finished images.

--neighbours (a latent data set) adds the nearest training latents, caption recall@1/@10 of
the seen prompts and per-bit statistics against the data; --classifier (a folder from
`bld_t2i.cli.train_classifier`) the class accuracy of a class-conditional model's samples.
FID/KID reference features and the CLIP features of --neighbours-clip are kept in --cache-dir
($XDG_CACHE_HOME/bld_t2i by default) and reused by the next run on the same data.

--inpaint-image/--inpaint-mask (white = regenerate, fitted to the model's resolution like
`bld_t2i.cli.sample --init-image/--mask`): every (setting, prompt, image) is drawn again from
its same seed with the image's bits kept outside the mask, into inpaint/, and the report
gets an Inpainting section (original, reconstruction, mask, results, known bits kept).
See bld_t2i/eval/run.py for the output layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from bld_t2i import distributed as D
from bld_t2i.config import Flag, entry_config, to_sections
from bld_t2i.eval.generate import EvalOptions, InpaintError, settings_grid, write_if_changed
from bld_t2i.eval.run import evaluate
from bld_t2i.eval.sheets import SheetError, read_sheet
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.utils import DTYPES

SECTIONS = ("evaluate", "log")


def _intervals(text: str) -> list[list[float]]:
    """"0:1,0.2:0.8" -> [[0.0, 1.0], [0.2, 0.8]]: t/T intervals where guidance applies."""
    try:
        return [[float(x) for x in part.split(":", 1)] for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of lo:hi, got {text!r}") from None


FLAGS = [Flag("--model", "evaluate.model", "exported model folder"),
         Flag("--prompts", "evaluate.prompts", "prompt sheet: .txt, .csv, .tsv or .jsonl"),
         Flag("--out", "evaluate.out", "output folder (reruns resume in it)"),
         Flag("--steps", "evaluate.steps", "comma list"), Flag("--guidance", "evaluate.guidance", "comma list of w"),
         Flag("--temperature", "evaluate.temperature", "comma list of tau"),
         Flag("--guidance-interval", "evaluate.guidance_interval", "comma list of lo:hi", parse=_intervals),
         Flag("--images-per-prompt", "evaluate.images_per_prompt"), Flag("--seed", "evaluate.seed"),
         Flag("--batch-size", "evaluate.batch_size"), Flag("--clip-model", "evaluate.clip_model"),
         Flag("--clip-checkpoint", "evaluate.clip_checkpoint"), Flag("--inception", "evaluate.inception"),
         Flag("--reference", "evaluate.reference"), Flag("--reference-limit", "evaluate.reference_limit"),
         Flag("--fid-features", "evaluate.fid_features"), Flag("--neighbours", "evaluate.neighbours"),
         Flag("--neighbours-k", "evaluate.neighbours_k"), Flag("--neighbours-clip", "evaluate.neighbours_clip"),
         Flag("--classifier", "evaluate.classifier", "classifier folder (class-conditional models)"),
         Flag("--cache-dir", "evaluate.cache_dir"), Flag("--cache", "evaluate.cache"),
         Flag("--inpaint-image", "evaluate.inpaint_image"), Flag("--inpaint-mask", "evaluate.inpaint_mask"),
         Flag("--wandb", "evaluate.wandb"), Flag("--device", "evaluate.device"), Flag("--dtype", "evaluate.dtype")]


def main(argv=None) -> None:
    cfg = entry_config(__doc__.split("\n")[0], SECTIONS, FLAGS, argv,
                       required=("evaluate.model", "evaluate.prompts", "evaluate.out"))
    if cfg is None:
        return
    e = cfg.evaluate
    try:
        rows = read_sheet(e.prompts)
    except SheetError as err:
        raise SystemExit(f"bad prompt sheet: {err}") from None
    device = D.pick_device(e.device)
    D.init(device)
    try:
        pipe = BLDPipeline.from_pretrained(e.model, device=device, dtype=DTYPES[e.dtype])
        d = pipe.cfg.diffusion
        try:
            settings = settings_grid(e.steps or [d.sample_steps], e.guidance or [d.guidance],
                                     e.temperature or [d.temperature],
                                     [tuple(g) for g in e.guidance_interval] or [tuple(d.guidance_interval)])
        except ValueError as err:
            raise SystemExit(f"--guidance-interval: {err}") from None
        opts = EvalOptions(**dataclasses.asdict(e), settings=settings, log=cfg.log)
        if D.dist_info().is_main:
            # unchanged on a rerun: a finished evaluation run again writes nothing
            write_if_changed(Path(e.out) / "evaluate.json", json.dumps(to_sections(cfg, SECTIONS), indent=2).encode())
        try:
            report = evaluate(pipe, rows, e.out, opts)
        except SheetError as err:
            raise SystemExit(f"bad prompt sheet {e.prompts}: {err}") from None
        except InpaintError as err:
            raise SystemExit(f"bad inpainting input: {err}") from None
        if report is not None:
            _print(report, e.out)
    finally:
        D.teardown()


def _print(report: dict, out: str) -> None:
    for s in report["settings"]:
        D.print0(f"[evaluate] {s['setting']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in s.items()
            if isinstance(v, float) and k not in ("guidance", "temperature", "guidance_interval")))
    for k, v in report["skipped"].items():
        D.print0(f"[evaluate] {k}: skipped ({v})")
    if "classifier" in report:
        c = report["classifier"]
        recon = f", {c['reconstructed_accuracy']:.4f} on their reconstructions" if "reconstructed_accuracy" in c else ""
        D.print0(f"[evaluate] classifier {c['path']}: accuracy {c.get('accuracy', float('nan')):.4f} on "
                 f"{c.get('images')} held-out real images{recon} (the samples' is class_accuracy above)")
    for r in report.get("reuse", {}).values():
        D.print0(f"[evaluate] {r['text']}")
    D.print0(f"[evaluate] report: {out}/index.html")


if __name__ == "__main__":
    main()
