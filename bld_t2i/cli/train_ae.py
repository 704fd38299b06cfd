"""Train the binary autoencoder: `python -m bld_t2i.cli.train_ae --recipe recipes/ae/<name>.yaml [k=v ...]`.

Data parallel over the ranks of torchrun or srun (torch DDP). Rerunning the same command
resumes from the latest checkpoint in `run.out_dir/checkpoints`; SIGUSR1/SIGTERM save a
checkpoint and exit without an export. The loop is bld_t2i/training/loop.py, the step
bld_t2i/training/autoencoder.py.
"""

from __future__ import annotations

from pathlib import Path

from bld_t2i.config import Config, config_from_cli
from bld_t2i.training.autoencoder import SECTIONS, AutoencoderTask
from bld_t2i.training.loop import fit


def train(cfg: Config) -> Path | None:
    """Returns the export folder (EMA weights), or None if preempted."""
    return fit(cfg, AutoencoderTask())


def main(argv=None) -> None:
    cfg = config_from_cli("Train the binary autoencoder (docs/math.md, the autoencoder).", argv, SECTIONS)
    if cfg is not None:
        train(cfg)


if __name__ == "__main__":
    main()
