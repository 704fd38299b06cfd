"""Which bytes each (rank, worker) slot reads: the split, the position, elastic resume.

Split. The shards are dealt to ``slots = world_size * num_workers`` slots, slot
``s = rank * num_workers + worker``. Exact epochs (the default): in epoch ``e`` the shard
list is permuted by a RNG seeded from ``(seed, e)`` and slot ``s`` reads ``perm[s::slots]``,
so an epoch reads every shard once; fewer shards than slots is a start-up error (a slot
with no shard would stall its loader). Resampled (``resampled: true``): in epoch ``e`` slot
``s`` draws ``ceil(shards / slots)`` shards with replacement by a RNG seeded from
``(seed, s, e)``; any number of shards >= 1 feeds any number of slots.

Position. A worker's position is ``(epoch, shard, offset, window, emitted)``: its open
shuffle window starts at byte ``offset`` of the ``shard``-th piece of its epoch and
``emitted`` of the window's samples are out. A piece is ``(url, start byte)``: a whole shard
(start 0) unless an elastic resume cut it. A worker's saved state is its position, its skip
counts, its ``plan``: the explicit pieces of the epochs an elastic resume re-dealt, and its
``pending`` samples (bucketed batches, data/stream.py): read, waiting in a bucket, delivered
by whichever slot inherits them.

Resume. The trainer saves every rank's ``state_dict()`` and hands the whole list back.
With the same slot count each new slot takes over the saved slot of the same number
(its shards, position and window RNG): the epoch continues exactly, nothing is delivered
twice; with the same ranks and workers too, the batch sequence is bit-identical. With
another slot count the epochs still open (from the earliest epoch of any saved slot to the
latest) are re-planned (each saved slot's pending samples move along, like its skip
counts, to new slot ``s % new_slots``, but for those of its open window, which is read
again): the remaining work of epoch ``e`` is, slot by slot in order, the
saved slot's pieces of ``e`` it has not reached, its current piece from its open window's
offset on, nothing for a slot already past ``e``, and they are dealt round-robin to the new
slots; later epochs use the new slot count. Every sample of those epochs not yet
delivered is delivered exactly once. Bound: the samples already delivered from each
saved slot's open window (``emitted``, at most ``shuffle_window - 1`` per slot, so at most
``N * W * (shuffle_window - 1)`` for a checkpoint of N ranks x W workers, precisely the
sum of the saved ``emitted`` less the open windows' pending samples) are delivered again;
nothing else is.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import NamedTuple

import numpy as np


class Position(NamedTuple):
    """Where a worker is; made once per sample, hence a tuple. Its skip counts travel beside it."""

    epoch: int = 0
    shard: int = 0  # index into this slot's pieces of the epoch
    offset: int = 0  # byte offset of the current window's first sample
    window: int = 0  # window index within the epoch
    emitted: int = 0  # samples of the window already emitted


class Piece(NamedTuple):
    url: str
    start: int = 0  # first byte to read: 0, or an open window's offset after an elastic resume


def epoch_shards(urls: list[str], seed: int, epoch: int, slot: int, slots: int, resampled: bool) -> list[str]:
    if resampled:
        draws = np.random.default_rng([seed, slot, epoch]).integers(0, len(urls), -(-len(urls) // slots))
        return [urls[i] for i in draws]
    perm = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in perm[slot::slots]]


def check_split(num_shards: int, world_size: int, num_workers: int, spec: str, resampled: bool) -> None:
    slots = world_size * num_workers
    if num_shards < slots and not resampled:
        raise ValueError(
            f"{num_shards} shard(s) in {spec!r} cannot feed {world_size} rank(s) x {num_workers} "
            f"loader worker(s) = {slots} slots; in exact epochs every slot needs at least one shard "
            f"(write more, smaller shards, use fewer workers, or set resampled: true to draw shards "
            f"with replacement)"
        )


def position_of(state: dict) -> Position:
    return Position(**{k: state[k] for k in Position._fields if k in state})


def plan_of(state: dict) -> dict[int, list[Piece]]:
    return {int(e): [Piece(*p) for p in pieces] for e, pieces in state.get("plan", {}).items()}


def slot_pieces(state: dict, urls, seed: int, epoch: int, slot: int, slots: int, resampled: bool) -> list[Piece]:
    """The pieces of `epoch` of the slot whose saved state is `state`."""
    plan = plan_of(state)
    if epoch in plan:
        return plan[epoch]
    return [Piece(u) for u in epoch_shards(urls, seed, epoch, slot, slots, resampled)]


_STATE_KEYS = ("rank", "world_size", "num_workers", "shards", "batches", "workers")


def shard_list_digest(urls: list[str]) -> str:
    return hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]


def _check_states(states, urls: list[str] | None = None) -> list[dict]:
    """The saved states sorted by rank; an error names what makes the list unusable."""
    if not isinstance(states, (list, tuple)):
        raise TypeError(f"load_state_dict takes the list of every rank's state_dict() (all-gathered), "
                        f"got a {type(states).__name__}")
    if not states:
        raise ValueError("load_state_dict got an empty list of data positions")
    lacking = sorted({k for s in states for k in _STATE_KEYS if k not in s})
    if lacking:
        raise ValueError(f"data position without {lacking}: not a state_dict() of this loader")
    layouts = {(s["world_size"], s["num_workers"]) for s in states}
    ranks = sorted(s["rank"] for s in states)
    if len(layouts) > 1 or ranks != list(range(states[0]["world_size"])):
        raise ValueError(f"data positions from ranks {ranks} with (world_size, num_workers) {sorted(layouts)}: "
                         f"need one state from each rank of one run")
    if urls is not None and states[0]["shards"] != shard_list_digest(urls):
        raise ValueError(f"the data position was saved for another shard list (digest {states[0]['shards']}, "
                         f"this run's {len(urls)} shard(s) give {shard_list_digest(urls)}): resuming needs the "
                         f"same shards in the same order")
    return sorted(states, key=lambda s: s["rank"])


def saved_slots(states: list[dict]) -> list[dict]:
    """Every saved worker state in slot order; a worker that never delivered a batch is at its start."""
    return [s["workers"].get(str(w), {"skipped": {}}) for s in states for w in range(s["num_workers"])]


def open_window_pending(state: dict) -> list[list]:
    """The pending samples of a saved worker state that lie in its open shuffle window."""
    pos = position_of(state)
    return [r for r in state.get("pending", []) if (r[2], r[3]) == (pos.epoch, pos.window)]


def describe_resume(states: list[dict], world_size: int, num_workers: int) -> str | None:
    """A line for the trainer's log when `states` come from another layout; None for the same one."""
    states = _check_states(states)
    n, w = states[0]["world_size"], states[0]["num_workers"]
    if (n, w) == (world_size, num_workers):
        return None
    line = f"resuming a {n} rank x {w} worker data position on {world_size} rank(s) x {num_workers} worker(s)"
    if n * w == world_size * num_workers:
        return line + " (same slot count: each slot continues exactly)"
    again = sum(position_of(s).emitted - len(open_window_pending(s)) for s in saved_slots(states))
    return line + (f" ({n * w} -> {world_size * num_workers} slots: the open epochs' remaining shards are "
                   f"re-dealt; {again} sample(s) of open shuffle windows are delivered again)")


