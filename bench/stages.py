"""Training in stages on real data: the emoji demo's model continued at 64 px, against the
same stage from scratch. Writes bench/results/stages.md (not part of `make bench`: ~1 h on 2 cores).

    python data_tools/demo.py                  # stages 1-3 at least: shards, autoencoder, latents
    python bench/stages.py [--demo runs/demo] [--out runs/stages] [--samples 32000]

1. the first stage, the demo recipe (recipes/t2i_emoji_demo.yaml, 32 px, 8x8 grid) on latent
   shards 0-6, validated on shard 7 (held out from every stage: the alphabetical emoji "warning"
   .. "zzz", none of the seen prompts);
2. the demo autoencoder's decoder alone fine-tuned at 64 px (recipes/stages/ae_emoji64_decoder.yaml):
   the encoder and its fingerprint stay; the 64 px images encoded by it give a 16x16 grid;
3. the 64 px latent shards (encode_latents.py with the fine-tuned export);
4. the second stage (recipes/stages/t2i_emoji64.yaml) from the first stage's export (init.from)
   and from scratch (init.from=), the same samples, data order and seed;
5. the evaluation's caption recall of the seen prompts of recipes/prompts/emoji_demo.jsonl for
   each (w = 0 and 3, 16 steps, 4 images a prompt).

Every step is the framework's own command line, resumable: a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def step(title: str, done: Path, cmd: list[str], env: dict | None = None) -> None:
    """Run `cmd` unless `done` exists."""
    if done.exists():
        print(f"[stages] {title}: done before", flush=True)
        return
    print(f"[stages] {title}\n  $ {' '.join(cmd)}", flush=True)
    path = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PATH": path, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"[stages] {title} failed (exit {proc.returncode}); rerun to resume")


def torchrun(recipe: str, *overrides: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bld_t2i.cli.train",
            "--recipe", recipe, *overrides]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if line.strip()]


def minutes_of(run: Path) -> float:
    """Wall minutes between a run's first and last stats.jsonl line (its training, validations included)."""
    times = [r["time"] for r in records(run)]
    return (times[-1] - times[0]) / 60


