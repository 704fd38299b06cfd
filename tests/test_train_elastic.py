"""The denoiser trainer across world sizes and accumulation: 2 CPU ranks under torchrun,
then 1 rank with 2 loader workers, then 2 ranks again, through one checkpoint folder."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from t2i_fixtures import N_IMAGES, train_command, train_env

pytestmark = pytest.mark.slow


def _train(nproc: int, out: Path, lat: str, ae: Path, *overrides: str) -> str:
    proc = subprocess.run(train_command(nproc, out, lat, ae, *overrides), env=train_env(), capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines())}


def test_grad_accum_2_resumes_exactly_and_counts_optimizer_steps(tmp_path, tiny_latents, tiny_ae):
    common = ("train.grad_accum=2", "train.total_samples=256", "train.log_every_samples=32",
              "train.ckpt_every_samples=64")
    _train(2, tmp_path / "full", tiny_latents, tiny_ae, *common)
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 9))  # 256 samples / (2 ranks x 8 x 2 micro-steps) optimizer steps
    _train(2, tmp_path / "half", tiny_latents, tiny_ae, *common, "train.max_steps=3")
    assert sorted(_losses(tmp_path / "half")) == [1, 2, 3]
    log = _train(2, tmp_path / "half", tiny_latents, tiny_ae, *common)
    assert "resumed from step 3:" in log
    resumed = _losses(tmp_path / "half")
    for step in range(4, 9):
        assert abs(resumed[step] - full[step]) <= 1e-6, (step, resumed[step], full[step])


def test_resume_on_other_world_sizes_delivers_each_sample_once(tmp_path, tiny_latents, tiny_ae):
    """2 ranks x 1 worker for 5 steps, 1 rank x 2 workers (grad_accum 2 keeps the global batch
    of 16) to step 10, 2 ranks to the end of the epoch: every key exactly once."""
    out = tmp_path / "run"
    common = ("log.sample_keys=true", f"train.total_samples={N_IMAGES}", "train.log_every_samples=16",
              "train.ckpt_every_samples=1000000")
    _train(2, out, tiny_latents, tiny_ae, *common, "train.max_steps=5")
    log = _train(1, out, tiny_latents, tiny_ae, *common, "train.max_steps=10", "latents.num_workers=2")
    assert "world size changed: checkpoint written by 2 rank(s), resuming on 1" in log, log[-3000:]
    assert "resuming a 2 rank x 1 worker data position on 1 rank(s) x 2 worker(s)" in log
    assert "grad_accum 2" in log
    log = _train(2, out, tiny_latents, tiny_ae, *common)
    assert "world size changed: checkpoint written by 1 rank(s), resuming on 2" in log
    samples = [json.loads(line)["samples"] for line in (out / "stats.jsonl").read_text().splitlines()]
    assert samples == list(range(16, N_IMAGES + 1, 16))  # the sample count continued across the changes
    keys = Counter()
    for path in (out / "sample_keys").glob("rank*.txt"):
        for line in path.read_text().splitlines():
            keys.update(line.split()[1:])
    assert sum(keys.values()) == N_IMAGES and len(keys) == N_IMAGES, keys.most_common(3)
