"""The autoencoder trainer for real: shards through the real loader, DDP over 2 CPU
ranks (gloo) under torchrun, a SIGKILL and a resume, a preemption signal and a resume,
exact resume, and a short run on real emoji."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from bld_t2i.checkpoint import read_latest
from bld_t2i.cli.train_ae import main
from bld_t2i.config import load_config
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.training.autoencoder import AutoencoderTask
from bld_t2i.training.loop import fit
from bld_t2i.training.schedule import lr_at

from t2i_fixtures import ROOT, free_port, run, train_env

pytestmark = pytest.mark.slow
TINY = ROOT / "recipes" / "ae" / "test_tiny.yaml"
EMOJI = ROOT / "recipes" / "ae" / "emoji64.yaml"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def fit_ae(cfg):
    return fit(cfg, AutoencoderTask())


def _published(ckpts: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a save in progress is a `.tmp` folder)."""
    return sorted(p for p in ckpts.glob("step_*") if not p.name.endswith(".tmp"))


def test_dry_run_prints_the_resolved_recipe(capsys):
    main(["--recipe", str(EMOJI), "--dry-run"])
    printed = capsys.readouterr().out
    assert "autoencoder:" in printed and "preset: ae64" in printed and "val:" in printed


def test_lr_warms_up_and_decays():
    cfg = load_config(TINY, ["optim.warmup_samples=10", "optim.min_lr_ratio=0.1"]).optim
    assert lr_at(cfg, 0, 110) == pytest.approx(cfg.lr / 10)
    assert lr_at(cfg, 10, 110) == pytest.approx(cfg.lr)
    assert lr_at(cfg, 110, 110) == pytest.approx(0.1 * cfg.lr)


def test_resume_continues_exactly(tmp_path, write_image_shards):
    """4 steps in one go == 2 steps, stop, rerun: same stats and the same EMA weights (in bf16)."""
    shards = write_image_shards(str(tmp_path / "data"), 2, 16, size=32)
    common = [f"data.shards={shards}", f"val.shards={shards}", "train.total_samples=16", "train.ckpt_every_samples=8",
              "train.precision=bf16"]
    full = fit_ae(load_config(TINY, [f"run.out_dir={tmp_path / 'full'}", *common]))
    fit_ae(load_config(TINY, [f"run.out_dir={tmp_path / 'split'}", *common, "train.max_steps=2"]))
    assert read_latest(tmp_path / "split" / "checkpoints").name == "step_000000002"
    assert json.loads((read_latest(tmp_path / "split" / "checkpoints") / "trainer.json").read_text())["samples"] == 8
    split = fit_ae(load_config(TINY, [f"run.out_dir={tmp_path / 'split'}", *common]))
    a, b = BinaryAutoencoder.from_pretrained(full), BinaryAutoencoder.from_pretrained(split)
    assert a.weights_sha256 == b.weights_sha256
    train_a = [r for r in _records(tmp_path / "full") if "train/l1" in r]
    train_b = [r for r in _records(tmp_path / "split") if "train/l1" in r]
    assert [r["samples"] for r in train_b] == [8, 16]
    clock = ("time", "samples_per_s", "data_wait_frac")
    for ra, rb in zip(train_a, train_b, strict=True):
        assert {k: v for k, v in ra.items() if k not in clock} == {k: v for k, v in rb.items() if k not in clock}
    assert "train/d_loss" in train_b[-1] and "train/adaptive_weight" in train_b[-1]


def test_two_ranks_are_killed_and_resume(tmp_path, tiny_image_shards):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bld_t2i.cli.train_ae", "--recipe", str(TINY), f"run.out_dir={out}",
           f"data.shards={tiny_image_shards}", f"val.shards={tiny_image_shards}", "train.total_samples=100000",
           "train.sample_every_samples=16"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while not _published(ckpts)[1:] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    # the whole job, mid-run, without warning: torchrun starts each rank in its own session
    job = psutil.Process(proc.pid)
    procs = [job, *job.children(recursive=True)]
    for p in procs:
        p.kill()
    proc.wait()
    assert not psutil.wait_procs(procs, timeout=30)[1]
    assert proc.returncode != 0, (tmp_path / "first.log").read_text()[-3000:]
    latest = read_latest(ckpts)
    assert latest is not None, (tmp_path / "first.log").read_text()[-3000:]
    client = torch.load(latest / "client.pt", weights_only=False)
    state = client["trainer"]
    assert len(client["loader"]) == 2 and len(client["rng"]) == 2 and state["world_size"] == 2
    assert (out / "recon" / "recon-000000000016.png").is_file()

    rerun = cmd[:5] + [f"--master_port={free_port()}"] + cmd[6:]
    done = run(rerun + [f"train.max_steps={state['step'] + 3}", "log.wandb=true"],
               env=train_env(), timeout=300)
    text = done.stdout + done.stderr
    assert f"resumed from step {state['step']}: {latest} at {state['samples']} samples" in text, text[-3000:]
    # progress in a log (no terminal): rank 0's plain line at the end, with rate, ETA and the loss
    shown = re.findall(r"\[train_ae\] \d+/\d+ samples \(\d+%\) [\d.]+ samples/s, elapsed [\d:]+, ETA [\d:]+, l1 [\d.]+",
                       text)
    assert len(shown) == 1, text[-3000:]
    records = [r for r in _records(out) if "train/l1" in r]
    samples = [r["samples"] for r in records]
    assert samples == sorted(set(samples)) and samples[-1] == state["samples"] + 3 * 8
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # rank 0 only, offline
    ae = BinaryAutoencoder.from_pretrained(out / "export")
    assert ae.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 8)


