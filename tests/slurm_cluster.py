"""A real SLURM 22.05 cluster on 127.0.0.1 for the tests, from Debian's packages.

`munged`, `slurmctld` and one `slurmd` per node run in the foreground as children of the
test process, with every file (key, socket, config, state, spool, logs) in one temporary
folder; they are stopped by the process ids this module started. Client commands find the
cluster through `SLURM_CONF`, which `SlurmCluster.env` carries (sbatch passes it on to jobs).

Facts this layout relies on (measured on Debian 12 containers):
- `munged` as root needs `--force`; its socket lives in the temp folder (`AuthInfo=socket=`).
- No cgroups in a container: `proctrack/linuxproc`, `task/none`.
- Debian builds slurmd with multiple-slurmd support, so nodes n1, n2 are two slurmd
  processes on one host (`slurmd -N n1`, distinct ports and spool folders). Jobs use the
  node names as host names (MASTER_ADDR), so n1, n2 must resolve to 127.0.0.1.
- `AuthInfo=cred_expire=10` shortens the wait before a requeued job starts again (SLURM
  holds a requeued job for the credential lifetime).
- Fake GPUs for `--gpus-per-node`: a gres whose `File=` entries are symlinks to /dev/null.
- There is no accounting database: ask `scontrol show job`, not `sacct`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from t2i_fixtures import free_port

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                   "PREEMPTED"}


def ensure_hosts(names: list[str]) -> None:
    """Make the node names resolve to 127.0.0.1 by adding one line to /etc/hosts.

    This changes the machine (CI runs as root in a throw-away container); it is idempotent
    and only ever adds names that do not resolve yet.
    """
    missing = []
    for name in names:
        try:
            if socket.gethostbyname(name) != "127.0.0.1":
                raise RuntimeError(f"node name {name} resolves to {socket.gethostbyname(name)}, not 127.0.0.1")
        except socket.gaierror:
            missing.append(name)
    if missing:
        try:
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {' '.join(missing)}  # bld_t2i tests/slurm_cluster.py\n")
        except PermissionError:
            raise RuntimeError(f"the test cluster's node names must resolve to 127.0.0.1: add "
                               f"'127.0.0.1 {' '.join(missing)}' to /etc/hosts (needs root)") from None


class SlurmCluster:
    """Handle on a running local cluster: submit, inspect and wait for jobs."""

    def __init__(self, root: Path, nodes: list[str], gpus_per_node: int, cpus_per_node: int):
        self.root = root
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self.cpus_per_node = cpus_per_node
        self.conf = root / "slurm.conf"
        # Variables of an enclosing SLURM job (CI may itself run under SLURM) must not leak
        # into this cluster's commands.
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        self.env = {**clean, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------------ set-up

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "gpu"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus_per_node):
            gpu = r / "gpu" / f"nvidia{i}"
            if not gpu.exists():
                gpu.symlink_to("/dev/null")
        node_lines = [
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 Gres=gpu:{self.gpus_per_node} State=UNKNOWN"
            for n in self.nodes
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=bldtest",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge.socket'},cred_expire=10",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}/%n",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd'}.%n.pid",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log'}/slurmd.%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/builtin",
                    # A requeued job becomes eligible after cred_expire; the main scheduling
                    # loop (60 s by default) must look again soon after.
                    "SchedulerParameters=sched_interval=1",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "GresTypes=gpu",
                    "KillWait=10",
                    "MinJobAge=600",
                    *node_lines,
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        gpus = f"nvidia[0-{self.gpus_per_node - 1}]" if self.gpus_per_node > 1 else "nvidia0"
        (r / "gres.conf").write_text(f"Name=gpu File={r / 'gpu'}/{gpus}\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self._procs.append((name, proc))

    def start(self, timeout: float = 30.0) -> None:
        missing = [p for p in (*DAEMONS, "sbatch", "srun", "scontrol") if shutil.which(p) is None]
        if missing:
            raise FileNotFoundError(f"SLURM/munge programs not found: {missing}; install them with `make system-deps`")
        self._write_config()
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "/usr/sbin/munged", "--foreground", "--force",  # --force: running as root
                f"--socket={self.root / 'munge.socket'}", f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: (self.root / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd.{node}", ["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, "nodes idle")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                       f"logs in {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"SLURM cluster: no {what} after {timeout:.0f} s; logs in {self.root / 'log'}")

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def stop(self) -> None:
        """Cancel this cluster's jobs, let their steps end, then stop our daemons by pid."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._procs):
            user = pwd.getpwuid(os.getuid()).pw_name
            subprocess.run(["scancel", "--full", "--user", user], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._active_jobs():
                time.sleep(0.5)
        for _name, proc in reversed(self._procs):  # slurmd before slurmctld before munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    def _active_jobs(self) -> bool:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and bool(out.stdout.strip())

    # ------------------------------------------------------------------ jobs

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of a job: an array job lists one per task."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip()}")
        return [self._parse(line) for line in out.stdout.splitlines() if line.strip()]

    @staticmethod
    def _parse(line: str) -> dict[str, str]:
        # `Key=value` pairs (a job's command-line arguments may add a few stray keys).
        return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", line))

    def wait(self, job_id: str, timeout: float, states=FINISHED_STATES) -> list[dict[str, str]]:
        """Poll until every record of the job is in `states` (`sbatch --wait` returns late)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in states for r in records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {[r['JobState'] for r in records]} after {timeout:.0f} s")
            time.sleep(0.5)

    def scancel(self, *args: str) -> None:
        out = subprocess.run(["scancel", *args], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(args)} failed: {out.stderr.strip()}")

    def scontrol(self, *args: str) -> str:
        out = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def node_state(self, node: str) -> str:
        """sinfo's state of one node, e.g. `idle`, `alloc`, `drng` (draining), `drain`."""
        out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.stdout.strip()

    @contextmanager
    def drained(self, node: str):
        """Drain `node` (running jobs finish, nothing new starts there), then return it to service.

        The cluster is shared by a module's tests: the node must be idle again afterwards.
        """
        self.scontrol("update", f"NodeName={node}", "State=DRAIN", "Reason=bld_t2i test")
        try:
            yield
        finally:
            self.scontrol("update", f"NodeName={node}", "State=RESUME")
            self._wait_for(lambda: self.node_state(node) in {"idle", "mix", "alloc"}, 30, f"{node} back in service")

    def daemon_logs(self) -> str:
        """The tail of every daemon log, for assertion messages."""
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


@contextmanager
def slurm_cluster(root: Path, nodes: tuple[str, ...] = ("n1", "n2"), gpus_per_node: int = 2, cpus_per_node: int = 2):
    """Start a cluster in `root`, yield its handle, and stop exactly what was started."""
    ensure_hosts(list(nodes))
    cluster = SlurmCluster(Path(root), list(nodes), gpus_per_node, cpus_per_node)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
