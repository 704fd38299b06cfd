"""slurm/*.sh on a real two-node SLURM cluster on 127.0.0.1 (tests/slurm_cluster.py).

The signal-path test runs a few-line Python rank through slurm/common.sh; the others run the
real entry points on tiny recipes, submitted with `sbatch` as a user would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_available, slurm_cluster

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not slurm_available(), reason="SLURM daemons not installed (make system-deps)"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def write_env_file(folder: Path, extra: str = "") -> Path:
    """The test cluster's env file: this interpreter's virtual environment, logs in `folder`."""
    env = folder / "env.sh"
    env.write_text(
        f"source {Path(sys.prefix) / 'bin' / 'activate'}\n"
        f"export BLD_LOG_DIR={folder / 'logs'}\n"
        f"{extra}"
    )
    return env


def read_log(folder: Path, pattern: str) -> str:
    files = sorted((folder / "logs").glob(pattern))
    assert files, f"no log {pattern} in {folder / 'logs'}: {os.listdir(folder / 'logs')}"
    return "\n".join(f"=== {p.name}\n{p.read_text()}" for p in files)


def wait_for_text(path_glob: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in p.read_text(errors="replace") for p in path_glob.parent.glob(path_glob.name)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"'{text}' did not appear in {path_glob} within {timeout:.0f} s")


# A stand-in rank: reports its rendezvous variables, counts the signals it receives, and
# "checkpoints" its step so that a requeued run resumes from it.
STANDIN_RANK = '''
import json, os, signal, sys, time
from pathlib import Path

got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda num, frame: got.append(signal.Signals(num).name))
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
state = out / f"rank{rank}.json"
step = json.loads(state.read_text())["step"] if state.exists() else 0
env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
print("env", json.dumps(env), "resume", step, flush=True)
(out / f"started{rank}").touch()
while step < int(sys.argv[2]) and not got:
    time.sleep(0.05)
    step += 1
time.sleep(0.5)  # a late duplicate of the signal would show up in `got`
state.write_text(json.dumps({"step": step}))
print("exit at step", step, "signals", ",".join(got) or "none", flush=True)
'''


def test_batch_shell_signal_reaches_every_rank_and_requeues(cluster, tmp_path):
    """USR1 to the batch shell only (what `--signal=B:USR1@N` does before the time limit)
    reaches each rank exactly once through srun; the job requeues itself and resumes."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "standin_rank.py").write_text(STANDIN_RANK)
    env_file = write_env_file(tmp_path, f"export PYTHONPATH={tmp_path}\n")
    job_script = tmp_path / "job.sh"
    job_script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        source {SLURM / 'common.sh'}
        bld_run_distributed standin_rank {tmp_path} 60
        """))
    job = cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--requeue", "--open-mode=append",
         f"--output={tmp_path / 'logs' / '%x-%j.out'}", "--job-name=standin", str(job_script)],
        env={"BLD_ENV_FILE": str(env_file)}, cwd=tmp_path,
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"started{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, read_log(tmp_path, "*") + cluster.daemon_logs()
        time.sleep(0.1)
    cluster.scancel("--signal=USR1", "--batch", job)

    (record,) = cluster.wait(job, timeout=60, states={"COMPLETED", "FAILED", "CANCELLED"})
    logs = read_log(tmp_path, "*")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{logs}"

    first = read_log(tmp_path, f"standin-{job}-restart0.log")
    for rank in (0, 1):
        env = re.search(rf"^{rank}: env (\{{.*\}})", first, re.M)
        assert env, first
        assert f'"RANK": "{rank}"' in env[1] and '"WORLD_SIZE": "2"' in env[1] and '"LOCAL_RANK": "0"' in env[1]
        assert '"MASTER_ADDR": "n1"' in env[1], env[1]
        stopped = re.search(rf"^{rank}: exit at step (\d+) signals (\S+)", first, re.M)
        assert stopped and stopped[2] == "SIGUSR1", f"rank {rank} should see SIGUSR1 exactly once:\n{first}"
        assert 0 < int(stopped[1]) < 60
        second = read_log(tmp_path, f"standin-{job}-restart1.log")
        assert re.search(rf"^{rank}: env .* resume {stopped[1]}$", second, re.M), second
        assert re.search(rf"^{rank}: exit at step 60 signals none", second, re.M), second
    assert "requeueing job" in read_log(tmp_path, f"standin-{job}.out")


def test_dead_rank_ends_the_job(cluster, tmp_path):
    """One rank failing ends the job (srun --kill-on-bad-exit) instead of leaving the other
    rank blocked, and the job reports the failure."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "crashing_rank.py").write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.exit('rank 1: simulated crash')\n"
        "time.sleep(120)  # rank 0 would wait for rank 1 forever in a collective\n"
    )
    env_file = write_env_file(tmp_path, f"export PYTHONPATH={tmp_path}\n")
    job_script = tmp_path / "job.sh"
    job_script.write_text(f"#!/bin/bash\nsource {SLURM / 'common.sh'}\nbld_run_distributed crashing_rank\n")
    start = time.monotonic()
    job = cluster.sbatch(
        ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path / 'logs' / '%x-%j.out'}",
         "--job-name=crash", str(job_script)],
        env={"BLD_ENV_FILE": str(env_file)}, cwd=tmp_path,
    )
    (record,) = cluster.wait(job, timeout=60)
    logs = read_log(tmp_path, "*")
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", f"{record}\n{logs}"
    assert time.monotonic() - start < 30, logs
    assert "simulated crash" in logs


