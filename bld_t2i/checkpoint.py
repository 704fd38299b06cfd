"""Atomic files and checkpoint folders: a crash mid-save never replaces a good file.

Layout of a run's `checkpoints/` folder: one folder per checkpoint (`step_000000123`),
written under a `.tmp` name, its `COMPLETE` marker written last, every file synced, and
renamed when complete; a `latest` file naming the newest complete one, replaced atomically
(a broken `latest` falls back to the newest folder with its marker). Rotation keeps the
newest K. Every publish syncs the file before the rename and the folder after it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from bld_t2i.data.shards import local_temp, sync_file, sync_tree
from bld_t2i.data.shards import publish as publish_file

log = logging.getLogger("bld_t2i.checkpoint")

LATEST = "latest"
COMPLETE = "COMPLETE"  # written last into a checkpoint folder: everything before it is whole
_STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """The one atomic file write, local or object storage: a reader sees the old file or the
    new one, never half. Local: a synced temp file beside it, renamed; s3:// and other
    fsspec URLs: one PUT of a finished local temp file (`data.shards.publish`)."""
    tmp = local_temp(str(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        os.remove(tmp)  # a failed write (ENOSPC) leaves neither a temp file nor a changed target
        raise
    publish_file(tmp, str(path))  # synced there: the bytes are on disk before the rename shows them


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, safetensors_bytes(state, metadata=metadata))


def step_tag(step: int) -> str:
    return f"step_{step:09d}"


def read_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None.

    `latest` names it; a pointer that is empty, unreadable, names a folder that is missing,
    incomplete or anything but a `step_*` folder of `ckpt_dir` (a crash, a hand edit, a copied
    run folder) falls back, with a log line, to the newest folder that holds its completeness
    marker (written last, just before the folder is published)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (ckpt_dir / name).is_dir():
        return ckpt_dir / name
    complete = sorted(p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file())
    log.warning("%s names %r, not a checkpoint folder of %s; resuming from the newest complete one: %s", pointer,
                name, ckpt_dir, complete[-1].name if complete else "none (a fresh start)")
    return complete[-1] if complete else None


def publish(tmp_folder: Path, final_folder: Path, point_latest: bool = True) -> None:
    """Rename a completed folder into place, every file synced first. A checkpoint folder (one
    that `latest` points at) gets its completeness marker, written last, before the rename."""
    if point_latest:
        atomic_write_text(tmp_folder / COMPLETE, "")
    sync_tree(tmp_folder)  # files a backend wrote (DeepSpeed's shards) are synced here
    if final_folder.exists():
        shutil.rmtree(final_folder)
    os.replace(tmp_folder, final_folder)
    sync_file(final_folder.parent)
    if point_latest:
        atomic_write_text(final_folder.parent / LATEST, final_folder.name)


def rotate(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftover .tmp folders."""
    ckpt_dir = Path(ckpt_dir)
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    latest = read_latest(ckpt_dir)
    for old in done[: max(len(done) - keep, 0)]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def remove_partial(ckpt_dir: str | Path) -> None:
    """Folders left by a save that crashed before it was published."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def save_folder(ckpt_dir: str | Path, tag: str, write: Callable[[Path], None], point_latest: bool = True) -> Path:
    """Single-process save: `write(tmp)` fills a temp folder, which is then published."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / f"{tag}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    final = ckpt_dir / tag
    publish(tmp, final, point_latest)
    return final
