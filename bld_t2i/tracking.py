"""Rank-0 metrics: a `stats.jsonl` line per log step, and wandb when enabled (offline works)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .config import Config, LogConfig, to_dict


class StatsLogger:
    """Appends JSON lines to `<out_dir>/stats.jsonl`; mirrors them to wandb when enabled.

    Only rank 0 should construct one. `run_id` makes a resumed (or requeued) job continue
    the same wandb run.
    """

    def __init__(self, out_dir: str | Path, cfg: Config, log_cfg: LogConfig, run_id: str):
        self.path = Path(out_dir) / "stats.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if log_cfg.wandb and log_cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=log_cfg.wandb_project,
                name=cfg.run.name,
                id=run_id,
                resume="allow",
                mode=log_cfg.wandb_mode,
                dir=str(out_dir),
                config=to_dict(cfg),
            )

    def log(self, stats: dict, step: int) -> None:
        record = {"time": time.time(), **stats}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in stats.items() if v is not None}, step=step)

    def log_image(self, name: str, path: str | Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
