#!/bin/bash
# Encode image shards into bit-packed latent shards: an array job, each task takes its share
# of the shards (data_tools/encode_latents.py splits the shard list by task index, and
# again among the task's processes when --ntasks > 1).
#
#   sbatch --array=0-15 slurm/encode_latents.sh --shards 's3://bucket/img-{0000..0999}.tar' \
#       --autoencoder runs/ae64/export --out s3://bucket/lat64
#   bash slurm/encode_latents.sh --shards ... --autoencoder ... --out ...   # no SLURM: all shards, one process
#
# The array must be contiguous (0-N or 0-N%K). A failed task is rerun with the same
# --array index; shards already written are skipped.
#SBATCH --job-name=bld-encode
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

# sbatch runs a copy of this script from its spool folder; the original's path is in the job
# record (an array job's record lists every task: take the first).
here="$(dirname "${BASH_SOURCE[0]}")"
[[ -f "$here/common.sh" ]] || here="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")"
source "$here/common.sh" || exit 1

part=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  part=(--array-index "$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))" --array-count "$SLURM_ARRAY_TASK_COUNT")
fi
# The task's share goes first: encode_latents.py ends with positional recipe overrides.
bld_run_tasks python "$BLD_REPO/data_tools/encode_latents.py" "${part[@]}" "$@"