def recall(report: Path) -> dict[str, dict]:
    """{setting name: {"recall_at_1", "recall_at_10"}} from an evaluation's metrics.json."""
    data = json.loads((report / "metrics.json").read_text())
    return {s["setting"]: s for s in data["settings"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="runs/demo", help="make demo's output folder (shards, ae, latents)")
    p.add_argument("--out", default="runs/stages")
    p.add_argument("--samples", type=int, default=32000, help="samples of each second-stage run")
    args = p.parse_args(argv)
    demo, out = (ROOT / args.demo).resolve(), (ROOT / args.out).resolve()
    env2 = {"OMP_NUM_THREADS": "1"}
    train7 = "{000000..000006}"

    t2i32 = out / "t2i32"
    step(
        "stage 1: the demo recipe at 32 px on shards 0-6", t2i32 / "export" / "model_index.json",
        torchrun("recipes/t2i_emoji_demo.yaml", f"run.out_dir={t2i32}",
                 f"latents.shards={demo}/latents/latents-{train7}.tar", f"autoencoder.path={demo}/ae/export",
                 f"val.shards={demo}/latents/latents-000007.tar", "val.every_samples=36000", "val.max_samples=256",
                 "train.sample_every_samples=0"), env2)
    ae64 = out / "ae64"
    step(
        "the demo autoencoder's decoder at 64 px", ae64 / "export" / "config.json",
        [PY, "-m", "bld_t2i.cli.train_ae", "--recipe", "recipes/stages/ae_emoji64_decoder.yaml", f"run.out_dir={ae64}",
         f"data.shards={demo}/shards/shard-{train7}.tar", f"val.shards={demo}/shards/shard-000007.tar",
         f"init.from={demo}/ae/export", "val.every_samples=3200"])
    lat64 = out / "latents64"
    step(
        "64 px latent shards", lat64 / "manifest.json",
        [PY, "data_tools/encode_latents.py", "--shards", f"{demo}/shards/shard-{{000000..000007}}.tar",
         "--autoencoder", str(ae64 / "export"), "--out", str(lat64), "--recipe", "recipes/stages/t2i_emoji64.yaml"])
    stage2 = {"from stage 1": f"init.from={t2i32}/export", "from scratch": "init.from="}
    rows, evals = [], {}
    for name, init in stage2.items():
        run = out / ("t2i64_init" if "stage" in name else "t2i64_scratch")
        step(
            f"stage 2 at 64 px, {name}", run / "export" / "model_index.json",
            torchrun("recipes/stages/t2i_emoji64.yaml", f"run.out_dir={run}", init, f"train.total_samples={args.samples}",
                     f"latents.shards={lat64}/latents-{train7}.tar", f"val.shards={lat64}/latents-000007.tar",
                     f"autoencoder.path={ae64}/export"), env2)
        report = run / "eval"
        step(f"evaluation of stage 2, {name}", report / "metrics.json",
             [PY, "-m", "bld_t2i.cli.evaluate", "--model", str(run / "export"), "--prompts",
              "recipes/prompts/emoji_demo.jsonl", "--out", str(report), "--guidance", "0,3", "--steps", "16",
              "--images-per-prompt", "4", "--neighbours", str(lat64)])
        evals[name] = recall(report)
        val = {r["samples"]: r["val/loss"] for r in records(run) if "val/loss" in r}
        train = [r for r in records(run) if "loss" in r]
        row = {"second stage (64 px, 16x16)": name, **{f"val loss @ {s // 1000}k": v for s, v in sorted(val.items())},
               "train loss (last line)": train[-1]["loss"], "minutes": minutes_of(run)}
        for setting, m in evals[name].items():
            row[f"recall@1 {setting}"] = m.get("recall_at_1")
            row[f"recall@10 {setting}"] = m.get("recall_at_10")
        rows.append(row)

    first = [r for r in records(t2i32) if "val/loss" in r]
    ae_val = [r for r in records(ae64) if "val/psnr" in r]
    shift = " / ".join(f"{ae_val[-1][f'val/colour_shift_{c}']:+.2f}" for c in "rgb")
    notes = f"""
Both second-stage runs: `recipes/stages/t2i_emoji64.yaml`, {args.samples:,} samples, the same seed
and data order, 2 CPU processes (ZeRO-2), validated on held-out latent shard 7 (179 emoji none
of the stages trained on; `val/loss`: the balanced flip loss at t = 8, 24, 40, 56 of T = 64,
noise seeded per sample key, EMA weights). Recall: the fraction of the 32 samples of the 8 seen
prompts whose Hamming-nearest training latent (64 px) carries the prompt's caption (chance ~1/1,929).

- First stage (32 px, 8x8, the demo recipe on shards 0-6, {minutes_of(t2i32):.1f} min): held-out val loss
  {', '.join(f"{r['val/loss']:.4f} at {r['samples']:,}" for r in first)} samples.
- Decoder-only fine-tune of the demo autoencoder at 64 px (the encoder bit for bit, so the 64 px
  latents are the demo encoder's codes): held-out PSNR {ae_val[0]['val/psnr']:.2f} dB before,
  {ae_val[-1]['val/psnr']:.2f} dB after {ae_val[-1]['samples']:,} samples ({minutes_of(ae64):.1f} min); mean colour error
  {ae_val[0]['val/colour_error']:.2f} -> {ae_val[-1]['val/colour_error']:.2f} 8-bit levels (mean shift R/G/B
  {shift});
  dead / saturated channels {ae_val[-1]['val/dead_channels']} / {ae_val[-1]['val/saturated_channels']} of 32.
- Minutes: from each run's first to its last stats.jsonl line; the machine was shared with other
  jobs (samples compare, minutes less so).
"""
    path = write_result("stages", "Training in stages: the emoji demo model continued at 64 px", rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
