"""Shard files: URL expansion, a fast tar reader with byte offsets, atomic writing.

Shards are WebDataset tar files (``.tar``, or gzip-compressed ``.tar.gz``/``.tgz``), local
or on object storage (``s3://``) through fsspec.
A sample is the run of consecutive members sharing a key, the img2dataset layout
``{key}.jpg``, ``{key}.txt``, ``{key}.json`` (WebDataset's ``base_plus_ext`` rule: the key
is the path up to the first dot of the file name).

The reader parses the 512-byte tar headers itself instead of using `tarfile`: it is
several times faster for small members (a 2 KiB latent, a caption) and it reports the
byte offset where every sample starts, which is what resuming without replay seeks to.
"""

from __future__ import annotations

import glob
import gzip
import os
import posixpath
import re
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
import webdataset as wds
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

BLOCK = 512
_READ_CHUNK = 1 << 20  # bytes per read from the file; tar members are parsed out of it
_ZERO_BLOCK = bytes(BLOCK)
_GLOB_CHARS = re.compile(r"[*?\[]")
_GZIP_SUFFIXES = (".tar.gz", ".tgz")


class ShardError(Exception):
    """A shard that cannot be read to its end; `reason` is a skip-count key."""

    def __init__(self, reason: str, message: str, member: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.member = member  # the name of a member whose data is cut, when its header is whole


# ----------------------------------------------------------------------------- URLs


def _glob(pattern: str, spec: str) -> list[str]:
    """The shards matching a glob, sorted (one listing per folder level; the order is the
    data set's, so a resumed run sees the same list)."""
    fs, path = fsspec.core.url_to_fs(pattern)
    matches = sorted(fs.glob(path))
    if not matches:
        raise FileNotFoundError(f"no shard matches {pattern!r} (in shard spec {spec!r})")
    return matches if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(m) for m in matches]


def expand_urls(spec: str) -> list[str]:
    """``"a/x-{000000..000009}.tar::s3://b/y/*.tar.gz"`` -> the list of shard URLs: braces are
    expanded first, then each URL with ``*``, ``?`` or ``[`` is a glob."""
    urls = []
    for part in spec.split("::"):
        for url in braceexpand(part.strip()) if part.strip() else ():
            urls += _glob(url, spec) if _GLOB_CHARS.search(url) else [url]
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    return urls


def check_exist(urls: list[str]) -> None:
    """Raise FileNotFoundError naming the shard URLs that do not exist.

    One directory listing per parent folder, so thousands of s3:// shards cost a few
    requests, not one per shard.
    """
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(posixpath.dirname(url), []).append(url)
    missing = []
    for group in by_dir.values():
        fs, root = fsspec.core.url_to_fs(group[0])
        try:
            present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(posixpath.dirname(root), detail=False)}
        except FileNotFoundError:
            present = set()
        missing += [u for u in group if posixpath.basename(u) not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard(s) not found: {shown}")


# ----------------------------------------------------------------------------- reading


@dataclass(slots=True)
class RawSample:
    key: str
    members: dict[str, bytes]  # extension ("jpg", "txt", "emb.npy") -> bytes
    url: str
    offset: int  # byte offset of the sample's first tar header
    end: int  # byte offset just after its last member
    # Why the sample cannot be used although the tar stream around it is sound (a member name that
    # is not UTF-8): the reader's consumers count it as a skip with this reason.
    damage: str | None = None


class Member(NamedTuple):
    start: int  # offset of the member's first header (GNU long-name or pax headers included)
    end: int  # offset just after its data
    name: str
    data: bytes
    damage: str | None  # see RawSample.damage


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension): the key is the path up to the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _number(field: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded), or GNU base-256 (first byte 0x80
    positive, 0xff negative). ValueError for anything else: `int` alone would also take a sign,
    underscores and inner spaces."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    digits = field.strip(b"\0 ")
    if not digits.isdigit():
        if digits:
            raise ValueError(field)
        return 0
    return int(digits, 8)


def _checksum_ok(header: bytes | memoryview) -> bool:
    """POSIX: the header's bytes summed with the 8-byte checksum field read as spaces; old
    writers summed signed bytes, which tarfile also accepts."""
    try:
        stored = _number(bytes(header[148:156]))
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header if b & 0x80) + 256 * sum(1 for b in header[148:156] if b & 0x80)
    return stored == signed


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


