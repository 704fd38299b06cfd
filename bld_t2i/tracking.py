"""Rank-0 metrics: a `stats.jsonl` line per log step, and wandb when enabled (offline works)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .checkpoint import atomic_write_text
from .config import Config, LogConfig, to_dict

log = logging.getLogger("bld_t2i.tracking")


def start_wandb(log_cfg: LogConfig, name: str, run_id: str | None, out_dir: str | Path, config: dict, group: str = "",
                job_type: str | None = None):
    """The one wandb start-up: the recipe's log section where set, else the environment's
    WANDB_MODE / WANDB_PROJECT / WANDB_DIR, else offline, "bld_t2i" and the run folder.
    Returns the run, or None when the mode is disabled."""
    mode = log_cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=log_cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "bld_t2i", name=name,
                      id=run_id, resume="allow", mode=mode, dir=os.environ.get("WANDB_DIR") or str(out_dir),
                      config=config, group=group or None, job_type=job_type)


class StatsLogger:
    """Appends JSON lines to `<out_dir>/stats.jsonl`; mirrors them to wandb when enabled.

    Only rank 0 should construct one. `run_id` makes a resumed (or requeued) job continue
    the same wandb run; `resume_samples` (the checkpoint's sample count) drops the lines a
    crashed run wrote after that checkpoint, since the resumed run writes them again.
    """

    def __init__(self, out_dir: str | Path, cfg: Config, log_cfg: LogConfig, run_id: str, resume_samples: int = 0):
        self.path = Path(out_dir) / "stats.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._trim(resume_samples)
        self.wandb = start_wandb(log_cfg, cfg.run.name, run_id, out_dir, to_dict(cfg)) if log_cfg.wandb else None

    def _trim(self, samples: int) -> None:
        """Keep the lines up to the checkpoint's sample count; a line that is not a JSON object
        (torn by a full disk or a node crash mid-write) is dropped with a warning."""
        if not self.path.exists():
            return
        kept = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line else None
            except ValueError:
                record = None
            if not isinstance(record, dict):
                if line:
                    log.warning("%s line %d is not a JSON record (a write cut short?): dropped", self.path, n)
                continue
            if record.get("samples", 0) <= samples:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

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
