"""The shard stream shared by the image reader and the latent loader.

Split. The shards are dealt to ``slots = world_size * num_workers`` (rank, worker) slots:
in epoch ``e`` the shard list is permuted with a RNG seeded from ``(seed, e)`` and slot
``s = rank * num_workers + worker`` reads ``perm[s::slots]``. Fewer shards than slots is an
error at start-up: a slot with no shard would hang a collective or stall a loader.

Shuffle. Each worker reads its stream in consecutive windows of ``shuffle_window`` raw
samples, permutes each window with a RNG seeded from ``(seed, epoch, slot, window)`` and
emits it. A window may span shards; windows restart with each epoch.

Position. After every emitted sample the worker's position is ``(epoch, shard, offset,
window, emitted)``: the window's first sample is at byte ``offset`` of the slot's
``shard``-th shard of the epoch and ``emitted`` of its samples are out. Restoring seeks
straight to ``offset`` and re-reads that one window (raw bytes; the ``emitted`` samples are
not decoded again) - at most ``shuffle_window`` samples of I/O, never the samples before.

Order. Loaders are infinite (epochs roll over inside each worker), so every torch
DataLoader worker always has a next batch and DataLoader's round-robin is deterministic:
batch ``n`` comes from worker ``n % W``. Each batch carries its worker's position; the
loader keeps the latest one per worker and the number of batches consumed, and on restore
rotates the workers' roles so that the next batch comes from the right logical worker.
A finite mode (one epoch, last batch partial) serves encoding and coverage checks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bld_t2i.data.shards import RawSample, ShardError, check_exist, expand_urls, iter_samples, open_shard
from bld_t2i.distributed import dist_info

log = logging.getLogger("bld_t2i.data")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is its skip-count key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Position(NamedTuple):
    """Where a worker is; made once per sample, hence a tuple. Its skip counts travel beside it."""

    epoch: int = 0
    shard: int = 0  # index into this slot's shards of the epoch
    offset: int = 0  # byte offset of the current window's first sample
    window: int = 0  # window index within the epoch
    emitted: int = 0  # samples of the window already emitted


def epoch_shards(urls: list[str], seed: int, epoch: int, slot: int, slots: int) -> list[str]:
    perm = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in perm[slot::slots]]


def check_split(num_shards: int, world_size: int, num_workers: int, spec: str) -> None:
    slots = world_size * num_workers
    if num_shards < slots:
        raise ValueError(
            f"{num_shards} shard(s) in {spec!r} cannot feed {world_size} rank(s) x {num_workers} "
            f"loader worker(s) = {slots} slots; every slot needs at least one shard "
            f"(write more, smaller shards or use fewer workers)"
        )


def _raw_stream(shards: list[str], pos: Position, skipped: Counter) -> Iterator[tuple[int, RawSample]]:
    """(shard index, sample) from `pos.shard` at `pos.offset` to the end of the epoch.

    A shard that breaks mid-way (truncated or corrupt tar) ends there and is counted, and
    so is a shard without a single sample (a zero-byte file, an empty tar).
    """
    for index in range(pos.shard, len(shards)):
        offset = pos.offset if index == pos.shard else 0
        with open_shard(shards[index]) as f:
            try:
                empty = True
                for sample in iter_samples(f, shards[index], offset):
                    empty = False
                    yield index, sample
                if empty and offset == 0:
                    skipped["empty_shard"] += 1
                    log.warning("shard without samples: %s", shards[index])
            except ShardError as e:
                skipped[e.reason] += 1
                log.warning("skipping the rest of a shard (%s): %s", e.reason, e)


def sample_stream(
    urls: list[str], seed: int, slot: int, slots: int, window: int, pos: Position, finite: bool, skipped: Counter
) -> Iterator[tuple[RawSample, Position]]:
    """The windowed-shuffled raw samples of one slot, each with the position after it.

    Broken shards are counted into `skipped`; positions carry no counts (the caller's).
    An infinite stream marks each epoch's end with ``(None, start of the next epoch)``.
    """
    while True:
        shards = epoch_shards(urls, seed, pos.epoch, slot, slots)
        raw = _raw_stream(shards, pos, skipped)
        while True:
            win = list(islice(raw, window))  # [(shard index, sample)]; the window starts at the first
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


class ShardDataset(IterableDataset):
    """Batches from the shards of this rank; each worker plays a logical worker role."""

    def __init__(self, spec, decoder, batch_size, seed, shuffle_window, rank, world_size, num_workers, finite):
        super().__init__()
        self.urls = expand_urls(spec)
        self.spec = spec
        self.decoder = decoder
        self.batch_size = batch_size
        self.seed = seed
        self.window = shuffle_window
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.finite = finite
        self.resume: dict[str, dict] = {}  # logical worker -> its Position fields and "skipped"
        self.rotation = 0  # physical worker p plays logical worker (p + rotation) % W
        check_split(len(self.urls), world_size, self.num_workers, spec)
        check_exist(self.urls)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        slot, slots = self.rank * self.num_workers + worker, self.world_size * self.num_workers
        saved = self.resume[str(worker)] if str(worker) in self.resume else {"skipped": {}}
        pos = Position(**{k: v for k, v in saved.items() if k in Position._fields})
        skipped = Counter(saved["skipped"])
        items, at = [], pos
        # A full epoch without one usable sample would spin forever: an error instead of a hang.
        full_epoch, used = pos == Position(pos.epoch), 0
        stream = sample_stream(self.urls, self.seed, slot, slots, self.window, pos, self.finite, skipped)
        for raw, at in stream:
            if raw is None:
                if full_epoch and not used:
                    shards = epoch_shards(self.urls, self.seed, at.epoch - 1, slot, slots)
                    raise RuntimeError(f"rank {self.rank} loader worker {worker}: a whole epoch of its shards gave "
                                       f"no usable sample (skipped: {dict(skipped)}); shards: {shards}")
                full_epoch, used = True, 0
                continue
            try:
                items.append(self.decoder.sample(raw))
                used += 1
            except SkipSample as e:
                if e.reason not in skipped:  # the first of each kind is logged; all are counted
                    log.warning("skipping sample %s in %s: %s (further ones counted)", raw.key, raw.url, e.reason)
                skipped[e.reason] += 1
            if len(items) == self.batch_size:
                yield self._batch(items, worker, at, skipped)
                items = []
        if items:
            yield self._batch(items, worker, at, skipped)

    def _batch(self, items, worker, at: Position, skipped: Counter) -> dict:
        batch = self.decoder.collate(items)
        batch["_position"] = {"worker": worker, **at._asdict(), "skipped": dict(skipped)}
        return batch


def _as_is(batch: dict) -> dict:
    """Batches are made in the worker; DataLoader's default would walk every caption and dict."""
    return batch


class ShardLoader:
    """Infinite (or one-epoch) batches for this rank, with `state_dict` for exact resume."""

    def __init__(self, dataset: ShardDataset, num_workers: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self._iter = None
        self._positions: dict[str, dict] = {}
        self._batches = 0

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = iter(DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                prefetch_factor=4 if self.num_workers else None,
            ))
        batch = next(self._iter)
        at = batch.pop("_position")
        self._positions[str(at.pop("worker"))] = at
        self._batches += 1
        return self.dataset.decoder.finish(batch)

    def close(self) -> None:
        """Stop the loader workers now (dropping the DataLoader iterator joins them)."""
        self._iter = None

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, summed over this rank's workers (resume included)."""
        total: Counter = Counter()
        for at in self.state_dict()["workers"].values():
            total.update(at["skipped"])
        return dict(total)

    def state_dict(self) -> dict:
        ds = self.dataset
        workers = {**ds.resume, **self._positions}
        return {"rank": ds.rank, "world_size": ds.world_size, "num_workers": ds.num_workers,
                "batches": self._batches, "workers": workers}

    def load_state_dict(self, state: dict) -> None:
        ds = self.dataset
        for name in ("rank", "world_size", "num_workers"):
            if state[name] != getattr(ds, name):
                raise ValueError(
                    f"data position saved with {name}={state[name]} cannot resume with {name}={getattr(ds, name)}"
                )
        ds.resume = dict(state["workers"])
        ds.rotation = state["batches"] % ds.num_workers
        self._batches = state["batches"]
        self._positions = {}
        self._iter = None


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    info = dist_info()
    return (info.rank if rank is None else rank), (info.world_size if world_size is None else world_size)
