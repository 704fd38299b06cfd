"""Reading one shard through storage faults (the shard stream's reader, data/stream.py).

A read that fails with a transient error (after s3fs's and botocore's own
retries: a reset connection, a 5xx, a timeout) is retried ``read_retries`` times with
exponential backoff from ``retry_backoff_s`` capped at ``retry_max_backoff_s``, reopening
the shard at the end of the last whole sample; then the rest of the shard is skipped for
this epoch ("read_error"). A shard that is gone (FileNotFoundError) or forbidden is not
retried. Both are counted, logged with the URL and listed by `failed_shards()`; a
worker whose whole epoch gives nothing usable stops with an error naming them.

Damage in the bytes themselves (a header that fails its checks, a cut or garbled gzip stream,
anything the parser raises) is never retried: the rest of the shard is skipped and counted
by its reason; a run is stopped only by the stream's `max_skip_fraction`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

from bld_t2i.data.shards import RawSample, ShardError, iter_samples, open_shard, shard_version

log = logging.getLogger("bld_t2i.data")


class Retry(NamedTuple):
    retries: int  # failed reads of a shard in a row before the rest of it is skipped
    backoff_s: float  # the first wait; it doubles with each retry
    max_backoff_s: float


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a storage hiccup raises through fsspec/s3fs: s3fs turns S3's 5xx answers into
    OSError, but a refused or reset connection comes as a botocore or aiohttp exception."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:  # no S3 support installed: local files only
        pass
    try:
        from aiohttp import ClientError as HttpError

        errors.append(HttpError)
    except ImportError:
        pass
    return tuple(errors)


class ShardChanged(RuntimeError):
    """A shard rewritten since a position inside it was saved: its byte offsets mean nothing now."""


class ShardReader:
    """Reads one shard from a byte offset, surviving storage faults; counts what it skips into
    `skipped` and appends storage failures, (url, reason), to `failed`. `versions` (url ->
    `shard_version`, a resumed position's to begin with) is updated at every opening; reading
    from inside a shard whose version changed raises ShardChanged naming it."""

    def __init__(self, retry: Retry, max_member_bytes: int, skipped: Counter, failed: list[tuple[str, str]],
                 versions: dict[str, str]):
        self.retry, self.skipped, self.failed = retry, skipped, failed
        self.max_member_bytes = max_member_bytes
        self.versions = versions
        self.transient = transient_errors()

    def _check_version(self, url: str, at: int) -> None:
        version = shard_version(url)
        if at > 0 and self.versions.get(url, version) != version:
            raise ShardChanged(f"shard {url} changed since the position inside it was saved (size:tag "
                               f"{self.versions[url]} then, {version} now): resuming would read its new bytes at "
                               f"the old offsets. Restore the shard, or start the run in a new run.out_dir")
        self.versions[url] = version

    def __call__(self, url: str, offset: int) -> Iterator[RawSample]:
        attempt, at, empty = 0, offset, True
        while True:
            try:
                self._check_version(url, at)
                with open_shard(url) as f:
                    for sample in iter_samples(f, url, at, max_member_bytes=self.max_member_bytes):
                        attempt, at, empty = 0, sample.end, False  # progress: the retry budget restarts
                        yield sample
                if empty and offset == 0:
                    self.skipped["empty_shard"] += 1
                    log.warning("shard without samples: %s", url)
                return
            except ShardError as e:
                self.skipped[e.reason] += 1
                log.warning("skipping the rest of a shard (%s): %s", e.reason, e)
                return
            except (ValueError, OverflowError, MemoryError, RecursionError, EOFError) as e:
                # Raised by parsing bytes no check foresaw: data damage, not a storage fault, so
                # not retried; counted under its own reason so that such a shard can be found.
                self.skipped["unreadable_tar"] += 1
                log.warning("skipping the rest of shard %s after byte %d (unreadable_tar): %s: %s",
                            url, at, type(e).__name__, e)
                return
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                # The storage answered: waiting would not bring the shard back.
                self._fail(url, "missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard", e)
                return
            except self.transient as e:
                if attempt >= self.retry.retries:
                    self._fail(url, "read_error", e)
                    return
                wait = min(self.retry.backoff_s * 2**attempt, self.retry.max_backoff_s)
                attempt += 1
                log.warning("read error in %s at byte %d (%s: %s); retry %d of %d in %.2f s",
                            url, at, type(e).__name__, e, attempt, self.retry.retries, wait)
                time.sleep(wait)

    def _fail(self, url: str, reason: str, e: BaseException) -> None:
        self.skipped[reason] += 1
        self.failed.append((url, reason))
        log.warning("skipping shard %s for this epoch (%s): %s: %s", url, reason, type(e).__name__, e)
