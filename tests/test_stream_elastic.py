"""Elastic resume (another number of ranks or workers) and resampled shards, at the loader level."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import DataConfig, LatentsConfig
from bld_t2i.data.images import image_loader
from bld_t2i.data.latents import BIT_ORDER, FORMAT, MANIFEST, VERSION, latent_loader, pack_bits
from bld_t2i.data.plan import describe_resume, epoch_shards
from bld_t2i.data.shards import TarShardWriter, join

SHAPE = (2, 2, 8)
FINGERPRINT = "f" * 64


def write_latent_shards(folder: str, num_shards: int, per_shard: int) -> str:
    """A latent data set of random codes, keys "s{shard}-{i}"; returns its brace spec."""
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        with TarShardWriter(join(folder, f"latents-{s:06d}.tar")) as w:
            packed = pack_bits(rng.random((per_shard, *SHAPE)) > 0.5)
            for i in range(per_shard):
                w.write({"__key__": f"s{s}-{i:04d}", "bits": packed[i].tobytes(), "txt": b"a caption",
                         "json": json.dumps({"label": i % 3}).encode()})
    manifest = {"format": FORMAT, "version": VERSION, "autoencoder_fingerprint": FINGERPRINT,
                "latent_shape": list(SHAPE), "bit_order": BIT_ORDER}
    atomic_write_bytes(join(folder, MANIFEST), json.dumps(manifest).encode())
    return join(folder, f"latents-{{000000..{num_shards - 1:06d}}}.tar")


def gathered(loaders) -> list[dict]:
    """What the trainer saves: every rank's state, through JSON as in a checkpoint."""
    return json.loads(json.dumps([loader.state_dict() for loader in loaders]))


def steps(loaders, n: int) -> list[str]:
    """Keys of `n` data-parallel steps: each rank takes one batch per step, in lockstep."""
    return [key for _ in range(n) for loader in loaders for key in next(loader)["key"]]


def test_latents_resume_on_other_ranks_and_workers_delivers_the_epoch_once(tmp_path):
    """2 ranks x 1 worker -> 1 rank x 2 workers -> 2 ranks x 1 worker: the same 2 slots, so
    each continues its saved slot exactly and no sample comes twice, not even from a window."""
    spec = write_latent_shards(str(tmp_path), num_shards=6, per_shard=20)
    cfg = LatentsConfig(shards=spec, batch_size=4, num_workers=1, shuffle_window=8)

    def make(ranks: int, c: LatentsConfig) -> list:
        return [latent_loader(c, 7, FINGERPRINT, SHAPE, rank=r, world_size=ranks, finite=True) for r in range(ranks)]

    first = make(2, cfg)
    seen = steps(first, 5)
    states = gathered(first)

    two_workers = LatentsConfig(shards=spec, batch_size=4, num_workers=2, shuffle_window=8)
    (middle,) = make(1, two_workers)
    assert describe_resume(states, 1, 2) == ("resuming a 2 rank x 1 worker data position on 1 rank(s) x 2 "
                                             "worker(s) (same slot count: each slot continues exactly)")
    middle.load_state_dict(states)
    seen += steps([middle], 6)
    states = gathered([middle])

    last = make(2, cfg)
    assert describe_resume(states, 2, 1) is not None and describe_resume(states, 1, 2) is None
    for loader in last:
        loader.load_state_dict(states)
        seen += [key for batch in loader for key in batch["key"]]
    assert len(seen) == 120 and Counter(seen) == Counter(f"s{s}-{i:04d}" for s in range(6) for i in range(20))


def take(loader) -> tuple[int, str]:
    """(epoch, key) of the next one-sample batch; the epoch is that of the position after it."""
    was = loader.state_dict()["workers"]
    (key,) = next(loader)["key"]
    (moved,) = [at for w, at in loader.state_dict()["workers"].items() if at != was.get(w)]
    return moved["epoch"], key


