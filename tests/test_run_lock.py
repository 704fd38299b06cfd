"""The run lock: atomic creation, take-over only from a dead holder, ownership checked on
renewal, before publishing and on release; `fit` lets go of it when it raises."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from bld_t2i.training import lock as run_lock
from bld_t2i.training.lock import LOCK, RunLock, RunLocked, RunLockLost

ROUNDS = 100


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def contender(folder: str, barrier, results) -> None:
    """Each round: wait for the other contender, try the round's lock, report, hold it until both
    reported, release."""
    for n in range(ROUNDS):
        lock = RunLock(os.path.join(folder, f"round{n}"))
        barrier.wait()
        try:
            lock.acquire()
            won = True
        except RunLocked:
            won = False
        results.put((n, os.getpid(), won))
        barrier.wait()  # the winner holds the lock while the loser tries
        if won:
            lock.release()


def test_two_runs_started_together_exactly_one_holds_the_lock(tmp_path):
    """100 rounds of two processes released by a barrier; in every other round the folder holds a
    dead run's lock, which both try to take over."""
    for n in range(1, ROUNDS, 2):
        (tmp_path / f"round{n}").mkdir()
        (tmp_path / f"round{n}" / LOCK).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": dead_pid(), "slurm_job": "", "started": 0}))
    ctx = multiprocessing.get_context("fork")  # lock.py imports the standard library only
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=contender, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes: dict[int, list[bool]] = {}
    for _ in range(2 * ROUNDS):
        n, _, won = results.get(timeout=60)
        outcomes.setdefault(n, []).append(won)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    doubles = [n for n, won in outcomes.items() if sum(won) != 1]
    assert not doubles, f"rounds where not exactly one run held the lock: {doubles}"
    assert not any((tmp_path / f"round{n}" / LOCK).exists() for n in range(ROUNDS))  # each winner released


HOLD = """
import sys, time
from bld_t2i.training.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_holder_of_the_same_slurm_job_is_refused_a_dead_one_is_taken(tmp_path, monkeypatch):
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a second launch inside the same allocation
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        with pytest.raises(RunLocked, match=rf"in use by the run of pid {holder.pid} .*SLURM job 4242"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The same job requeued: the holder's process is gone now, so its folder is taken.
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    lock.release()
    assert not (tmp_path / LOCK).exists()
    # A holder on another node with a fresh heartbeat: refused for the same restart count, taken
    # from the job's earlier incarnation (SLURM requeues a job only after it ended).
    other = {"host": "another-node", "pid": 1, "slurm_job": "4242", "slurm_restart": 0, "started": time.time()}
    (tmp_path / LOCK).write_text(json.dumps(other))
    with pytest.raises(RunLocked, match="another-node"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = RunLock(tmp_path)
    requeued.acquire()
    requeued.release()


def test_a_lost_lock_stops_the_run_and_is_not_released(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.check()  # ours
    thief = {"host": "elsewhere", "pid": 1, "slurm_job": "", "started": time.time(), "token": "thief"}
    (tmp_path / LOCK).write_text(json.dumps(thief))  # another run took the folder
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunLockLost, match="lost its lock .*taken by another run"):
        lock.raise_if_lost()
    with pytest.raises(RunLockLost):
        lock.check()  # before a checkpoint is published
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "thief"  # the other run's lock stays
    assert not any(t.name == "bld-run-lock" for t in threading.enumerate())


def test_fit_releases_its_lock_when_it_raises(tmp_path):
    """A run that fails after taking its folder (here: latent shards that do not exist) leaves no
    lock behind and no heartbeat thread running."""
    from bld_t2i.config import load_config
    from bld_t2i.training.loop import fit
    from bld_t2i.training.t2i import T2ITask

    cfg = load_config("recipes/test/t2i_tiny.yaml", [f"run.out_dir={tmp_path}", f"latents.shards={tmp_path}/none.tar",
                                                    "train.device=cpu"])
    with pytest.raises(FileNotFoundError):
        fit(cfg, T2ITask())
    assert not (tmp_path / LOCK).exists()
    assert not any(t.name == "bld-run-lock" for t in threading.enumerate())
