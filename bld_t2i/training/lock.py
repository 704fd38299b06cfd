"""One live run per output folder: `<out_dir>/run.lock`.

Two runs training into one folder would overwrite each other's checkpoints (a rerun
started while the killed run's ranks still live, or the same job submitted twice). Rank 0
holds the lock: a JSON file naming its host, pid, SLURM job and a random token, whose
modification time a heartbeat thread renews.

- Creation is atomic: the file is written whole under a temporary name and hard-linked to
  `run.lock`, which fails when one exists, so of two runs started together exactly one wins.
- Another run takes the lock over only from a dead holder: the same host and a pid that no
  longer runs, an earlier incarnation of this SLURM job (a lower SLURM_RESTART_COUNT: SLURM
  requeues a job only after it ended), or no heartbeat for `STALE_S` (a holder on another node
  that died). A second launch inside one allocation shares the job id and restart count, so
  it is judged like any other run. Take-overs are serialised by `run.lock.takeover`, itself
  created by a hard link.
- Ownership is checked on every renewal, before a checkpoint is published (`check`) and on
  release (which removes only our own lock). A heartbeat that cannot renew the lock for long
  enough that another host could judge us dead, or finds another run's token, marks the lock
  lost, and the training loop stops with the error (`raise_if_lost`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LOCK = "run.lock"
TAKEOVER = "run.lock.takeover"
HEARTBEAT_S = 10.0
STALE_S = 6 * HEARTBEAT_S


class RunLocked(RuntimeError):
    """The output folder belongs to a live run."""


class RunLockLost(RuntimeError):
    """This run no longer holds its folder's lock: it must stop before it writes anything."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def holder_is_dead(holder: dict, age_s: float) -> bool:
    """Whether the run that wrote `holder` (its lock `age_s` seconds since the last heartbeat) is gone."""
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", 0)))
    job = holder.get("slurm_job")
    if job and job == os.environ.get("SLURM_JOB_ID") and int(holder.get("slurm_restart", 0)) < _restart_count():
        return True  # this job's earlier incarnation: SLURM requeued it after it ended
    return age_s > STALE_S


def _describe(path: Path, holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"{path.parent} is in use by the run of pid {holder.get('pid')} on {holder.get('host')} (SLURM job "
            f"{holder.get('slurm_job') or '-'}, started {started}); stop it first, or train into another "
            f"run.out_dir (lock: {path})")


def _link_new(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` only if it does not exist (written whole, then hard-linked:
    no reader sees it half written); False when it exists."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """Acquire with `acquire()` (rank 0), release with `release()`; RunLocked names a live holder."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # why the heartbeat found the lock no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict, float] | None:
        """(holder, seconds since its heartbeat), None when there is no lock; a lock that is not a
        JSON object (a crash mid-write of an older version) reads as a holder long dead."""
        try:
            data, age = self.path.read_bytes(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return (holder, age) if isinstance(holder, dict) else ({}, STALE_S + 1)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
              "slurm_restart": _restart_count(), "started": time.time(), "token": self.token}
        data = json.dumps(me).encode()
        if not _link_new(self.path, data):
            self._take_over(data)
        self._thread = threading.Thread(target=self._beat, name="bld-run-lock", daemon=True)
        self._thread.start()

    def _take_over(self, data: bytes) -> None:
        """Replace a dead holder's lock; RunLocked if it is alive or another run is taking it over.
        The holder is judged under the mutex, so that two runs never both replace it."""
        mutex = self.path.with_name(TAKEOVER)
        try:
            if time.time() - mutex.stat().st_mtime > STALE_S:
                mutex.unlink(missing_ok=True)  # left by a run that crashed mid-take-over
        except FileNotFoundError:
            pass
        if not _link_new(mutex, data):
            raise RunLocked(f"{self.path.parent}: another run is taking over its lock right now (lock: {self.path})")
        try:
            found = self._read()
            if found is None:  # released since our first try
                if not _link_new(self.path, data):
                    raise RunLocked(f"{self.path.parent}: another run took the lock first (lock: {self.path})")
                return
            holder, age = found
            if holder and not holder_is_dead(holder, age):
                raise RunLocked(_describe(self.path, holder))
            tmp = self.path.with_name(f".{LOCK}.{self.token}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        finally:
            mutex.unlink(missing_ok=True)

    def owned(self) -> bool:
        found = self._read()
        return found is not None and found[0].get("token") == self.token

    def check(self) -> None:
        """Raise RunLockLost unless the lock file is still ours (before publishing a checkpoint)."""
        self.raise_if_lost()
        if not self.owned():
            self.lost = f"{self.path} no longer names this run"
            self.raise_if_lost()

    def raise_if_lost(self) -> None:
        if self.lost is not None:
            raise RunLockLost(f"stopping: this run lost its lock ({self.lost}); another run may be writing into "
                              f"{self.path.parent}")

    def _beat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.owned():
                    self.lost = f"{self.path} was taken by another run or removed"
                    return
                os.utime(self.path)
                renewed = time.monotonic()
            except OSError as e:
                # A storage hiccup is survived while no other host could judge this run dead.
                if time.monotonic() - renewed > STALE_S - 2 * HEARTBEAT_S:
                    self.lost = f"the heartbeat could not renew {self.path} for {time.monotonic() - renewed:.0f} s: {e}"
                    return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            self.path.unlink(missing_ok=True)
