"""Does bf16 sampling at strong guidance need the denoiser's final norm and head in fp32?
Writes bench/results/bf16_guidance_<cpu|gpu>.md (not part of `make bench`: it needs a trained model).

    python bench/bf16_guidance.py --model RUN/export --neighbours LATENTS [--guidance 10]

At w = 10 the guided logit (1 + w) l_c - w l_u amplifies the rounding of both branches about
twenty-fold (docs/math.md (9)); bf16 logits carry ~3 significant digits. The same model, prompts
and seeds are sampled with the pipeline in fp32 and in bf16 (bf16 weights under autocast, the
sampler's arithmetic in fp32), and compared (a) bit for bit, against the distance between two
fp32 samples of other seeds, and (b) by the evaluation's weight-free judges on the seen prompts
of recipes/prompts/emoji_demo.jsonl: caption recall@1/@10 of the nearest training latents and the
per-channel bit rates against the data's. A CPU's bf16 has the GPU's format and rounding; its
matmul kernels differ, so the GPU check should confirm it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import device_suffix, write_result

ROOT = Path(__file__).resolve().parents[1]
SHEET = ROOT / "recipes" / "prompts" / "emoji_demo.jsonl"


def seen_prompts() -> list[str]:
    rows = [json.loads(line) for line in SHEET.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r.get("category") == "seen"]


def main(argv=None) -> None:
    from bld_t2i.pipeline import BLDPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--neighbours", required=True, help="the model's latent data set, for recall and bit rates")
    p.add_argument("--guidance", type=float, default=10.0, help="w")
    p.add_argument("--images", type=int, default=4, help="per prompt")
    p.add_argument("--out", default="runs/bf16_guidance")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [q for q in seen_prompts() for _ in range(args.images)]
    seeds = list(range(len(prompts)))
    latents, seconds = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = BLDPipeline.from_pretrained(args.model, device=device, dtype=dtype)
        start = time.time()
        latents[name] = pipe.sample_latents(prompts, guidance=args.guidance, seed=seeds)
        seconds[name] = time.time() - start
        if name == "fp32":
            latents["fp32, other seeds"] = pipe.sample_latents(prompts, guidance=args.guidance,
                                                               seed=[s + 10_000 for s in seeds])
    rows = []
    for name in ("fp32", "bf16"):
        report = Path(args.out) / name
        subprocess.run([sys.executable, "-m", "bld_t2i.cli.evaluate", "--model", args.model, "--prompts", str(SHEET),
                        "--out", str(report), "--guidance", str(args.guidance), "--steps", "16", "--images-per-prompt",
                        str(args.images), "--neighbours", args.neighbours, "--dtype", name, "--device", device.type],
                       check=True, cwd=ROOT)
        (setting,) = json.loads((report / "metrics.json").read_text())["settings"]
        same = (latents[name] != latents["fp32"]).float().mean().item()
        rows.append({"pipeline": name, "w": args.guidance, "bits differing from fp32, same seeds": same,
                     "recall@1": setting["recall_at_1"], "recall@10": setting["recall_at_10"],
                     "bit-rate |diff| mean": setting["bit_rate_diff_mean"],
                     "bit-rate |diff| max": setting["bit_rate_diff_max"], "sampling s": seconds[name]})
    baseline = (latents["fp32, other seeds"] != latents["fp32"]).float().mean().item()
    notes = f"""
Model `{args.model}`; {len(prompts)} samples ({args.images} per seen prompt), 16 steps, tau 1, seeds 0..{len(prompts) - 1}.
Two fp32 samples of the same prompt with other seeds differ in {baseline:.3f} of their bits: a
fraction near that says the bf16 trajectories diverged from the fp32 ones (any change does, over
16 steps of Bernoulli draws); the judges say whether they are worse.
"""
    print(write_result(f"bf16_guidance_{device_suffix()}", f"bf16 against fp32 sampling at w = {args.guidance:g}",
                       rows, notes).read_text())


if __name__ == "__main__":
    main()