def test_emoji_quick(tmp_path):
    """The emoji recipe for 80 steps at 32 px, sampled bits then the deterministic code: it learns
    beyond the mean image (11.0 dB) on held-out emoji (a looser bar than the 20-minute run's)."""
    data = tmp_path / "emoji"
    run([sys.executable, "data_tools/make_shards.py", "--source", "emoji", "--size", "32", "--limit", "240",
         "--shard-size", "80", "--out", str(data)], timeout=300)
    out = tmp_path / "run"
    cfg = load_config(EMOJI, [f"run.out_dir={out}", f"data.shards={data}/shard-{{000000..000001}}.tar",
                              f"val.shards={data}/shard-000002.tar", "data.image_size=32",
                              "train.total_samples=640", "train.ema_decay=0.9", "val.max_samples=80",
                              "ae_loss.deterministic_start_samples=320", "train.log_every_samples=160"])
    fit_ae(cfg)
    logged = [(r["samples"], r["train/deterministic_codes"]) for r in _records(out) if "train/l1" in r]
    assert logged == [(160, 0.0), (320, 0.0), (480, 1.0), (640, 1.0)]
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["val/images"] == 80
    assert metrics["val/psnr"] >= 12.0 and metrics["val/dead_bits"] <= 0.25, metrics
    assert (out / "recon" / "recon-final.png").is_file()


def test_sigusr1_to_one_rank_checkpoints_both_and_the_rerun_resumes(tmp_path, tiny_image_shards):
    """SLURM's --signal=USR1 ahead of a time limit: the ranks agree on one step, save it, exit 0
    without an export; the same command resumes from there and finishes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bld_t2i.cli.train_ae", "--recipe", str(TINY), f"run.out_dir={out}",
           f"data.shards={tiny_image_shards}", "train.total_samples=100000", "train.ckpt_every_samples=1000000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stats = out / "stats.jsonl"
    deadline = time.time() + 300
    while not (stats.exists() and len(stats.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2, ranks
    rank1 = next(p for p in ranks if "LOCAL_RANK" in p.environ() and p.environ()["LOCAL_RANK"] == "1")
    os.kill(rank1.pid, signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "preempted by signal on another rank" in log, log[-3000:]  # printed by rank 0, signalled rank 1
    saved = _published(out / "checkpoints")
    assert len(saved) == 1 and not (out / "export").exists()
    client = torch.load(saved[0] / "client.pt", weights_only=False)
    state = client["trainer"]
    assert state["samples"] == state["step"] * 8 and len(client["loader"]) == 2

    done = run(cmd[:5] + [f"--master_port={free_port()}"] + cmd[6:] + [f"train.max_steps={state['step'] + 2}"],
               env=train_env(), timeout=300)
    assert f"resumed from step {state['step']}: {saved[0]} at {state['samples']} samples" in done.stdout + done.stderr
    assert BinaryAutoencoder.from_pretrained(out / "export").latent_shape == (8, 8, 8)  # its native 64 px


def test_resume_on_another_world_size(tmp_path, tiny_image_shards):
    """2 ranks for 3 steps, then the same command on 1 process: it resumes the sample count, says
    the world changed, and finishes; the autoencoder keeps its per-rank batch (no accumulation)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bld_t2i.cli.train_ae", "--recipe", str(TINY), f"run.out_dir={out}",
           f"data.shards={tiny_image_shards}", "train.total_samples=80", "train.ckpt_every_samples=1000000"]
    run([*cmd, "train.max_steps=3"], env=train_env(), timeout=300)
    assert json.loads((read_latest(out / "checkpoints") / "trainer.json").read_text())["samples"] == 3 * 8
    one = [*cmd[:3], "--nproc_per_node=1", *cmd[4:5], f"--master_port={free_port()}", *cmd[6:]]
    done = run(one, env=train_env(), timeout=300)
    text = done.stdout + done.stderr
    assert "world size changed: checkpoint written by 2 rank(s), resuming on 1" in text, text[-3000:]
    assert "global batch 8 -> 4 samples a step" in text
    samples = [r["samples"] for r in _records(out) if "train/l1" in r]
    assert samples == sorted(set(samples)) and samples[-1] == 80
    assert BinaryAutoencoder.from_pretrained(out / "export").latent_shape == (8, 8, 8)