def sample_keys(tar_path: Path) -> list[str]:
    """The sample keys of a WebDataset shard, one per sample (`key.ext` members grouped)."""
    with tarfile.open(tar_path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return list(dict.fromkeys(n.split(".", 1)[0] for n in names))


def test_encode_latents_array_job_encodes_every_sample_once(cluster, tmp_path):
    """An array of 2 tasks splits 5 image shards; together they encode each sample once."""
    from PIL import Image

    from bld_t2i.config import AutoencoderConfig
    from bld_t2i.models.binary_ae import BinaryAutoencoder

    images = tmp_path / "images"
    images.mkdir()
    for i in range(13):
        Image.new("RGB", (20, 20), (19 * i, 255 - 19 * i, 7 * i)).save(images / f"img{i:02d}.png")
        (images / f"img{i:02d}.txt").write_text(f"a square of colour {i}")
    subprocess.run([sys.executable, str(REPO / "data_tools" / "make_shards.py"), "--source", "folder",
                    "--input", str(images), "--out", str(tmp_path / "shards"), "--shard-size", "3"],
                   check=True, capture_output=True)
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert len(shards) == 5
    BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", resolution=16)).save_pretrained(tmp_path / "ae")

    (tmp_path / "logs").mkdir()
    env_file = write_env_file(tmp_path)
    job = cluster.sbatch(
        ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path / 'logs' / '%x-%A_%a.out'}",
         str(SLURM / "encode_latents.sh"), "--shards", str(tmp_path / "shards" / "shard-{000000..000004}.tar"),
         "--autoencoder", str(tmp_path / "ae"), "--out", str(tmp_path / "latents"), "--batch-size", "2"],
        env={"BLD_ENV_FILE": str(env_file)}, cwd=tmp_path,
    )
    records = cluster.wait(job, timeout=90)
    logs = read_log(tmp_path, "*")
    assert [r["JobState"] for r in records] == ["COMPLETED", "COMPLETED"], f"{records}\n{logs}"
    assert re.search(r"rank 0/2: done", logs) and re.search(r"rank 1/2: done", logs), logs

    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["total"] == 13 and len(manifest["shards"]) == 5, manifest
    encoded = [k for s in sorted((tmp_path / "latents").glob("latents-*.tar")) for k in sample_keys(s)]
    source = [k for s in shards for k in sample_keys(s)]
    assert len(source) == 13
    assert sorted(encoded) == sorted(source), "every sample exactly once"