def test_images_resume_on_another_slot_count_replans_the_epoch(tmp_path, write_image_shards):
    """2 slots -> 3 slots -> 2 workers of one rank, infinite loaders as the AE trainer uses
    them: in the open epoch every key comes at least once and at most the saved open windows'
    samples twice; the next epoch, dealt to the new slots normally, has every key exactly once."""
    spec = write_image_shards(str(tmp_path), num_shards=5, per_shard=8, size=8)
    all_keys = Counter(f"s{s}-{i:04d}" for s in range(5) for i in range(8))
    cfg = lambda workers: DataConfig(shards=spec, image_size=8, batch_size=1, num_workers=workers,  # noqa: E731
                                     shuffle_window=5)
    first = [image_loader(cfg(1), seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [take(loader) for _ in range(6) for loader in first]
    states = gathered(first)
    again = sum(at["emitted"] for s in states for at in s["workers"].values())

    three = [image_loader(cfg(1), seed=3, rank=r, world_size=3) for r in range(3)]
    for loader in three:
        loader.load_state_dict(states)
    assert f"{again} sample(s) of open shuffle windows" in describe_resume(states, 3, 1)
    seen += [take(loader) for _ in range(4) for loader in three]
    states = gathered(three)
    again += sum(at["emitted"] for s in states for at in s["workers"].values())

    # The re-planned epoch survives an exact resume: a copy resumed on 3 ranks continues identically.
    copy = [image_loader(cfg(1), seed=3, rank=r, world_size=3) for r in range(3)]
    for loader in copy:
        loader.load_state_dict(states)
    assert steps(copy, 3) == steps(three, 3)

    one = image_loader(cfg(2), seed=3, rank=0, world_size=1)
    one.load_state_dict(states)
    while not all(at.get("epoch", 0) >= 2 for at in one.state_dict()["workers"].values()):
        seen.append(take(one))  # until both workers have delivered all of epoch 1
    counts = Counter(key for epoch, key in seen if epoch == 0)
    assert set(counts) == set(all_keys)  # nothing of the open epoch is lost
    # Repeats: at most the saved open windows' samples, each resume at most slots x (window - 1).
    assert sum(counts.values()) - 40 <= again <= (2 + 3) * (5 - 1)
    assert Counter(key for epoch, key in seen if epoch == 1) == all_keys  # the new slots, each key once
    assert one.skipped() == {}


def test_resampled_mode_feeds_more_slots_than_shards_and_resumes(tmp_path, write_image_shards):
    spec = write_image_shards(str(tmp_path), num_shards=2, per_shard=6, size=8)
    urls = [join(str(tmp_path), f"img-{s:06d}.tar") for s in range(2)]
    draws = [epoch_shards(urls, 0, e, slot, 4, True) for e in range(4) for slot in range(4)]
    assert all(len(d) == 1 for d in draws) and {d[0] for d in draws} == set(urls)  # with replacement

    cfg = DataConfig(shards=spec, image_size=8, batch_size=3, num_workers=2, shuffle_window=4, resampled=True)
    ranks = lambda: [image_loader(cfg, seed=0, rank=r, world_size=2) for r in range(2)]  # noqa: E731
    straight = steps(ranks(), 8)
    first = ranks()
    head = steps(first, 3)
    resumed = ranks()
    for loader in resumed:
        loader.load_state_dict(gathered(first))
    assert head + steps(resumed, 5) == straight  # same world: exact

    one = image_loader(DataConfig(shards=spec, image_size=8, batch_size=3, num_workers=0, resampled=True), seed=0)
    one.load_state_dict(gathered(first))  # 4 slots -> 1: the open epochs' draws continue, then its own
    assert set(steps([one], 10)) <= {f"s{s}-{i:04d}" for s in range(2) for i in range(6)}


def test_resampled_shards_without_a_usable_sample_error_once_all_were_drawn(tmp_path):
    for s in range(3):
        with TarShardWriter(str(tmp_path / f"bad-{s:06d}.tar")) as w:
            w.write({"__key__": f"zero{s}", "png": b"", "txt": b"zero"})
    cfg = DataConfig(shards=str(tmp_path / "bad-{000000..000002}.tar"), batch_size=2, num_workers=0, resampled=True)
    loader = image_loader(cfg, seed=0, rank=0, world_size=4)
    with pytest.raises(RuntimeError, match=r"whole epoch .* no usable sample \(skipped: \{'zero_byte': \d+\}\)"):
        next(loader)
