"""The shard stream shared by the image reader and the latent loader.

Split, position and resume: see `bld_t2i.data.plan` (shards dealt to rank x worker
slots, exact or resampled epochs, elastic resume on another number of ranks or workers).

Shuffle. Each worker reads its pieces in consecutive windows of ``shuffle_window`` raw
samples, permutes each window with a RNG seeded from ``(seed, epoch, slot, window)`` and
emits it. A window may span shards; windows restart with each epoch. Restoring seeks
straight to the window's byte offset and re-reads that one window (raw bytes; the
``emitted`` samples are not decoded again): at most ``shuffle_window`` samples of I/O.

Buckets. A batch holds samples of one bucket (`Decoder.bucket`: a latent's grid, for
aspect-ratio buckets; images and square latents have one). Each bucket fills its own batch
in arrival order, and a batch goes out when its bucket is full. A worker's position then
also lists its ``pending`` samples, read before the position but waiting in other buckets,
as (shard index, byte offset, epoch, window): a resume re-reads just those samples (at most
``buckets x (batch_size - 1)`` of I/O) and rebuilds the buckets, so nothing is lost or
repeated, and the batch sequence stays bit-identical. With one bucket nothing ever waits.

Storage faults: see `bld_t2i.data.reader` (retries with backoff, then the rest of the shard
is skipped for the epoch); a worker whose whole epoch gives nothing usable stops with an
error naming the failed shards.

Order. Loaders are infinite (epochs roll over inside each worker), so every torch
DataLoader worker always has a next batch and DataLoader's round-robin is deterministic:
batch ``n`` comes from worker ``n % W``. Each batch carries its worker's position; the
loader keeps the latest one per worker and the number of batches consumed, and on an
exact resume rotates the workers' roles so that the next batch comes from the right
logical worker. A finite mode (one epoch, last batch partial) serves encoding and coverage.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bld_t2i.data.plan import (
    Piece,
    Position,
    check_split,
    epoch_shards,
    plan_of,
    position_of,
    restore,
    shard_list_digest,
    slot_pieces,
)
from bld_t2i.data.reader import Retry, ShardReader
from bld_t2i.data.shards import RawSample, check_exist, expand_urls
from bld_t2i.distributed import dist_info

log = logging.getLogger("bld_t2i.data")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is its skip-count key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def json_member(data: bytes | None) -> dict:
    """A sample's `.json` metadata: a JSON object, {} when absent; SkipSample("corrupt_json") for
    bytes that are not one (not UTF-8, not JSON, a list, nested past the parser's recursion)."""
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        raise SkipSample("corrupt_json") from None
    if not isinstance(meta, dict):
        raise SkipSample("corrupt_json")
    return meta


def label_of(meta: dict) -> int:
    """The sample's class label: the .json "label" when it is a non-negative int, else -1."""
    label = meta.get("label")
    return label if type(label) is int and label >= 0 else -1


def _raw_stream(pieces: list[Piece], pos: Position, read) -> Iterator[tuple[int, RawSample]]:
    """(piece index, sample) from `pos.shard` at `pos.offset` to the end of the epoch."""
    for index in range(pos.shard, len(pieces)):
        url, start = pieces[index]
        # Reading only moves forward, so a position inside a piece is at or past its start.
        for sample in read(url, max(start, pos.offset) if index == pos.shard else start):
            yield index, sample


def sample_stream(pieces_of: Callable[[int], list[Piece]], read, seed: int, slot: int, window: int, pos: Position,
                  finite: bool) -> Iterator[tuple[RawSample | None, Position]]:
    """The windowed-shuffled raw samples of one slot, each with the position after it.

    An infinite stream marks each epoch's end with ``(None, start of the next epoch)``.
    """
    while True:
        raw = _raw_stream(pieces_of(pos.epoch), pos, read)
        while True:
            win = list(islice(raw, window))  # [(piece index, sample)]; the window starts at the first
            if not win:
                break
            start_shard, _ = win[0]
            last_shard, last = win[-1]
            order = np.random.default_rng([seed, pos.epoch, slot, pos.window]).permutation(len(win)).tolist()
            for j in range(pos.emitted, len(win)):
                if j + 1 < len(win):
                    at = Position(pos.epoch, start_shard, win[0][1].offset, pos.window, j + 1)
                else:  # window done: the position is the next window's start
                    at = Position(pos.epoch, last_shard, last.end, pos.window + 1, 0)
                yield win[order[j]][1], at
            pos = Position(pos.epoch, last_shard, last.end, pos.window + 1, 0)
        if finite:
            return
        pos = Position(pos.epoch + 1)
        yield None, pos


class Decoder:
    """Turns raw samples into batches: `sample` raises SkipSample, `collate` stacks (both
    in the loader worker), `finish` completes a batch in the training process."""

    def sample(self, raw: RawSample):
        raise NotImplementedError

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        return batch

    def bucket(self, item):
        """The key of the batches `item` may join (a latent's grid); one bucket when None."""
        return None


class Buckets:
    """Decoded samples waiting for their bucket's batch to fill, each with its reference (shard
    index, byte offset of the raw sample, epoch, window it was read in); `pending` lists those
    in arrival order."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.waiting: dict = {}  # bucket key -> [(arrival, reference, item)]; keys by oldest item
        self.arrivals = 0

    def add(self, key, ref: tuple[int, ...], item) -> list | None:
        """Buffer `item`; returns its bucket's items when they make a full batch."""
        bucket = self.waiting.setdefault(key, [])
        bucket.append((self.arrivals, ref, item))
        self.arrivals += 1
        if len(bucket) < self.batch_size:
            return None
        del self.waiting[key]
        return [entry[2] for entry in bucket]

    def pending(self) -> list[list[int]]:
        """[[shard index, offset, epoch, window], ...] of every waiting sample, oldest first:
        re-adding them in this order rebuilds the same buckets in the same order."""
        return [list(ref) for _, ref, _ in sorted((e for b in self.waiting.values() for e in b), key=lambda e: e[0])]

    def drain(self) -> Iterator[list]:
        """The partial batches (a finite stream's end), oldest bucket first."""
        while self.waiting:
            yield [entry[2] for entry in self.waiting.pop(next(iter(self.waiting)))]


class ShardDataset(IterableDataset):
    """Batches from the shards of this rank; each worker plays a logical worker role.

    `cfg` is the DataConfig or LatentsConfig (the stream fields have the same names)."""

    def __init__(self, spec: str, decoder: Decoder, cfg, seed: int, rank: int, world_size: int, finite: bool):
        super().__init__()
        self.urls = expand_urls(spec)
        self.shard_index = {url: i for i, url in enumerate(self.urls)}  # a waiting sample's shard, by number
        self.digest = shard_list_digest(self.urls)  # saved with the position: a resume must see the same list
        self.spec = spec
        self.decoder = decoder
        self.batch_size, self.window, self.resampled = cfg.batch_size, cfg.shuffle_window, cfg.resampled
        self.retry = Retry(cfg.read_retries, cfg.retry_backoff_s, cfg.retry_max_backoff_s)
        self.max_member_bytes = cfg.max_member_bytes
        self.max_skip_fraction, self.skip_check_after = cfg.max_skip_fraction, cfg.skip_check_after
        self.seed = seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, cfg.num_workers)
        self.finite = finite
        self.resume: dict[str, dict] = {}  # logical worker -> its saved state (position, "skipped", "plan")
        self.rotation = 0  # physical worker p plays logical worker (p + rotation) % W
        check_split(len(self.urls), world_size, self.num_workers, spec, self.resampled)
        check_exist(self.urls)

    def pieces_of(self, saved: dict, slot: int) -> Callable[[int], list[Piece]]:
        slots = self.world_size * self.num_workers
        return lambda epoch: slot_pieces(saved, self.urls, self.seed, epoch, slot, slots, self.resampled)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        slot = self.rank * self.num_workers + worker
        saved = self.resume.get(str(worker), {})
        pos, planned = position_of(saved), set(plan_of(saved))
        skipped, failed = Counter(saved.get("skipped", {})), []
        at = pos
        # A full epoch without one usable sample would spin forever: an error instead of a hang
        # (resampled: once every shard of the data set was drawn in such epochs).
        full_epoch, used, barren = pos == Position(pos.epoch) and pos.epoch not in planned, 0, set()
        read = ShardReader(self.retry, self.max_member_bytes, skipped, failed, dict(saved.get("versions", {})))
        delivered = saved.get("delivered", 0)  # samples decoded by this logical worker, resume included
        buckets = self._restore_buckets(saved.get("pending", []), read)
        stream = sample_stream(self.pieces_of(saved, slot), read, self.seed, slot, self.window, pos, self.finite)
        for raw, at in stream:
            if raw is None:
                if full_epoch and not used:
                    self._check_barren(barren, at.epoch - 1, slot, worker, skipped, failed)
                else:
                    barren = set()
                full_epoch, used = at.epoch not in planned, 0
                waiting = {self.urls[ref[0]] for ref in buckets.pending()}  # the next epoch seeks only there
                read.versions = {u: v for u, v in read.versions.items() if u in waiting}
                continue
            try:
                if raw.damage is not None:
                    raise SkipSample(raw.damage)
                item = self.decoder.sample(raw)
                used += 1
                delivered += 1
            except SkipSample as e:
                if e.reason not in skipped:  # the first of each kind is logged; all are counted
                    log.warning("skipping sample %r in %s: %s (further ones counted)", raw.key, raw.url, e.reason)
                skipped[e.reason] += 1
                self._check_skips(delivered, skipped, worker)
                continue
            window = at.window if at.emitted else at.window - 1  # `at` is the position after the sample
            ref = (self.shard_index[raw.url], raw.offset, at.epoch, window)
            items = buckets.add(self.decoder.bucket(item), ref, item)
            if items is not None:
                # the versions of the shards opened this epoch: a resume seeks into one of them
                yield self._batch(items, worker, at, skipped, failed, buckets.pending(), delivered,
                                  dict(read.versions))
                failed.clear()  # in place: the reader appends to this list
        for items in buckets.drain():
            yield self._batch(items, worker, at, skipped, failed, buckets.pending(), delivered, {})

    def _restore_buckets(self, pending: list, read: ShardReader) -> Buckets:
        """The buckets as saved: each waiting sample re-read alone from its byte offset."""
        buckets = Buckets(self.batch_size)
        for ref in pending:
            samples = read(self.urls[ref[0]], ref[1])
            raw = next(samples, None)  # None: the shard is gone since (the reader counted it)
            samples.close()
            if raw is not None:
                item = self.decoder.sample(raw)  # decoded once already: no SkipSample
                buckets.add(self.decoder.bucket(item), tuple(ref), item)
        return buckets

    def _check_barren(self, barren: set, epoch: int, slot: int, worker: int, skipped: Counter, failed: list) -> None:
        slots = self.world_size * self.num_workers
        shards = epoch_shards(self.urls, self.seed, epoch, slot, slots, self.resampled)
        barren.update(shards)
        if not self.resampled or len(barren) == len(set(self.urls)):
            raise RuntimeError(f"rank {self.rank} loader worker {worker}: a whole epoch of its shards gave no usable "
                               f"sample (skipped: {dict(skipped)}); failed reads: {failed}; shards: {shards}")

    def _check_skips(self, delivered: int, skipped: Counter, worker: int) -> None:
        """Stop when more than max_skip_fraction of what this worker looked at was skipped: a run
        must not train on a sliver of its data without anyone noticing."""
        lost = sum(skipped.values())
        seen = delivered + lost
        if seen >= self.skip_check_after and lost > self.max_skip_fraction * seen:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
            raise RuntimeError(f"rank {self.rank} loader worker {worker}: {lost} of {seen} samples and shards read "
                               f"from {self.spec} were skipped ({lost / seen:.1%}, more than max_skip_fraction "
                               f"{self.max_skip_fraction}); reasons: {reasons}. Repair or drop the shards the "
                               f"warnings name, or raise max_skip_fraction")

    def _batch(self, items, worker, at: Position, skipped: Counter, failed: list, pending: list,
               delivered: int, versions: dict[str, str]) -> dict:
        self._check_skips(delivered, skipped, worker)  # the reader's skipped shards count too
        batch = self.decoder.collate(items)
        # `failed` holds the failures since the last batch: a flaky store must not grow every batch.
        batch["_position"] = {"worker": worker, **at._asdict(), "skipped": dict(skipped), "failed": list(failed),
                              "delivered": delivered, "versions": versions}
        if pending:  # samples of other buckets read before `at`, not yet delivered
            batch["_position"]["pending"] = pending
        return batch


