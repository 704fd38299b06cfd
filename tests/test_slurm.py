"""slurm/*.sh on a real two-node SLURM cluster on 127.0.0.1 (tests/slurm_cluster.py).

The signal-path test runs a few-line Python rank through slurm/common.sh; the others run the
real entry points on tiny recipes, submitted with `sbatch` as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from bld_t2i.checkpoint import read_latest

from slurm_cluster import slurm_cluster
from t2i_fixtures import TINY_RECIPE

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def write_env_file(folder: Path, extra: str = "") -> Path:
    """The test cluster's env file: this interpreter's virtual environment, logs in `folder`."""
    # DeepSpeed JIT-builds its CPU op with the first `ninja` on PATH. The venv's (pip) ninja
    # and the system's write incompatible build logs, so a build by one makes the other
    # rebuild from scratch: the jobs use the same ninja as the rest of this test session.
    tools = folder / "bin"
    tools.mkdir(exist_ok=True)
    ninja = shutil.which("ninja")
    if ninja:
        (tools / "ninja").symlink_to(ninja)
    env = folder / "env.sh"
    env.write_text(
        f"source {Path(sys.prefix) / 'bin' / 'activate'}\n"
        f"export PATH={tools}:$PATH\n"
        f"export BLD_LOG_DIR={folder / 'logs'}\n"
        # As `make test` sets it: DeepSpeed's JIT-compiled CPU op is built once and reused.
        f"export TORCH_EXTENSIONS_DIR=${{TORCH_EXTENSIONS_DIR:-{Path(sys.prefix) / 'torch_extensions'}}}\n"
        "export WANDB_MODE=offline\n"
        f"{extra}"
    )
    return env


def wait_job(cluster, job: str, folder: Path, timeout: float, states=None) -> list[dict[str, str]]:
    """cluster.wait, with the job's logs in the error when it does not finish in time."""
    try:
        return cluster.wait(job, timeout, **({"states": states} if states else {}))
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{read_log(folder, '*')}") from None


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
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in path_glob.parent.glob("*"))
    raise TimeoutError(f"'{text}' did not appear in {path_glob} within {timeout:.0f} s:\n{logs}")


def test_every_script_parses_and_names_existing_entry_points():
    """Every slurm/*.sh is valid bash and every module or tool it starts exists."""
    import importlib.util

    scripts = sorted(SLURM.glob("*.sh"))
    assert {p.name for p in scripts} >= {"train_t2i.sh", "train_ae.sh", "encode_latents.sh", "eval_prompts.sh"}
    for script in scripts:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
        text = script.read_text()
        for module in re.findall(r"\b(bld_t2i\.\w+)", text):
            assert importlib.util.find_spec(module) is not None, f"{script.name} runs missing module {module}"
        for tool in re.findall(r"(data_tools/\w+\.py)", text):
            assert (REPO / tool).is_file(), f"{script.name} runs missing {tool}"


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

    (record,) = wait_job(cluster, job, tmp_path, 60, states={"COMPLETED", "FAILED", "CANCELLED"})
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
    (record,) = wait_job(cluster, job, tmp_path, 60)
    logs = read_log(tmp_path, "*")
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", f"{record}\n{logs}"
    assert time.monotonic() - start < 30, logs
    assert "simulated crash" in logs


def sample_keys(tar_path: Path) -> list[str]:
    """The sample keys of a WebDataset shard, one per sample (`key.ext` members grouped)."""
    with tarfile.open(tar_path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return list(dict.fromkeys(n.split(".", 1)[0] for n in names))


def test_encode_latents_array_job_encodes_every_sample_once(cluster, tmp_path, tiny_ae, write_image_shards):
    """An array of 2 tasks splits 5 image shards; together they encode each sample once."""
    spec = write_image_shards(str(tmp_path / "images"), num_shards=5, per_shard=3)
    (tmp_path / "logs").mkdir()
    env_file = write_env_file(tmp_path)
    job = cluster.sbatch(
        ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path / 'logs' / '%x-%A_%a.out'}",
         str(SLURM / "encode_latents.sh"), "--shards", spec, "--autoencoder", str(tiny_ae),
         "--out", str(tmp_path / "latents"), "--batch-size", "2"],
        env={"BLD_ENV_FILE": str(env_file)}, cwd=tmp_path,
    )
    records = wait_job(cluster, job, tmp_path, 90)
    logs = read_log(tmp_path, "*")
    assert [r["JobState"] for r in records] == ["COMPLETED", "COMPLETED"], f"{records}\n{logs}"
    assert re.search(r"rank 0/2: done", logs) and re.search(r"rank 1/2: done", logs), logs

    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["total"] == 15 and len(manifest["shards"]) == 5, manifest
    encoded = [k for s in sorted((tmp_path / "latents").glob("latents-*.tar")) for k in sample_keys(s)]
    source = [k for s in sorted((tmp_path / "images").glob("img-*.tar")) for k in sample_keys(s)]
    assert len(source) == 15
    assert sorted(encoded) == sorted(source), "every sample exactly once"


