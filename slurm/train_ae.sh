#!/bin/bash
# Train a binary autoencoder (docs/math.md (A1)-(A3)): one process per GPU on every node of the allocation.
#
#   sbatch [--nodes=4 --partition=... --account=...] slurm/train_ae.sh recipes/ae/emoji64.yaml [section.key=value ...]
#   bash slurm/train_ae.sh recipes/ae/emoji64.yaml ...    # no SLURM: torchrun on the local GPUs (or CPU processes)
#
# Cluster specifics come from the env file (slurm/env.example.sh). Change --ntasks-per-node
# and --gpus-per-node together: one task per GPU. USR1 arrives 5 minutes before the time
# limit; the ranks checkpoint and the job requeues itself, resuming from that checkpoint.
#SBATCH --job-name=bld-ae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this script from its spool folder; the original's path is in the job
# record (an array job's record lists every task: take the first).
here="$(dirname "${BASH_SOURCE[0]}")"
[[ -f "$here/common.sh" ]] || here="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")"
source "$here/common.sh" || exit 1

[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE [section.key=value ...]" >&2; exit 2; }
bld_run_distributed bld_t2i.cli.train_ae --recipe "$1" "${@:2}"
