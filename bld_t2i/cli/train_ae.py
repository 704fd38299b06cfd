"""Train the binary autoencoder: `python -m bld_t2i.cli.train_ae --recipe recipes/ae/<name>.yaml [k=v ...]`.

Data parallel over the ranks of torchrun or srun (torch DDP). Rerunning the same command
resumes from the latest checkpoint in `run.out_dir/checkpoints`; SIGUSR1/SIGTERM save a
checkpoint and exit without an export. The loop is bld_t2i/training/loop.py, the step
bld_t2i/training/autoencoder.py.
"""

from bld_t2i.training.autoencoder import AutoencoderTask
from bld_t2i.training.loop import fit_from_cli


def main(argv=None) -> None:
    fit_from_cli(AutoencoderTask(), "Train the binary autoencoder (docs/math.md (A1)-(A3)).", argv)


if __name__ == "__main__":
    main()
