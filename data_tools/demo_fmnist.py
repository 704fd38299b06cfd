"""The poster's other rows on this CPU: class-conditional and unconditional Fashion-MNIST.

    python data_tools/demo_fmnist.py --task class  [--out runs/fmnist]
    python data_tools/demo_fmnist.py --task uncond [--out runs/fmnist]    (with inpainting)
    ... --quick   a few-minute version on 2,500 images with short training runs (CI runs it)

Both tasks share the image shards, the autoencoder and the latents under --out (the first
task run makes them; the second skips them), then train their own denoiser and write their
own report to <out>/<task>/eval/index.html. The class-conditional sheet has one row per
class label at guidance 0 and 3, scored by a small classifier trained on the same training
images and, half the time, on their autoencoder reconstructions (bld_t2i.cli.train_classifier;
a sample is no sharper than a reconstruction, and a classifier of sharp images only calls
the autoencoder's blurred sandals and shirts something else). It is measured on the
first 5,000 held-out test images (shard 12 starts the 10,000 test images, never trained
on) and on their reconstructions; the demo prints the samples' accuracy at w = 3 beside.
The unconditional report also inpaints the first test image with its right half
regenerated, and the demo prints the samples' per-bit statistics against the training
latents'. Stages run the framework's real command lines and leave `.done` markers, as
data_tools/demo.py does: a rerun skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import PY, ROOT  # noqa: E402
from demo import stage as run_stage  # noqa: E402  (the emoji demo's stage runner)

from bld_t2i.utils import save_png  # noqa: E402

TRAIN_SHARDS = 4  # 20,000 training images are plenty for a tiny denoiser and keep encoding short


class Scale(NamedTuple):
    """How much of the demo to run: the images made into shards and each training run's length
    (recipe overrides; the recipes' own lengths when empty)."""

    shard_size: int
    test_shard: int  # held out: never trained on
    limit: int | None = None  # images made into shards (all 70,000 when None)
    ae: tuple[str, ...] = ()
    denoiser: tuple[str, ...] = ()
    classifier_epochs: int = 5  # ~90% on the test images, ~3 min on one CPU thread (plus the reconstructions)


# 70,000 images: shards 0-11 are the 60,000 training images, 12-13 the test set.
FULL = Scale(shard_size=5000, test_shard=12)
# --quick, a few minutes for CI (tests/test_demo_fmnist.py): 2,000 training images and 500
# held out from the training split, short autoencoder and denoiser runs.
QUICK = Scale(shard_size=500, test_shard=4, limit=2500,
              ae=("train.total_samples=800", "train.ckpt_every_samples=400", "optim.warmup_samples=100",
                  "ae_loss.deterministic_start_samples=200", "train.log_every_samples=400"),
              denoiser=("train.total_samples=24000", "train.ckpt_every_samples=12000", "optim.warmup_samples=1000"),
              classifier_epochs=1)
SHEETS = {"class": "recipes/prompts/fmnist_classes.jsonl", "uncond": "recipes/prompts/fmnist_uncond.jsonl"}
GUIDANCE = {"class": "0,3", "uncond": "0"}  # guidance needs a condition to drop
IMAGES = {"class": 16, "uncond": 16}  # per prompt: 160 class samples (a standard error of 3% on their accuracy)


def summary(report: dict) -> list[str]:
    """The lines the demo ends with: class accuracy of the samples per setting beside the
    classifier's on real test images, and the per-bit statistics against the data."""
    lines = []
    classifier = report.get("classifier")
    for s in report["settings"]:
        if "class_accuracy" in s:
            lines.append(f"class accuracy of the samples at w = {s['guidance']:g}: {s['class_accuracy']:.3f}")
        if "bit_rate_diff_mean" in s:
            lines.append(f"{s['setting']}: per-channel bit rate |sample - data| mean {s['bit_rate_diff_mean']:.4f}, "
                         f"max {s['bit_rate_diff_max']:.4f}; dead/saturated channels {s['dead_or_saturated']:.3f} "
                         f"(data {s['data_dead_or_saturated']:.3f})")
    if classifier:
        recon = classifier.get("reconstructed_accuracy")
        lines.append(f"the classifier on {classifier['images']} real test images: {classifier['accuracy']:.3f}"
                     + (f"; on their autoencoder reconstructions: {recon:.3f}" if recon else ""))
    for name, kept in report.get("inpainting", {}).get("settings", {}).items():
        lines.append(f"inpainting {name}: known bits kept {kept['known_bits_kept']:.4f}")
    return lines


def first_image(shard: Path) -> Image.Image:
    """The first PNG of an image shard (a WebDataset tar)."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".png"):
                return Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    raise ValueError(f"{shard}: no .png member")


def write_inpainting_inputs(shard: Path, folder: Path) -> None:
    """folder/image.png, the shard's first image, and folder/mask.png, white (regenerate) on its right half."""
    folder.mkdir(parents=True, exist_ok=True)
    image = first_image(shard)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (image.width // 2, 0, image.width, image.height))
    save_png(image, folder / "image.png")
    save_png(mask, folder / "mask.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(SHEETS))
    p.add_argument("--out", default="runs/fmnist", help="every intermediate output goes under this folder")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute version (2,500 images, short training runs), as CI runs it")
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    task = args.task
    shards, ae, latents = out / "shards", out / "ae", out / "latents"
    t2i, report, inpaint = out / task / "t2i", out / task / "eval", out / task / "inpaint"
    train_spec = f"{shards}/shard-{{000000..{TRAIN_SHARDS - 1:06d}}}.tar"
    latent_spec = f"{latents}/latents-{{000000..{TRAIN_SHARDS - 1:06d}}}.tar"
    recipe = f"recipes/fmnist_{task}.yaml"
    total = 6 if task == "class" else 5
    begin = time.time()
    stage = partial(run_stage, resume=f"python data_tools/demo_fmnist.py --task {task}")

    stage(1, total, "Fashion-MNIST image shards at 32 px, class name caption, label in the json (WebDataset tar)",
          shards, out / ".done" / "shards",
          [PY, "data_tools/make_shards.py", "--source", "fashion-mnist", "--size", "32",
           "--shard-size", str(scale.shard_size), "--out", str(shards),
           *(["--limit", str(scale.limit)] if scale.limit else []),
           "--contact-sheet", str(out / "fmnist_contact_sheet.png")])
    stage(2, total, "A small binary autoencoder (32px -> 8x8 grid of 16 bits), one CPU process, shared by both tasks",
          ae, out / ".done" / "ae",
          [PY, "-m", "bld_t2i.cli.train_ae", "--recipe", "recipes/ae/fmnist32.yaml", f"data.shards={train_spec}",
           f"run.out_dir={ae}", *scale.ae])
    stage(3, total, f"Offline pre-encoding of the first {TRAIN_SHARDS * scale.shard_size} training images to latent shards",
          latents, out / ".done" / "latents",
          [PY, "data_tools/encode_latents.py", "--shards", train_spec, "--autoencoder", str(ae / "export"),
           "--out", str(latents)])
    kind = "class-conditional (label embedding, label dropout 0.1)" if task == "class" else "unconditional"
    stage(4, total, f"A {kind} denoiser, DeepSpeed ZeRO-2 on 2 CPU processes (slurm/train_t2i.sh without SLURM)",
          t2i, out / ".done" / task / "t2i",
          ["bash", "slurm/train_t2i.sh", recipe, f"run.out_dir={t2i}", f"latents.shards={latent_spec}",
           f"autoencoder.path={ae / 'export'}", *scale.denoiser],
          env={"BLD_NPROC": "2", "OMP_NUM_THREADS": "1"})
    evaluate = [PY, "-m", "bld_t2i.cli.evaluate", "--model", str(t2i / "export"), "--prompts", SHEETS[task],
                "--out", str(report), "--guidance", GUIDANCE[task], "--steps", "16",
                "--images-per-prompt", str(IMAGES[task]), "--neighbours", str(latents)]
    title = f"Evaluation: {IMAGES[task]} samples of every class, guidance 0 and 3, scored by the classifier"
    if task == "class":
        classifier = out / "classifier"
        stage(5, total, f"A small classifier on the {TRAIN_SHARDS * scale.shard_size} training images, measured on the "
              f"{scale.shard_size} test images of shard {scale.test_shard}", classifier, out / ".done" / "classifier",
              [PY, "-m", "bld_t2i.cli.train_classifier", "--shards", train_spec,
               "--heldout", str(shards / f"shard-{scale.test_shard:06d}.tar"), "--out", str(classifier), "--flip",
               "--epochs", str(scale.classifier_epochs), "--autoencoder", str(ae / "export"), "--reconstructions", "0.5"],
              env={"OMP_NUM_THREADS": "1"})
        evaluate += ["--classifier", str(classifier)]
    else:
        write_inpainting_inputs(shards / f"shard-{scale.test_shard:06d}.tar", inpaint)
        evaluate += ["--inpaint-image", str(inpaint / "image.png"), "--inpaint-mask", str(inpaint / "mask.png")]
        title = "Evaluation: unconditional samples, and the right half of a held-out test image inpainted"
    stage(total, total, title, report, out / ".done" / task / "eval", evaluate)
    print(f"\n[demo {task}] finished in {(time.time() - begin) / 60:.1f} min.")
    for line in summary(json.loads((report / "metrics.json").read_text())):
        print(f"[demo {task}] {line}")
    print(f"[demo {task}] open the report: {report / 'index.html'}")


if __name__ == "__main__":
    main()
