"""Resuming from a damaged run folder: a torn stats line, a broken `checkpoints/latest`, a shard
rewritten since the checkpoint."""

from __future__ import annotations

import json
import logging

import pytest

from bld_t2i import checkpoint as files
from bld_t2i.config import DataConfig, LogConfig, load_config
from bld_t2i.data.images import image_loader
from bld_t2i.data.plan import epoch_shards
from bld_t2i.data.reader import ShardChanged
from bld_t2i.data.shards import expand_urls
from bld_t2i.tracking import StatsLogger


def test_a_torn_stats_line_is_dropped_with_a_warning(tmp_path, caplog):
    lines = [json.dumps({"samples": s, "loss": 0.5}) for s in (100, 200, 300)]
    (tmp_path / "stats.jsonl").write_text("\n".join(lines) + '\n{"samples": 400, "lo')  # a disk full mid-line
    with caplog.at_level(logging.WARNING, logger="bld_t2i.tracking"):
        StatsLogger(tmp_path, load_config(), LogConfig(), "run", resume_samples=200).close()
    assert (tmp_path / "stats.jsonl").read_text().splitlines() == lines[:2]
    assert "stats.jsonl line 4 is not a JSON record" in caplog.text


def checkpoints(tmp_path):
    """Two complete checkpoints, step 1 and 2, and a newer folder without its completeness marker."""
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        files.save_folder(folder, files.step_tag(step), lambda tmp, step=step: (tmp / "n").write_text(str(step)))
    (folder / files.step_tag(3)).mkdir()  # copied in part, or written by hand: not complete
    return folder


@pytest.mark.parametrize("pointer", ["", "step_000000009", "..", ".", "../../etc", "/etc", "step_000000002/..",
                                     "\udcff"])
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, pointer):
    folder = checkpoints(tmp_path)
    assert files.read_latest(folder) == folder / "step_000000002"  # as published
    (folder / files.LATEST).write_bytes(pointer.encode(errors="surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="bld_t2i.checkpoint"):
        assert files.read_latest(folder) == folder / "step_000000002"
    assert "resuming from the newest complete one: step_000000002" in caplog.text


def test_no_complete_checkpoint_is_a_fresh_start(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step_000000001").mkdir(parents=True)  # never completed
    (folder / files.LATEST).write_text("")
    assert files.read_latest(folder) is None


def test_a_shard_rewritten_since_the_checkpoint_is_refused_by_name(tmp_path, write_image_shards):
    spec = write_image_shards(str(tmp_path / "a"), num_shards=2, per_shard=30, size=8)
    cfg = DataConfig(shards=spec, image_size=8, batch_size=3, num_workers=0, shuffle_window=4)
    first = image_loader(cfg, seed=0)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    at = state["workers"]["0"]
    current = epoch_shards(expand_urls(spec), 0, at["epoch"], 0, 1, False)[at["shard"]]
    assert at["offset"] > 0
    # The same URL, other bytes: the shard re-made from another source (other images, other offsets).
    write_image_shards(str(tmp_path / "b"), num_shards=2, per_shard=31, size=9)
    (tmp_path / "a" / current.rsplit("/", 1)[1]).write_bytes((tmp_path / "b" / current.rsplit("/", 1)[1]).read_bytes())
    resumed = image_loader(cfg, seed=0)
    resumed.load_state_dict([state])
    with pytest.raises(ShardChanged, match=rf"shard {current} changed since the position inside it was saved"):
        next(resumed)