# ----------------------------------------------------------------------------- the real trainer

# 2 nodes x 1 rank x 8 samples: 16 samples per step.
TRAIN_SAMPLES = 768
TRAIN_STEPS = TRAIN_SAMPLES // 16


def submit_training(cluster, folder: Path, latents: str, ae: Path, *overrides: str) -> str:
    """`sbatch slurm/train_t2i.sh` on the tiny recipe, 2 nodes x 1 task, one (fake) GPU each."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    env_file = write_env_file(folder, "export OMP_NUM_THREADS=1\n")
    return cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
         f"--output={folder / 'logs' / '%x-%j.out'}", str(SLURM / "train_t2i.sh"), str(TINY_RECIPE),
         f"run.out_dir={folder / 'run'}", f"latents.shards={latents}", f"autoencoder.path={ae}",
         f"train.total_samples={TRAIN_SAMPLES}", "train.ckpt_every_samples=512", "train.log_every_samples=64",
         *overrides],
        env={"BLD_ENV_FILE": str(env_file)}, cwd=folder,
    )


def final_step(run: Path) -> int:
    lines = (run / "stats.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["step"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_latents, tiny_ae):
    """One uninterrupted 2-node training job: (folder, job id, its scontrol record)."""
    folder = tmp_path_factory.mktemp("train_uninterrupted")
    job = submit_training(cluster, folder, tiny_latents, tiny_ae)
    (record,) = wait_job(cluster, job, folder, 300)  # the first DeepSpeed job of a session JIT-builds its CPU op
    return folder, job, record


def test_train_t2i_two_nodes_completes(uninterrupted):
    folder, job, record = uninterrupted
    logs = read_log(folder, "*")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "0", f"{record}\n{logs}"
    ranks = read_log(folder, f"bld-t2i-{job}-restart0.log")
    assert re.search(r"^0: .*world size 2", ranks, re.M), ranks
    assert re.search(r"^1: ", ranks, re.M), f"no line from rank 1:\n{ranks}"
    latest = read_latest(folder / "run" / "checkpoints")
    assert latest is not None and (latest / "model.safetensors").is_file(), logs
    for rank in (0, 1):  # each rank wrote its ZeRO-2 optimizer partition
        assert (latest / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), sorted(latest.iterdir())
    assert final_step(folder / "run") == TRAIN_STEPS


def test_train_t2i_preempted_requeues_and_resumes(cluster, tmp_path, tiny_latents, tiny_ae, uninterrupted):
    """`scancel --signal=USR1 --full` mid-run: checkpoint, requeue, resume the same (offline)
    wandb run, same final step."""
    job = submit_training(cluster, tmp_path, tiny_latents, tiny_ae, "log.wandb=true", "log.wandb_mode=offline")
    first_log = tmp_path / "logs" / f"bld-t2i-{job}-restart0.log"
    wait_for_text(first_log, "[train] step", timeout=240)
    cluster.scancel("--signal=USR1", "--full", job)

    (record,) = wait_job(cluster, job, tmp_path, 180, states={"COMPLETED", "FAILED", "CANCELLED"})
    logs = read_log(tmp_path, "*")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{logs}"
    first = first_log.read_text()
    stopped = re.search(r"preempted by signal \d+ at step (\d+); checkpoint saved", first)
    assert stopped and 0 < int(stopped[1]) < TRAIN_STEPS, first
    second = read_log(tmp_path, f"bld-t2i-{job}-restart1.log")
    assert f"resumed from step {stopped[1]}" in second, second
    assert final_step(tmp_path / "run") == final_step(uninterrupted[0] / "run") == TRAIN_STEPS
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))  # offline-run-<time>-<run id>
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def wait_requeued(cluster, job: str, folder: Path, timeout: float) -> dict[str, str]:
    """The job's record once its batch shell has requeued it (pending, one restart)."""
    deadline = time.monotonic() + timeout
    while True:
        (record,) = cluster.jobs(job)
        if record["JobState"] == "PENDING" and record["Restarts"] == "1":
            return record
        assert record["JobState"] not in {"COMPLETED", "FAILED", "CANCELLED"}, f"{record}\n{read_log(folder, '*')}"
        assert time.monotonic() < deadline, f"job {job} not requeued in {timeout:.0f} s: {record}\n{read_log(folder, '*')}"
        time.sleep(0.2)


