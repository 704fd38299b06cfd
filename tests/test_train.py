"""The DeepSpeed trainer, for real: 2 CPU processes (gloo), fp32, tiny latents.

Each test launches `python -m bld_t2i.cli.train` under torchrun on latent shards made by the
real tools (see t2i_fixtures.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bld_t2i.config import Config, LogConfig, from_dict
from bld_t2i.diffusion import keep_factors, sample
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.tracking import StatsLogger

from t2i_fixtures import train_command, train_env

pytestmark = pytest.mark.slow
STEP_SAMPLES = 16  # 2 ranks x batch 8
STEPS = 20  # 16 was within 0.002 of the 0.05 bar for two different random streams


def _train(tmp: Path, name: str, lat: str, ae: Path, *overrides: str, timeout: int = 600) -> Path:
    out = tmp / name
    proc = subprocess.run(train_command(2, out, lat, ae, f"train.log_every_samples={STEP_SAMPLES}", *overrides),
                          env=train_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    return out


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines())}


def test_zero2_loss_falls_and_resume_is_exact(tmp_path, tiny_latents, tiny_ae):
    total = f"train.total_samples={STEPS * STEP_SAMPLES}"
    full = _train(tmp_path, "full", tiny_latents, tiny_ae, total)
    losses = _losses(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 0.05, f"loss did not fall: {first:.4f} -> {last:.4f}"
    log = (full / "train.log").read_text()
    assert "world size 2" in log
    # progress in a log: one plain line at the end (every 30 s, rank 0 only), with the loss
    done = re.findall(rf"\[train\] {STEPS * STEP_SAMPLES}/{STEPS * STEP_SAMPLES} samples \(100%\) [\d.]+ samples/s, "
                      r"elapsed [\d:]+, loss [\d.]+", log)
    assert len(done) == 1, log[-3000:]
    # the published export is the self-contained pipeline folder (bld_t2i/pretrained.py)
    assert {p.name for p in (full / "export").iterdir()} == {"model_index.json", "denoiser", "autoencoder",
                                                              "text_encoder", "scheduler"}

    # kill after N steps (stop there and checkpoint), rerun the same command: it resumes
    half = _train(tmp_path, "half", tiny_latents, tiny_ae, total, f"train.max_steps={STEPS // 2}")
    assert sorted(_losses(half)) == list(range(1, STEPS // 2 + 1))
    _train(tmp_path, "half", tiny_latents, tiny_ae, total)
    assert f"resumed from step {STEPS // 2}" in (half / "train.log").read_text()
    resumed = _losses(half)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert abs(resumed[step] - losses[step]) <= 1e-6, (step, resumed[step], losses[step])
    # checkpoints rotate: keep_checkpoints=2, and `latest` names the newest
    ckpts = sorted(p.name for p in (half / "checkpoints").glob("step_*"))
    assert len(ckpts) <= 2 and (half / "checkpoints" / "latest").read_text() == ckpts[-1]


def test_zero3_class_conditional_export_samples_without_deepspeed(tmp_path, tiny_latents, tiny_ae):
    out = _train(tmp_path, "z3", tiny_latents, tiny_ae, "train.zero_stage=3", "denoiser.conditioning=class",
                 "denoiser.num_classes=10", "text_encoder.kind=none", "train.total_samples=160",
                 "diffusion.t_power=3")
    losses = _losses(out)
    assert losses[max(losses)] < losses[1]
    # t_power 3 (docs/math.md (7a)): t <= T/4 has probability 1/64, so most 16-sample log lines
    # have no sample in the lowest time bucket (with U{1..T}: 1% of them), the top one always
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all("loss_t3" in r for r in records)
    assert sum("loss_t0" in r for r in records) <= 5, records
    folder = Path(out / "checkpoints" / (out / "checkpoints" / "latest").read_text())
    cfg = from_dict(json.loads((folder / "config.json").read_text()))
    assert cfg.train.zero_stage == 3 and cfg.denoiser.conditioning == "class"
    model = Denoiser(cfg.denoiser, (8, 8, 8))
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=True)  # every consolidated tensor has its full shape
    model.eval()
    labels = torch.arange(4)
    z = sample(lambda z_t, t, c: model(z_t, t, c), (4, 64, 8), keep_factors(cfg.diffusion.T), 4,
               cond={"label": labels}, null_cond=model.null_condition(4, "cpu"), guidance=2.0,
               generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 64, 8) and set(z.unique().tolist()) <= {0.0, 1.0}


def test_sigterm_leaves_loadable_checkpoint_then_unconditional_run_finishes(tmp_path, tiny_latents, tiny_ae):
    out = tmp_path / "sig"
    overrides = ("denoiser.conditioning=none", "text_encoder.kind=none", "train.zero_stage=1",
                 "train.total_samples=100000", "train.ckpt_every_samples=1000000", f"train.log_every_samples={STEP_SAMPLES}")
    proc = subprocess.Popen(train_command(2, out, tiny_latents, tiny_ae, *overrides), env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stats = out / "stats.jsonl"
    deadline = time.time() + 300
    while not (stats.exists() and len(stats.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    # SIGTERM to every rank, as SLURM signals each task of a preempted job (torchrun only runs
    # them here; under SLURM, srun starts the ranks itself)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(int(pid), signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert "preempted by signal" in log, log[-3000:]
    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    step = int(folder.name.split("_")[1])
    assert step >= 3
    state = load_file(str(folder / "model.safetensors"))
    cfg = from_dict(json.loads((folder / "config.json").read_text()))
    Denoiser(cfg.denoiser, (8, 8, 8)).load_state_dict(state, strict=True)
    # the same command, with a reachable end, resumes there and finishes
    done = _train(tmp_path, "sig", tiny_latents, tiny_ae, *overrides[:3], f"train.total_samples={(step + 4) * STEP_SAMPLES}")
    assert f"resumed from step {step}" in (done / "train.log").read_text()
    assert max(_losses(done)) == step + 4


def test_stats_of_a_crashed_run_past_its_checkpoint_are_dropped_on_resume(tmp_path):
    # a run logged at 8, 16 and 24 samples, crashed, and resumes from its 16-sample checkpoint
    (tmp_path / "stats.jsonl").write_text("".join(json.dumps({"samples": n, "loss": 0.5}) + "\n" for n in (8, 16, 24)))
    logger = StatsLogger(tmp_path, Config(), LogConfig(wandb=False), "run", resume_samples=16)
    logger.log({"samples": 24, "loss": 0.25}, step=3)
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["samples"], r["loss"]) for r in records] == [(8, 0.5), (16, 0.5), (24, 0.25)]


def test_wandb_follows_the_environment_where_the_recipe_is_silent(tmp_path, monkeypatch):
    from bld_t2i.tracking import start_wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_wandb(LogConfig(wandb=True), "r", "id1", tmp_path, {}) is None
    logger = StatsLogger(tmp_path / "run", Config(), LogConfig(wandb=True), "id1")
    logger.log({"samples": 1, "loss": 0.5}, step=1)
    logger.close()
    assert not list(tmp_path.rglob("wandb")) and (tmp_path / "run" / "stats.jsonl").is_file()
    # the recipe's explicit mode wins over the environment
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    run = start_wandb(LogConfig(wandb=True, wandb_mode="offline"), "r", "id2", tmp_path / "out", {"a": 1})
    run.finish()
    assert list((tmp_path / "wandb_dir").rglob("offline-run-*")) and not (tmp_path / "out").exists()
