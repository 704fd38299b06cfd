"""No orphans, no endless hangs, one run per folder: SIGKILL to torchrun or to one rank of a
real 2-rank DeepSpeed run, and a second run started on a live run's folder."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from bld_t2i.checkpoint import read_latest
from bld_t2i.distributed import LAUNCHER_POLL_S

from t2i_fixtures import train_command, train_env

pytestmark = pytest.mark.slow
ENDLESS = ("train.total_samples=10000000", "train.ckpt_every_samples=64", "train.log_every_samples=16",
           "train.collective_timeout_s=20")
BOUND_S = LAUNCHER_POLL_S + 15  # the watchdog's poll, plus interpreter exit on a loaded machine


def _start(out: Path, lat: str, ae: Path, *overrides: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """torchrun with 2 ranks, once both ranks train (stats.jsonl has lines)."""
    proc = subprocess.Popen(train_command(2, out, lat, ae, *ENDLESS, *overrides), env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((out / "stats.jsonl").exists() and len((out / "stats.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.3)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2, ranks
    return proc, ranks


def test_killed_launcher_leaves_no_rank_and_a_live_run_keeps_its_folder(tmp_path, tiny_latents, tiny_ae):
    out = tmp_path / "run"
    proc, ranks = _start(out, tiny_latents, tiny_ae)
    # a second run on the live run's folder is refused, naming the holder
    second = subprocess.run(train_command(2, out, tiny_latents, tiny_ae, *ENDLESS), env=train_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode != 0
    holder = next(p for p in ranks if p.environ().get("RANK") == "0")
    assert f"is in use by the run of pid {holder.pid}" in second.stdout + second.stderr, second.stderr[-3000:]
    assert proc.poll() is None  # the live run goes on

    proc.kill()  # SIGKILL to torchrun alone: its ranks live in sessions of their own
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=BOUND_S)
    assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher by {BOUND_S} s"
    # the dead holder's lock is taken over: the same command resumes and finishes
    step = int(read_latest(out / "checkpoints").name.split("_")[1])
    end = f"train.total_samples={(step + 2) * 16}"
    done = subprocess.run(train_command(2, out, tiny_latents, tiny_ae, *ENDLESS[1:], end),
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from step {step}:" in done.stdout and (out / "export" / "denoiser" / "model.safetensors").is_file()
    assert not (out / "run.lock").exists()


def test_killed_rank_takes_the_other_down(tmp_path, tiny_latents, tiny_ae):
    proc, ranks = _start(tmp_path / "run", tiny_latents, tiny_ae)
    ranks[1].kill()
    start = time.time()
    _, alive = psutil.wait_procs([ranks[0]], timeout=60)
    assert not alive, "the surviving rank did not exit within 60 s"
    proc.wait(timeout=60)
    assert proc.returncode != 0
    print(f"survivor exited {time.time() - start:.1f} s after its peer was killed")
