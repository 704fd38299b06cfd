"""What the evaluation keeps between runs: reference features and CLIP features of the
training latents, as `.npz` files in a cache folder, keyed by what they were computed from.

A key is the SHA-256 of a JSON description of the inputs: the data (a shard folder's
`manifest.json`, or lacking one each shard's URL, size and modification time), the counts
and sizes used, and the weights of the feature extractor (the SHA-256 of its files). Any
change to one of them is another key, so a stale file is never read; nothing is deleted.

Each file holds its arrays and a `meta` entry (JSON: when and from what it was computed,
how long it took), written atomically (checkpoint.atomic_write_bytes). `lookup` says
"reused" or "computed" in a `Reuse` record, which the report prints.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import numpy as np

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.data.shards import exists, expand_urls, join, read_bytes

log = logging.getLogger("bld_t2i.eval")
MODES = ("use", "refresh", "off")  # reuse and keep / recompute and keep / neither


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bld_t2i, else ~/.cache/bld_t2i."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bld_t2i"


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a weights file is hashed once per process


def file_digest(path: str | Path) -> str:
    """SHA-256 of a local file (or of every file of a folder, by relative name)."""
    path = Path(path)
    if path.is_dir():
        parts = {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def shards_fingerprint(spec: str) -> dict:
    """What identifies a set of shards: the URLs, each folder's manifest.json when it has one,
    and every shard's size (and, for a folder without a manifest, its modification time)."""
    urls = expand_urls(spec)
    manifests = {}
    for folder in sorted({posixpath.dirname(u) for u in urls}):
        url = join(folder, "manifest.json")
        manifests[folder] = json.loads(read_bytes(url)) if exists(url) else None
    shards = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        entry = {"url": url, "size": info.get("size")}
        if manifests[posixpath.dirname(url)] is None:
            entry["mtime"] = str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")
        shards.append(entry)
    return {"manifests": manifests, "shards": shards}


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Reuse:
    """How a cached quantity was obtained this run."""

    status: str  # "reused", "computed" (and kept at path) or "computed, not cached"
    what: str  # e.g. "reference statistics"
    path: str
    count: int  # images or latents it covers
    computed_at: str  # UTC time it was computed
    compute_s: float  # seconds it took when computed
    this_run_s: float  # seconds this run spent on it (loading, when reused)
    unit: str = "items"  # what `count` counts

    def describe(self) -> str:
        if self.status == "reused":
            return (f"{self.what}: reused from {self.path} (computed {self.computed_at} in {self.compute_s:.1f} s "
                    f"from {self.count} {self.unit}; loaded in {self.this_run_s:.2f} s)")
        kept = f", kept in {self.path}" if self.path else ""
        return f"{self.what}: computed ({self.count} {self.unit}, {self.compute_s:.1f} s){kept}"

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.describe()}


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and meta of a cache file; None when it is missing or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "meta"}
            return arrays, json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        log.warning("cache file %s is unreadable (%s): computing it again", path, e)
        return None


def lookup(what: str, folder: str | Path, description: dict, mode: str,
           compute: Callable[[], tuple[dict[str, np.ndarray], int]], unit: str = "items"
           ) -> tuple[dict[str, np.ndarray], Reuse]:
    """The arrays `compute() -> (arrays, count)` gives, from `folder/{key}.npz` when it is there
    (mode "use"); computed and kept there otherwise (unless mode is "off")."""
    if mode not in MODES:
        raise ValueError(f"cache mode {mode!r} is not one of {list(MODES)}")
    path = Path(folder) / f"{cache_key(description)[:32]}.npz"
    start = time.perf_counter()
    found = load_arrays(path) if mode == "use" else None
    if found is not None:
        arrays, meta = found
        return arrays, Reuse("reused", what, str(path), meta["count"], meta["computed_at"], meta["compute_s"],
                             time.perf_counter() - start, unit)
    arrays, count = compute()
    seconds = time.perf_counter() - start
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if mode == "off":
        return arrays, Reuse("computed, not cached", what, "", count, stamp, seconds, seconds, unit)
    save_arrays(path, arrays, {"count": count, "computed_at": stamp, "compute_s": seconds, "inputs": description})
    return arrays, Reuse("computed", what, str(path), count, stamp, seconds, seconds, unit)
