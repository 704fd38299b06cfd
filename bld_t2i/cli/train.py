"""Train a Bernoulli diffusion denoiser on pre-encoded latents under DeepSpeed ZeRO.

    python -m bld_t2i.cli.train --recipe recipes/<name>.yaml [section.key=value ...]
    torchrun --nproc_per_node=N -m bld_t2i.cli.train ...   |   srun ... (see slurm/train_t2i.sh)

Rerunning the same command resumes from the latest checkpoint in `run.out_dir`, on any
number of ranks; SIGUSR1/SIGTERM (SLURM preemption) save a checkpoint and exit cleanly.
The loop is bld_t2i/training/loop.py, the step bld_t2i/training/t2i.py.
"""

from bld_t2i.training.loop import fit_from_cli
from bld_t2i.training.t2i import T2ITask


def main(argv=None) -> None:
    fit_from_cli(T2ITask(), "Train a text-conditioned Bernoulli diffusion model under DeepSpeed ZeRO.", argv)


if __name__ == "__main__":
    main()
