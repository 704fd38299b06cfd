"""Atomic files and checkpoint folders: a crash mid-save never replaces a good file.

Layout of a run's `checkpoints/` folder: one folder per checkpoint (`step_000000123`),
written under a `.tmp` name and renamed when complete, and a `latest` file naming the
newest complete one, replaced atomically. Rotation keeps the newest K.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from bld_t2i.data.shards import local_temp
from bld_t2i.data.shards import publish as publish_file

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """The one atomic file write, local or object storage: a reader sees the old file or the
    new one, never half. Local: a synced temp file beside it, renamed; s3:// and other
    fsspec URLs: one PUT of a finished local temp file (`data.shards.publish`)."""
    tmp = local_temp(str(path))
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
    publish_file(tmp, str(path))


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
    """The newest complete checkpoint folder, or None."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(ckpt_dir) / pointer.read_text().strip()
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def publish(tmp_folder: Path, final_folder: Path, point_latest: bool = True) -> None:
    """Rename a completed folder into place (and point `latest` at it)."""
    if final_folder.exists():
        shutil.rmtree(final_folder)
    os.replace(tmp_folder, final_folder)
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
