"""The main job on an embedded default: text-to-image end to end on real emoji, on this CPU.

    python data_tools/demo.py [--out runs/demo]        (what `make demo` runs)

Each stage runs the framework's real command line, says what it does and where it writes,
and leaves a `.done` marker: rerunning after an interruption skips finished stages, and an
interrupted stage resumes from its own checkpoints (training) or finished shards (encoding).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
T2I_RECIPE = "recipes/t2i_emoji_demo.yaml"


def stage(n: int, total: int, title: str, out: Path, marker: Path, cmd: list[str], env: dict | None = None,
          resume: str = "make demo") -> None:
    print(f"\n[demo {n}/{total}] {title}\n           -> {out}", flush=True)
    if marker.exists():
        print("           already done (delete the .done marker to redo it)", flush=True)
        return
    print(f"           $ {shlex.join(cmd)}", flush=True)
    start = time.time()
    # This interpreter's environment first on PATH: slurm/train_t2i.sh starts torchrun from it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PATH": path, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"[demo] stage {n} failed (exit {proc.returncode}); rerun `{resume}` to resume it")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.time() - start:.0f} s\n")
    print(f"           done in {time.time() - start:.0f} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="every intermediate output goes under this folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    shards, ae, latents, t2i, report = out / "shards", out / "ae", out / "latents", out / "t2i", out / "eval"
    n_shards = 8
    shard_spec = f"{shards}/shard-{{000000..{n_shards - 1:06d}}}.tar"
    latent_spec = f"{latents}/latents-{{000000..{n_shards - 1:06d}}}.tar"
    total = 5
    begin = time.time()

    # Without the skin-tone variants (half of Noto's emoji, five near-copies of each person):
    # the short run sees each distinct emoji twice as often.
    stage(1, total, "Emoji image-caption shards from Debian's Noto Color Emoji (WebDataset tar), "
          "without the skin-tone variants", shards, out / ".done" / "shards",
          [PY, "data_tools/make_shards.py", "--source", "emoji", "--size", "64", "--shard-size", "250",
           "--skip-caption", "skin tone", "--out", str(shards), "--contact-sheet", str(out / "emoji_contact_sheet.png")])
    stage(2, total, "A small binary autoencoder on the emoji (32px -> 8x8 grid of 32 bits), one CPU process", ae,
          out / ".done" / "ae",
          [PY, "-m", "bld_t2i.cli.train_ae", "--recipe", "recipes/ae/emoji32_demo.yaml", f"data.shards={shard_spec}",
           f"run.out_dir={ae}"])
    stage(3, total, "Offline pre-encoding to bit-packed latent shards, with the captions' MiniLM embeddings",
          latents, out / ".done" / "latents",
          [PY, "data_tools/encode_latents.py", "--shards", shard_spec, "--autoencoder", str(ae / "export"),
           "--out", str(latents), "--recipe", T2I_RECIPE])
    stage(4, total, "Text-conditioned denoiser, DeepSpeed ZeRO-2 on 2 CPU processes, caption dropout 0.1 "
          "(slurm/train_t2i.sh without SLURM)", t2i, out / ".done" / "t2i",
          ["bash", "slurm/train_t2i.sh", T2I_RECIPE, f"run.out_dir={t2i}",
           f"latents.shards={latent_spec}", f"autoencoder.path={ae / 'export'}"],
          env={"BLD_NPROC": "2", "OMP_NUM_THREADS": "1"})
    stage(5, total, "Prompt-sheet evaluation: seen and unseen emoji prompts, guidance 0 and 3", report,
          out / ".done" / "eval",
          [PY, "-m", "bld_t2i.cli.evaluate", "--model", str(t2i / "export"), "--prompts", "recipes/prompts/emoji_demo.jsonl",
           "--out", str(report), "--guidance", "0,3", "--steps", "16", "--images-per-prompt", "4",
           "--neighbours", str(latents)])
    print(f"\n[demo] finished in {(time.time() - begin) / 60:.1f} min. Open the report:\n{report / 'index.html'}")


if __name__ == "__main__":
    main()
