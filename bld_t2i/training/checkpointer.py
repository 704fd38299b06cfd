"""One checkpoint layout for both trainers, with two backends for the training states.

    <out_dir>/checkpoints/step_000000123/   one folder per checkpoint, written as `.tmp`
        client.pt                             trainer state, data positions and RNG of every rank, config
                                              (tensors and plain data: loaded with weights_only=True)
        COMPLETE                              written last: the folder is whole
        trainer.json                          the trainer state, readable
        model.safetensors, config.json        the consolidated EMA weights (the export)
        <backend files>                       DeepSpeed: the engine's shards, written by every rank;
                                              torch: states.pt, the named modules and optimizers (rank 0)
    <out_dir>/checkpoints/latest              names the newest complete folder

A folder is renamed into place only once every file is written, and `latest` is replaced
atomically, so a crash mid-save leaves the previous checkpoint as the one to resume.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bld_t2i import checkpoint as files
from bld_t2i import distributed as D

CLIENT = "client.pt"
STATES = "states.pt"
TRAINER = "trainer.json"  # the trainer state, readable; only a checkpoint folder has it
UNIVERSAL = "universal"  # DeepSpeed's universal form of a folder, made when another world size resumes it


class Checkpointer:
    """Saves and restores an explicit dict of named states.

    engine: a DeepSpeed engine (model, optimizer and ZeRO partitions, every rank writes);
    states: name -> object with state_dict/load_state_dict (plain torch; rank 0 writes, as
    DDP keeps the states identical on every rank).
    """

    def __init__(self, out_dir: str | Path, keep: int, engine: Any = None, states: dict[str, Any] | None = None,
                 universal: bool = False):
        self.dir = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.engine = engine
        self.states = states or {}
        self.universal = universal  # the engine loads the newest checkpoint's universal form (another world size)

    def latest(self) -> Path | None:
        return files.read_latest(self.dir) if self.dir.is_dir() else None

    def peek(self) -> dict | None:
        """The newest checkpoint's client state without restoring anything (any rank, no collective)."""
        folder = self.latest()
        return None if folder is None else self._client(folder)

    def save(self, step: int, client: dict, write_extra: Callable[[Path], None] | None = None,
             before_publish: Callable[[], None] | None = None) -> Path:
        """A collective. `client` is this rank's part, gathered into lists per key except
        `trainer` and `config` (rank 0's); `write_extra(folder)` adds rank 0's own files (no
        collectives in it: consolidate what needs every rank before calling save);
        `before_publish()` may raise to keep the folder from being published (the run lock's
        ownership check)."""
        info = D.dist_info()
        tag = files.step_tag(step)
        tmp = self.dir / f"{tag}.tmp"
        gathered = {k: v if k in ("trainer", "config") else D.all_gather_objects(v) for k, v in client.items()}
        if self.engine is not None:
            # universal_checkpoint_info lets ds_to_universal convert the folder for another world size
            self.engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False,
                                        client_state={"universal_checkpoint_info": {}})
        D.barrier()
        if info.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
            if self.states:
                files.atomic_torch_save({n: s.state_dict() for n, s in self.states.items()}, tmp / STATES)
            files.atomic_torch_save(gathered, tmp / CLIENT)
            files.atomic_write_text(tmp / TRAINER, json.dumps(gathered["trainer"], indent=2))
            if write_extra is not None:
                write_extra(tmp)
            if before_publish is not None:
                before_publish()
            files.publish(tmp, self.dir / tag)
            files.rotate(self.dir, self.keep)
        D.barrier()
        return self.dir / tag

    def load(self) -> dict | None:
        """Restore the named states from the newest checkpoint; its client state, or None
        for a fresh start. Leftovers of a crashed save are removed first. A collective."""
        if D.dist_info().is_main:
            files.remove_partial(self.dir)
        D.barrier()
        folder = self.latest()
        if folder is None:
            return None
        if self.engine is not None:
            load_dir, tag = str(self.dir), folder.name
            if self.universal:  # written by another number of ranks: merge its partitions once, on rank 0
                D.main_work(lambda: _make_universal(folder), f"converting {folder} to a universal checkpoint")
                load_dir, tag = str(folder), UNIVERSAL
            path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"checkpoint {folder} could not be loaded by DeepSpeed")
        if self.states:
            saved = _load(folder / STATES)
            missing = sorted(set(self.states) - set(saved))
            if missing:
                raise RuntimeError(f"checkpoint {folder / STATES} has no state for {missing}")
            for name, obj in self.states.items():
                obj.load_state_dict(saved[name])
        return self._client(folder)

    @staticmethod
    def _client(folder: Path) -> dict:
        client = _load(folder / CLIENT)
        client["folder"] = str(folder)
        return client


def _make_universal(folder: Path) -> None:
    """DeepSpeed's universal form of a checkpoint folder, made once (minutes for a large model)."""
    if (folder / UNIVERSAL).is_dir():
        return
    tmp = folder / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that crashed half way
    D.to_universal(str(folder), str(tmp))
    files.sync_tree(tmp)
    tmp.rename(folder / UNIVERSAL)


def _load(path: Path) -> dict:
    """A checkpoint file holds tensors, dicts, lists and numbers only: torch's weights_only
    loader never runs code from the file (a run folder may be shared or copied)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise RuntimeError(f"cannot resume: {path} is unreadable or holds more than tensors and plain data ({e}); "
                           f"delete {path.parent} to resume from the checkpoint before") from e
