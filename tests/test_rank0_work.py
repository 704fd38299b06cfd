"""Rank 0's long work (a universal-checkpoint conversion, cold evaluation caches) outlasting the
collective timeout: the other ranks wait for it without a collective that can time out."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from t2i_fixtures import free_port

TIMEOUT_S, WORK_S = 5.0, 10.0


def rank(r: int, port: int, how: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
    from bld_t2i import distributed as D

    D.init(torch.device("cpu"), timeout_s=TIMEOUT_S)
    start = time.monotonic()
    try:
        if how == "barrier":  # what the code did: rank 0 works, then everyone meets at a barrier
            if r == 0:
                time.sleep(WORK_S)
            D.barrier()
        elif how == "main_work":
            D.main_work(lambda: time.sleep(WORK_S), "ten seconds of work")
            D.barrier()  # the group is still usable
            assert D.all_gather_objects(r) == [0, 1]
        else:  # rank 0's work fails: every rank hears of it
            D.main_work(lambda: 1 / 0, "work that fails")
        results.put((r, "ok", time.monotonic() - start))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((r, f"{type(e).__name__}: {e}", time.monotonic() - start))
    finally:
        if how != "barrier":
            D.teardown()


def run(how: str) -> dict[int, tuple[str, float]]:
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank, args=(r, port, how, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        r, outcome, seconds = results.get(timeout=120)
        out[r] = (outcome, seconds)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_other_ranks_wait_for_rank_0_longer_than_the_collective_timeout():
    control = run("barrier")  # the set-up's 5 s timeout is real: a barrier gives up on rank 0
    assert "ok" not in control[1][0] and control[1][1] < WORK_S, control
    done = run("main_work")
    assert done[0][0] == "ok" and done[1][0] == "ok", done
    assert done[1][1] >= WORK_S  # rank 1 waited the whole 10 s


def test_an_error_in_rank_0_work_reaches_every_rank():
    failed = run("fails")
    assert failed[0][0].startswith("ZeroDivisionError")
    assert failed[1][0] == ("RuntimeError: rank 0 failed while the other ranks waited for it (work that fails): "
                            "ZeroDivisionError: division by zero")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
