# shellcheck shell=bash
# Cluster specifics for slurm/*.sh. Copy to slurm/env.sh (or point BLD_ENV_FILE at your copy)
# and edit. Every slurm/*.sh sources it inside the job before starting python.
#
# Partition, account and QOS are read by sbatch itself at submission, so also source this
# file in the shell you submit from (or pass -p/-A/-q on the sbatch command line):
#   source slurm/env.sh && sbatch slurm/train_t2i.sh recipes/t2i_256.yaml
export SBATCH_PARTITION=gpu
export SBATCH_ACCOUNT=my_project
# export SBATCH_QOS=normal

# Software: modules, then the virtual environment made by `make setup` (or conda activate).
# module purge
# module load cuda/12.4 gcc/12
source /path/to/bld_t2i/.venv/bin/activate

# NCCL: name the fast network; leave unset to let NCCL pick.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
# export NCCL_DEBUG=INFO

# Paths: per-rank logs (job id and restart count in the name), caches on fast local disk.
export BLD_LOG_DIR=logs
export TORCH_EXTENSIONS_DIR=$VIRTUAL_ENV/torch_extensions  # one per venv: its build names the venv's paths
export HF_HOME=/path/to/shared/hf_cache
export HF_HUB_OFFLINE=1
# wandb: online on clusters with internet on the compute nodes, offline elsewhere (sync later).
export WANDB_MODE=offline
export WANDB_DIR=/path/to/shared/wandb
