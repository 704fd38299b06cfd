"""Durability of every publish: the file (and a folder's every file) synced before the rename
that shows it, the folder that names it synced after; a failed write (ENOSPC) leaves neither a
temp file nor a changed target. `os.fsync` and `os.replace` are wrapped to see the order."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from bld_t2i import checkpoint as files
from bld_t2i.data import shards
from bld_t2i.data.shards import TarShardWriter
from bld_t2i.models.binary_ae import BinaryAutoencoder


@pytest.fixture
def calls(monkeypatch):
    """[("fsync", path) | ("replace", src, dst)] in the order they happened."""
    seen: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def traced_fsync(fd):
        seen.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def traced_replace(src, dst, **kw):
        seen.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", traced_replace)
    return seen


def check_published(calls: list[tuple], target: Path) -> None:
    """`target` was renamed into place after its bytes (every file under it) were synced, and
    its folder was synced after the rename."""
    target = os.path.realpath(target)
    at = next(i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == target)
    src = calls[at][1]
    synced_before = {c[1] for c in calls[:at] if c[0] == "fsync"}
    if os.path.isdir(target):
        inside = {os.path.join(src, os.path.relpath(os.path.join(r, n), target))
                  for r, _, names in os.walk(target) for n in names}
        assert inside and inside <= synced_before, f"not synced before the rename: {inside - synced_before}"
    assert src in synced_before, f"{src} not synced before it became {target}"
    assert ("fsync", os.path.dirname(target)) in calls[at + 1 :], f"the folder of {target} not synced after"


def test_files_shards_checkpoints_and_exports_are_synced_before_and_after_publishing(tmp_path, calls):
    files.atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    check_published(calls, tmp_path / "manifest.json")

    with TarShardWriter(str(tmp_path / "shard-000000.tar")) as w:
        w.write({"__key__": "a", "txt": b"caption"})
    check_published(calls, tmp_path / "shard-000000.tar")

    folder = files.save_folder(tmp_path / "checkpoints", "step_000000001",
                               lambda tmp: (tmp / "client.json").write_text("{}"))
    check_published(calls, folder)
    assert (folder / files.COMPLETE).is_file()
    check_published(calls, tmp_path / "checkpoints" / files.LATEST)

    torch.manual_seed(0)
    from bld_t2i.config import AutoencoderConfig

    ae = BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", resolution=16))
    ae.save_pretrained(tmp_path / "ae")
    check_published(calls, tmp_path / "ae")
    files.save_folder(tmp_path, "export", lambda tmp: (tmp / "model_index.json").write_text("{}"), point_latest=False)
    check_published(calls, tmp_path / "export")
    assert not (tmp_path / "export" / files.COMPLETE).exists()  # a pipeline folder keeps its documented layout


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_with_enospc_leaves_no_temp_file_and_the_old_target(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    files.atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", enospc)  # NFS and others report a full disk at fsync
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["manifest.json"]

    with pytest.raises(OSError, match="No space left"):  # the shard's last write fails
        with TarShardWriter(str(tmp_path / "shard-000000.tar")) as w:
            w.write({"__key__": "a", "txt": b"caption"})
    assert os.listdir(tmp_path) == ["manifest.json"]
    monkeypatch.undo()

    real_open = open

    class FullDisk:
        """A file whose writes fail after 1 KiB, as on a disk that fills up."""

        def __init__(self, *args, **kwargs):
            self.f, self.n = real_open(*args, **kwargs), 0

        def write(self, data):
            self.n += len(data)
            if self.n > 1024:
                enospc()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shards, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        with TarShardWriter(str(tmp_path / "shard-000001.tar")) as w:
            w.write({"__key__": "a", "txt": os.urandom(4096)})
    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_bytes(target, os.urandom(4096))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["manifest.json"]