@contextmanager
def _gzip_errors(url: str, at: int):
    """A .tar.gz whose compressed stream is cut or garbled is a format error of the shard,
    not a storage fault: gzip's errors (BadGzipFile is an OSError) become ShardError."""
    try:
        yield
    except EOFError:
        raise ShardError("truncated_gzip", f"{url}: compressed stream cut after byte {at} of the tar") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise ShardError("corrupt_gzip", f"{url}: {e}") from None


def _read_at_least(f, have: bytes, size: int) -> bytes:
    """`have` plus reads of at most _READ_CHUNK until it holds `size` bytes or the file ends.
    Memory follows the bytes that exist, not the size a header claims."""
    parts, got = [have], len(have)
    while got < size:
        chunk = f.read(min(max(size - got, _READ_CHUNK), _READ_CHUNK * 16))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


_NAME_MAX = 1 << 16  # bytes of a GNU long name or a pax header: more is not a name but damage


def iter_members(f, url: str, offset: int = 0, *, max_member_bytes: int) -> Iterator[Member]:
    """Yield each regular file of a tar stream from `offset` as a Member.

    Every header is checked before it is believed: the "ustar" magic, the checksum, and a size
    that is a number in [0, max_member_bytes] (a garbled or hostile header must not make the
    reader allocate or read gigabytes). A short read raises ShardError("truncated_tar"), a block
    that is not a valid tar header ShardError("corrupt_tar"), a member over the bound
    ShardError("oversized_member"): after any of them the rest of the stream cannot be trusted.
    A name that is not UTF-8 only marks its member (`damage`). The fields are read in place from
    a 1 MiB buffer: this loop is the latent loader's hot path (~3 members per sample).
    """
    with _gzip_errors(url, offset):
        f.seek(offset)
    buf, pos, base = b"", 0, offset  # buf[pos] is at file offset base + pos
    long_name: str | None = None
    damage: str | None = None
    start = None
    while True:
        if pos + BLOCK > len(buf):
            base += pos
            with _gzip_errors(url, base):
                buf, pos = buf[pos:] + f.read(_READ_CHUNK), 0
            if len(buf) < BLOCK:
                if not buf and start is None:
                    return  # a stream that ends without the two zero blocks: accepted, like tarfile
                raise ShardError("truncated_tar", f"{url}: truncated tar header at byte {base}")
        if buf[pos] == 0 and buf[pos : pos + BLOCK] == _ZERO_BLOCK:
            return
        header = memoryview(buf)[pos : pos + BLOCK]
        if buf[pos + 257 : pos + 262] != b"ustar" or not _checksum_ok(header):
            raise ShardError("corrupt_tar", f"{url}: no valid tar header at byte {base + pos} (magic or checksum)")
        try:
            size = _number(buf[pos + 124 : pos + 136])
        except ValueError:
            raise ShardError("corrupt_tar", f"{url}: bad member size at byte {base + pos}") from None
        kind = buf[pos + 156]
        limit = _NAME_MAX if kind in (76, 120, 103) else max_member_bytes
        if not 0 <= size <= limit:
            raise ShardError("oversized_member" if size > 0 else "corrupt_tar",
                             f"{url}: the header at byte {base + pos} declares a member of {size} bytes "
                             f"(allowed: 0 to {limit}, data.max_member_bytes / latents.max_member_bytes)")
        if start is None:
            start = base + pos
        stop = pos + BLOCK + ((size + BLOCK - 1) & ~(BLOCK - 1))
        if stop > len(buf):
            base += pos
            with _gzip_errors(url, base):
                buf, stop = _read_at_least(f, buf[pos:], stop - pos), stop - pos
            pos = 0
            if stop > len(buf):
                name = long_name or buf[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise ShardError("truncated_tar", f"{url}: truncated member {name} at byte {base}", name)
        data = buf[pos + BLOCK : pos + BLOCK + size]
        if kind in (48, 0, 55):  # "0", NUL, "7": a regular file
            if long_name is None:
                nul = buf.find(b"\0", pos, pos + 100)
                raw_name = buf[pos : nul if nul >= 0 else pos + 100]
                if buf[pos + 345]:  # ustar prefix
                    raw_name = buf[pos + 345 : pos + 500].split(b"\0", 1)[0] + b"/" + raw_name
                try:
                    name = raw_name.decode("utf-8")
                except UnicodeDecodeError:
                    name, damage = raw_name.decode("utf-8", "replace"), "undecodable_name"
            else:
                name = long_name
            yield Member(start, base + stop, name, data, damage)
            long_name, start, damage = None, None, None
        elif kind == 76:  # "L": GNU long name for the next member
            try:
                long_name = data.rstrip(b"\0").decode("utf-8")
            except UnicodeDecodeError:
                long_name, damage = data.rstrip(b"\0").decode("utf-8", "replace"), "undecodable_name"
        elif kind == 120:  # "x": pax extended header for the next member
            long_name = _pax_path(data) or long_name
        else:  # directories, links, global pax headers: not samples
            long_name, start, damage = None, None, None
        pos = stop


def iter_samples(f, url: str, offset: int = 0, *, max_member_bytes: int) -> Iterator[RawSample]:
    """Group consecutive members by key into samples (WebDataset's grouping)."""
    current: RawSample | None = None
    try:
        for start, end, name, data, damage in iter_members(f, url, offset, max_member_bytes=max_member_bytes):
            key, ext = _split_name(name)
            if current is not None and key == current.key and ext not in current.members:
                current.members[ext] = data
                current.end = end
                current.damage = current.damage or damage
                continue
            if current is not None:
                yield current
            current = RawSample(key, {ext: data}, url, start, end, damage)
    except ShardError as e:
        # The sample before the break is whole when the cut member belongs to the next one.
        if current is not None and e.member is not None and _split_name(e.member)[0] != current.key:
            yield current
        raise
    if current is not None:
        yield current


def shard_version(url: str) -> str:
    """"size:ETag" of an object, "size:mtime" of a local file: what changes when a shard is
    rewritten under the same URL (a resume must not seek into the new bytes at old offsets)."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


class _GzipShard(gzip.GzipFile):
    """A decompressed .tar.gz that also closes the shard file under it (GzipFile leaves a
    file object it was given open)."""

    def close(self) -> None:
        source = self.fileobj
        super().close()
        if source is not None:
            source.close()


def open_shard(url: str):
    """Open a shard for reading, decompressing a .tar.gz/.tgz; a missing one is an error that
    names it. Offsets in a compressed shard are offsets in its tar stream, so seeking there
    decompresses the bytes before it."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        f = fs.open(path, "rb", block_size=_READ_CHUNK)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard not found: {url}") from None
    return _GzipShard(fileobj=f, mode="rb") if url.endswith(_GZIP_SUFFIXES) else f


