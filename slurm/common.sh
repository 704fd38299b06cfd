# shellcheck shell=bash
# Sourced by every slurm/*.sh. Loads the cluster's env file and provides the two launchers:
#   bld_run_distributed MODULE ARGS...  one process per GPU: srun under SLURM, torchrun otherwise
#   bld_run_tasks PROGRAM ARGS...       the job's tasks (one by default): srun under SLURM, else one process
# Contract with the Python side (slurm/README.md): each rank gets RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR, MASTER_PORT; on preemption it receives SIGUSR1 (SIGTERM when
# SLURM itself ends the job), must save a checkpoint and exit 0; rerunning resumes.

set -eo pipefail

BLD_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file (data_tools/)
BLD_REPO="$(dirname "$BLD_SLURM_DIR")"

# --- cluster specifics (modules, virtual environment, NCCL, paths): one file the user edits.
BLD_ENV_FILE="${BLD_ENV_FILE:-$BLD_SLURM_DIR/env.sh}"
if [[ -f "$BLD_ENV_FILE" ]]; then
  # shellcheck disable=SC1090
  source "$BLD_ENV_FILE"
else
  echo "[bld] no env file $BLD_ENV_FILE (copy slurm/env.example.sh to slurm/env.sh); using $(command -v python)" >&2
fi
BLD_LOG_DIR="${BLD_LOG_DIR:-.}"

bld_under_slurm() { [[ -n "${SLURM_JOB_ID:-}" ]]; }

bld_local_nproc() {
  if [[ -n "${BLD_NPROC:-}" ]]; then
    echo "$BLD_NPROC"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 2  # CPU processes: enough to exercise the distributed code paths
  fi
}

bld_run_tasks() {
  echo "[bld] $(date -u +%FT%TZ) on $(hostname): $*"
  if ! bld_under_slurm; then
    "$@"
    return
  fi
  # Through srun, each task sees its own SLURM_PROCID/SLURM_NTASKS (the batch shell's
  # describe the whole allocation, not one process).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  srun --kill-on-bad-exit=1 --label ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "$@"
}

bld_run_distributed() {
  local module="$1"
  shift
  if ! bld_under_slurm; then
    local nproc
    nproc="$(bld_local_nproc)"
    echo "[bld] no SLURM job: torchrun with $nproc local processes"
    exec torchrun --standalone --nproc_per_node="$nproc" -m "$module" "$@"
  fi

  local restart="${SLURM_RESTART_COUNT:-0}"
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  # Derived from the job id so concurrent jobs sharing a node differ, and from the restart
  # count so a requeued job does not meet its previous run's sockets still in TIME_WAIT.
  MASTER_PORT=$((20000 + (SLURM_JOB_ID * 8 + restart) % 20000))
  export MASTER_ADDR MASTER_PORT
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  mkdir -p "$BLD_LOG_DIR"
  local log="$BLD_LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}-restart${restart}.log"
  echo "[bld] job $SLURM_JOB_ID restart $restart on $SLURM_JOB_NODELIST: master $MASTER_ADDR:$MASTER_PORT, log $log"

  # The batch shell receives USR1 before the time limit (--signal=B:USR1@...) or from
  # `scancel --signal=USR1 [--full]`; it passes the signal on to srun, which forwards it to
  # every rank, waits for the ranks to checkpoint and exit, then requeues the job.
  # TERM (scancel, time limit, SLURM's own preemption) is passed on the same way, but
  # SLURM decides whether such a job comes back (PreemptMode=REQUEUE does).
  BLD_REQUEUE=0
  BLD_SRUN_PID=""
  trap 'BLD_REQUEUE=1; bld_forward USR1' USR1
  trap 'bld_forward TERM' TERM

  # One rank per task slot of the nodes this run actually got. SLURM fixes a job's task
  # count (SLURM_NTASKS) at submission and keeps it across requeues, also when the pending
  # job was shrunk (`scontrol update JobId=J NumNodes=1` after a node was drained): with
  # --ntasks-per-node, launch at most nodes x tasks-per-node, so a checkpoint written on
  # 2 nodes resumes on 1 (the trainer keeps the global batch by raising grad_accum). The
  # minimum keeps an explicit smaller --ntasks (then --ntasks-per-node is only a maximum).
  local ntasks=()
  if [[ "${SLURM_NTASKS_PER_NODE:-}" =~ ^[0-9]+$ && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
    local slots=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))
    ((${SLURM_NTASKS:-$slots} < slots)) && slots=$SLURM_NTASKS
    ntasks=(--ntasks="$slots" --ntasks-per-node="$SLURM_NTASKS_PER_NODE")
  fi

  # srun (22.05) no longer takes --cpus-per-task from the allocation: pass it on.
  # Each task sets the torchrun-style variables from its own SLURM ones, then becomes python
  # (exec), so signals reach python itself.
  # shellcheck disable=SC2016  # expanded by each task's bash, not here
  srun --kill-on-bad-exit=1 --label --output="$log" "${ntasks[@]}" \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec python -m "$@"' \
    bld-rank "$module" "$@" &
  BLD_SRUN_PID=$!

  # `wait` returns early whenever a trapped signal arrives: wait until srun is gone, then
  # read its exit status (bash keeps it).
  while kill -0 "$BLD_SRUN_PID" 2>/dev/null; do wait "$BLD_SRUN_PID" || true; done
  local status=0
  wait "$BLD_SRUN_PID" || status=$?
  echo "[bld] $(date -u +%FT%TZ) ranks exited with status $status"

  if ((BLD_REQUEUE)); then
    echo "[bld] preempted: requeueing job $SLURM_JOB_ID; the next run resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$status"
}

bld_forward() {
  echo "[bld] $(date -u +%FT%TZ) got SIG$1, passing it to the ranks"
  if [[ -n "$BLD_SRUN_PID" ]]; then
    kill -s "$1" "$BLD_SRUN_PID" 2>/dev/null || true
  fi
}
