"""One live run per output folder: `<out_dir>/run.lock`.

Two runs training into one folder would overwrite each other's checkpoints (a rerun
started while the killed run's ranks still live, or the same job submitted twice). Rank 0
holds the lock: a JSON file naming its host, pid and SLURM job, whose modification time a
heartbeat thread renews. Another run takes it over only from a dead holder: the same host
and a pid that no longer runs, the same SLURM job id (a requeue of this job), or no
heartbeat for `STALE_S` (a holder on another node that died).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from bld_t2i.checkpoint import atomic_write_text

LOCK = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 6 * HEARTBEAT_S


class RunLocked(RuntimeError):
    """The output folder belongs to a live run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def holder_is_dead(holder: dict, age_s: float) -> bool:
    if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
        return True  # this job's earlier run: a requeued job resumes its own folder
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder["pid"]))
    return age_s > STALE_S


class RunLock:
    """Acquire with `acquire()` (rank 0), release with `release()`; RunLocked names a live holder."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self._stop = threading.Event()

    def acquire(self) -> None:
        if self.path.exists():
            try:
                holder = json.loads(self.path.read_text())
                age = time.time() - self.path.stat().st_mtime
            except (OSError, ValueError):
                holder, age = {}, STALE_S + 1  # unreadable: a crash mid-write, so no live holder
            if holder and not holder_is_dead(holder, age):
                raise RunLocked(f"{self.path.parent} is in use by the run of pid {holder.get('pid')} on "
                                f"{holder.get('host')} (SLURM job {holder.get('slurm_job') or '-'}, started "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}); "
                                f"stop it first, or train into another run.out_dir (lock: {self.path})")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
              "started": time.time()}
        atomic_write_text(self.path, json.dumps(me))
        threading.Thread(target=self._beat, name="bld-run-lock", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