# ----------------------------------------------------------------------------- writing


def local_temp(url: str) -> str:
    """A temporary file beside a local target (same filesystem: rename is atomic), or in
    the system temp folder for a remote one."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        folder, prefix = os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}."
    else:
        folder, prefix = None, "bld_shard."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make published shards private
    return tmp


def remove_stale_temps(url: str) -> None:
    """Delete temp files a killed writer of the local target `url` left behind (remote
    targets stage in the system temp folder and leave nothing at the destination)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        folder, name = os.path.split(os.path.abspath(path))
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            os.remove(stale)


def sync_file(path: str | os.PathLike) -> None:
    """fsync a file (or a folder: its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under `folder`, files before the folder that names them."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            sync_file(os.path.join(root, name))
        sync_file(root)


def publish(tmp: str, url: str) -> None:
    """Move a finished local temp file to `url` atomically and durably; the temp file is removed
    whatever happens.

    Local: the file's bytes are synced, `os.replace` (atomic on one filesystem) publishes it,
    and the folder is synced so that the new name survives a crash too. Object storage: a
    single PUT (or a multipart upload, completed in one request) - the object appears whole
    or not at all.
    """
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if isinstance(fs, LocalFileSystem):
            sync_file(tmp)
            os.replace(tmp, path)
            sync_file(os.path.dirname(os.path.abspath(path)))
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


class TarShardWriter:
    """Write one shard to a temp file and publish it to `url` on close.

    Samples are dicts ``{"__key__": str, ext: bytes, ...}`` (WebDataset's TarWriter with
    encoding off, so bytes are stored exactly). Leaving the block with an exception
    deletes the temp file and publishes nothing.
    """

    def __init__(self, url: str):
        self.url = url
        self.count = 0
        self._tmp = local_temp(url)
        self._file = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.count += 1

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._file.close()
        except BaseException:
            os.remove(self._tmp)  # a failed last write (ENOSPC) publishes nothing and leaves nothing
            raise
        if exc_type is None:
            publish(self._tmp, self.url)
        else:
            os.remove(self._tmp)
