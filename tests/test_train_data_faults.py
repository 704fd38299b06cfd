"""The trainer logs the data faults of every rank: a shard cut in half mid-list is skipped
from where it breaks, counted in stats.jsonl, and training goes on to the end."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from t2i_fixtures import train_command, train_env

pytestmark = pytest.mark.slow


def test_a_broken_shard_is_counted_in_the_stats_and_training_finishes(tmp_path, tiny_latents, tiny_ae):
    folder = Path(tiny_latents.split("/latents-")[0])
    copy = tmp_path / "latents"
    shutil.copytree(folder, copy)
    broken = copy / "latents-000002.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2 + 100])  # mid-member
    out = tmp_path / "run"
    proc = subprocess.run(train_command(2, out, f"{copy}/latents-{{000000..000003}}.tar", tiny_ae,
                                        "train.total_samples=320", "train.log_every_samples=160"),
                          env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped_")}
    assert skipped and all(v >= 1 for v in skipped.values()), last
    assert last["samples"] == 320 and (out / "export" / "denoiser" / "model.safetensors").is_file()