def test_train_t2i_preempted_on_two_nodes_resumes_on_one(cluster, tmp_path, tiny_latents, tiny_ae):
    """A 2-node job loses a node: n2 is drained, USR1 preempts the job, which checkpoints and
    requeues itself; the operator shrinks the pending job to 1 node (SLURM keeps a job's node
    count across a requeue; a node range cannot help once --ntasks-per-node is set, since
    sbatch then fixes the task count at min nodes x tasks per node). The second run is 1
    rank: it loads the 2-rank ZeRO-2 checkpoint through DeepSpeed's universal form, keeps the
    global batch with grad_accum 2, finishes on the recipe's last step and exports."""
    job = submit_training(cluster, tmp_path, tiny_latents, tiny_ae)
    first_log = tmp_path / "logs" / f"bld-t2i-{job}-restart0.log"
    wait_for_text(first_log, "[train] step", timeout=240)
    with cluster.drained("n2"):
        assert cluster.node_state("n2") == "drng", cluster.node_state("n2")  # draining: the job still runs there
        cluster.scancel("--signal=USR1", "--full", job)
        wait_requeued(cluster, job, tmp_path, 120)
        # All three, as SLURM 22.05 keeps each: NumNodes alone leaves 2 tasks at 1 per node,
        # and without NumCPUs the job's 2 minimum CPUs make it "never runnable".
        cluster.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1", "NumCPUs=1")
        (record,) = wait_job(cluster, job, tmp_path, 180, states={"COMPLETED", "FAILED", "CANCELLED"})
    logs = read_log(tmp_path, "*")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{logs}"
    assert record["NodeList"] == "n1" and record["NumNodes"] == "1", record

    first = first_log.read_text()
    assert re.search(r"^0: .*world size 2", first, re.M) and re.search(r"^1: ", first, re.M), first
    stopped = re.search(r"preempted by signal \d+ at step (\d+); checkpoint saved \((\d+) samples\)", first)
    assert stopped and 0 < int(stopped[1]) < TRAIN_STEPS, first
    second = read_log(tmp_path, f"bld-t2i-{job}-restart1.log")
    assert not re.search(r"^1: ", second, re.M), f"the second run should have one rank:\n{second}"
    assert "[train] world size changed: checkpoint written by 2 rank(s), resuming on 1" in second, second
    assert re.search(r"^0: .*world size 1;.*grad_accum 2", second, re.M), second
    assert re.search(rf"resumed from step {stopped[1]}: \S+ at {stopped[2]} samples", second), second
    assert (tmp_path / "run" / "export" / "denoiser" / "model.safetensors").is_file(), sorted((tmp_path / "run").iterdir())
    latest = read_latest(tmp_path / "run" / "checkpoints")  # written by the 1-rank run: one ZeRO partition
    assert (latest / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file(), sorted(latest.iterdir())
    assert not (latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists(), sorted(latest.iterdir())
    assert final_step(tmp_path / "run") == TRAIN_STEPS
    assert json.loads((tmp_path / "run" / "stats.jsonl").read_text().splitlines()[-1])["samples"] == TRAIN_SAMPLES


def test_train_t2i_without_slurm_falls_back_to_torchrun(tmp_path, tiny_latents, tiny_ae):
    """`bash slurm/train_t2i.sh RECIPE` on a machine without SLURM: torchrun, 2 CPU ranks."""
    env_file = write_env_file(tmp_path, "export OMP_NUM_THREADS=1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(BLD_ENV_FILE=str(env_file), BLD_NPROC="2")
    proc = subprocess.run(
        ["bash", str(SLURM / "train_t2i.sh"), str(TINY_RECIPE), f"run.out_dir={tmp_path / 'run'}",
         f"latents.shards={tiny_latents}", f"autoencoder.path={tiny_ae}", "train.total_samples=64"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "torchrun with 2 local processes" in out and "world size 2" in out, out[-4000:]
    latest = read_latest(tmp_path / "run" / "checkpoints")
    assert latest is not None and (latest / "model.safetensors").is_file()
    assert final_step(tmp_path / "run") == 64 // 16
