#!/bin/bash
# Sample an exported model on a prompt sheet and score it (bld_t2i.cli.evaluate), on one GPU.
#
#   sbatch slurm/eval_prompts.sh --model runs/t2i/export --prompts prompts/eval.csv --out runs/t2i/eval
#   bash slurm/eval_prompts.sh --model ... --prompts ... --out ...    # no SLURM: the same, here
#SBATCH --job-name=bld-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this script from its spool folder; the original's path is in the job
# record (an array job's record lists every task: take the first).
here="$(dirname "${BASH_SOURCE[0]}")"
[[ -f "$here/common.sh" ]] || here="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")"
source "$here/common.sh" || exit 1

bld_run_tasks python -m bld_t2i.cli.evaluate "$@"