def _replan(slots_saved: list[dict], urls, seed: int, resampled: bool, new_slots: int) -> list[dict]:
    """Worker states of all `new_slots` slots dealing the saved slots' remaining work."""
    old_slots = len(slots_saved)
    positions = [position_of(s) for s in slots_saved]
    first = min(p.epoch for p in positions)
    last = max([p.epoch for p in positions] + [e for s in slots_saved for e in plan_of(s)])
    plans: list[dict[str, list]] = [{} for _ in range(new_slots)]
    for epoch in range(first, last + 1):
        remaining: list[Piece] = []
        for slot, (state, pos) in enumerate(zip(slots_saved, positions)):
            if pos.epoch > epoch:
                continue  # that slot finished the epoch
            pieces = slot_pieces(state, urls, seed, epoch, slot, old_slots, resampled)
            if pos.epoch == epoch:
                pieces = pieces[pos.shard :]
                if pieces:  # the current piece from its open window on
                    pieces[0] = Piece(pieces[0].url, max(pieces[0].start, pos.offset))
            remaining += pieces
        for t in range(new_slots):
            plans[t][str(epoch)] = [list(p) for p in remaining[t::new_slots]]
    skipped = [Counter() for _ in range(new_slots)]
    delivered = [0] * new_slots
    versions = {u: v for state in slots_saved for u, v in state.get("versions", {}).items()}  # any slot may seek there
    pending: list[list] = [[] for _ in range(new_slots)]
    for slot, state in enumerate(slots_saved):  # the counts move along, so their sum over ranks is kept
        skipped[slot % new_slots].update(state.get("skipped", {}))
        delivered[slot % new_slots] += state.get("delivered", 0)
        reread = open_window_pending(state)  # so do the waiting samples, but for the open window's: it is read again
        pending[slot % new_slots] += [r for r in state.get("pending", []) if r not in reread]
    states = [{"epoch": first, "skipped": dict(skipped[t]), "delivered": delivered[t], "versions": versions,
               "plan": plans[t]} for t in range(new_slots)]
    for state, waiting in zip(states, pending):
        if waiting:
            state["pending"] = waiting
    return states


def restore(states, rank: int, world_size: int, num_workers: int, urls, seed: int, resampled: bool):
    """(logical worker -> saved worker state, batches consumed) of this rank, from every rank's saved state."""
    states = _check_states(states, urls)
    slots_saved = saved_slots(states)
    new_slots = world_size * num_workers
    # The same slot count: each slot takes over its namesake whole (shards, position, window RNG).
    slots = slots_saved if len(slots_saved) == new_slots else _replan(slots_saved, urls, seed, resampled, new_slots)
    mine = slots[rank * num_workers : (rank + 1) * num_workers]
    same = (states[0]["world_size"], states[0]["num_workers"]) == (world_size, num_workers)
    # The batch count only means something to the same DataLoader round-robin.
    batches = states[rank]["batches"] if same else 0
    return {str(w): state for w, state in enumerate(mine)}, batches