def _as_is(batch: dict) -> dict:
    """Batches are made in the worker; DataLoader's default would walk every caption and dict."""
    return batch


class ShardLoader:
    """Infinite (or one-epoch) batches for this rank, with `state_dict` for exact or elastic resume."""

    def __init__(self, dataset: ShardDataset, num_workers: int, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # the batch's tensors page-locked: the trainer copies them with non_blocking
        self._iter = None
        self._positions: dict[str, dict] = {}
        self._failed: list[tuple[str, str]] = []  # storage failures of this rank's workers in this run
        self._batches = 0

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = iter(DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                prefetch_factor=4 if self.num_workers else None,
            ))
        batch = next(self._iter)
        at = batch.pop("_position")
        worker = str(at.pop("worker"))
        self._failed += [tuple(f) for f in at.pop("failed")]
        self._positions[worker] = at
        self._batches += 1
        batch = self.dataset.decoder.finish(batch)
        if self.pin_memory:  # here, not DataLoader(pin_memory): the workers send numpy arrays (see collate)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def close(self) -> None:
        """Stop the loader workers now (dropping the DataLoader iterator joins them)."""
        self._iter = None

    def skipped(self) -> dict[str, int]:
        """Skipped samples (and shards) by reason, summed over this rank's workers (resume included)."""
        total: Counter = Counter()
        for at in self.state_dict()["workers"].values():
            total.update(at["skipped"])
        return dict(total)

    def failed_shards(self) -> list[tuple[str, str]]:
        """(url, reason) of the shards this rank skipped in this run after read retries (or gone)."""
        return list(self._failed)

    def state_dict(self) -> dict:
        """This rank's data position (JSON-able, small): each worker's position, skip counts and the
        pieces of the epochs an elastic resume re-dealt. The trainer saves every rank's."""
        ds = self.dataset
        workers = {}
        for name, saved in {**ds.resume, **self._positions}.items():
            state = {**saved, "skipped": saved.get("skipped", {})}
            plan = ds.resume.get(name, {}).get("plan", {})
            epoch = position_of(state).epoch
            state["plan"] = {e: p for e, p in plan.items() if int(e) >= epoch}  # finished epochs are dropped
            workers[name] = state
        return {"rank": ds.rank, "world_size": ds.world_size, "num_workers": ds.num_workers,
                "shards": ds.digest, "batches": self._batches, "workers": workers}

    def load_state_dict(self, states: list[dict]) -> None:
        """Resume from every rank's `state_dict()` (the all-gathered list), saved by any number of
        ranks and workers; this rank takes its share (see bld_t2i.data.plan)."""
        ds = self.dataset
        ds.resume, self._batches = restore(states, ds.rank, ds.world_size, ds.num_workers, ds.urls, ds.seed,
                                           ds.resampled)
        ds.rotation = self._batches % ds.num_workers
        self._positions, self._failed = {}, []
        self._iter = None


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    info = dist_info()
    return (info.rank if rank is None else rank), (info.world_size if world_size is None else world_size)
