"""Image shards: the tar reader, split, shuffle, exact resume without replay, bad inputs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from bld_t2i.config import DataConfig, StreamConfig
from bld_t2i.data.images import image_loader
from bld_t2i.data.plan import epoch_shards
from bld_t2i.data.shards import TarShardWriter, expand_urls, iter_samples

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "shards")


def keys_of(loader, batches: int | None = None) -> list[str]:
    """Keys of the next `batches` batches (all of a finite loader when None)."""
    batches_ = list(loader) if batches is None else [next(loader) for _ in range(batches)]
    return [key for batch in batches_ for key in batch["key"]]


def test_img2dataset_layout_assets():
    """The checked-in shards (img2dataset's {key}.jpg/.txt/.json) decode to the interface."""
    cfg = DataConfig(shards=f"{ASSETS}/tiny-{{000000..000001}}.tar", image_size=8, batch_size=4, num_workers=0)
    batches = list(image_loader(cfg, seed=0, finite=True))
    assert [len(b["key"]) for b in batches] == [4, 2]
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype.is_floating_point
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].tolist() == [-1] * 4
    keys = sum((x["key"] for x in batches), [])
    assert sorted(keys) == [f"{i:09d}" for i in range(6)]
    for x in batches:
        for key, caption, meta in zip(x["key"], x["caption"], x["json"]):
            assert meta["caption"] == caption and meta["key"] == key


def test_tar_reader_offsets_match_tarfile():
    import tarfile

    path = f"{ASSETS}/tiny-000000.tar"
    with open(path, "rb") as f:
        samples = list(iter_samples(f, path, max_member_bytes=StreamConfig.max_member_bytes))
    with tarfile.open(path) as t:
        members = t.getmembers()
    assert [s.offset for s in samples] == [m.offset for m in members[::3]]
    assert samples[1].members["txt"] == b"a blue circle"
    with open(path, "rb") as f:  # a seek to a sample's offset starts there
        rest = iter_samples(f, path, samples[1].offset, max_member_bytes=StreamConfig.max_member_bytes)
        assert [s.key for s in rest] == ["000000001", "000000002"]


def test_split_covers_every_sample_once_per_epoch(tmp_path, write_image_shards):
    spec = write_image_shards(str(tmp_path), num_shards=6, per_shard=5, size=8)
    seen = []
    for rank in range(2):
        cfg = DataConfig(shards=spec, image_size=8, batch_size=3, num_workers=2, shuffle_window=4)
        seen += keys_of(image_loader(cfg, seed=1, rank=rank, world_size=2, finite=True))
    assert len(seen) == 30 and len(set(seen)) == 30


def test_shard_order_changes_with_epoch():
    urls = [f"x-{i}" for i in range(8)]
    assert epoch_shards(urls, 0, 0, 0, 1, False) != epoch_shards(urls, 0, 1, 0, 1, False)
    assert sorted(epoch_shards(urls, 0, 3, 0, 1, False)) == urls


def test_resume_is_exact_and_does_not_reread(tmp_path, write_image_shards):
    spec = write_image_shards(str(tmp_path), num_shards=6, per_shard=40, size=8)
    cfg = DataConfig(shards=spec, image_size=8, batch_size=3, num_workers=2, shuffle_window=7)
    straight = keys_of(image_loader(cfg, seed=5), 31)

    first = image_loader(cfg, seed=5)
    head = keys_of(first, 11)
    state = json.loads(json.dumps(first.state_dict()))
    assert head == straight[: len(head)]

    # Garble every byte a resumed reader has no business reading: the shards each worker
    # finished and, in its current shard, everything before its window's offset (its mtime kept:
    # a shard whose size or mtime changed is refused, test_resume_damage.py).
    urls = expand_urls(spec)
    for worker, at in state["workers"].items():
        shards = epoch_shards(urls, 5, at["epoch"], int(worker), 2, False)
        for done in shards[: at["shard"]]:
            os.truncate(done, 0)
        stat = os.stat(shards[at["shard"]])
        with open(shards[at["shard"]], "r+b") as f:
            f.write(b"\xff" * at["offset"])
        os.utime(shards[at["shard"]], ns=(stat.st_atime_ns, stat.st_mtime_ns))

    resumed = image_loader(cfg, seed=5)
    resumed.load_state_dict([state])
    assert head + keys_of(resumed, 20) == straight
    assert resumed.skipped() == {}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_are_skipped_counted_or_repaired(tmp_path, caplog):
    halves = np.zeros((16, 16, 3), np.uint8)
    halves[:, :8] = (255, 0, 0)
    halves[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored left column is the visual top
    good_jpeg = _jpeg(Image.new("RGB", (16, 16), (0, 255, 0)))
    samples = {
        "rgb": ("jpg", good_jpeg),
        "gray": ("png", _png(Image.new("L", (16, 16), 128))),
        "cmyk": ("jpg", _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0)))),
        "alpha": ("png", _png(Image.new("RGBA", (16, 16), (0, 0, 0, 0)))),
        "sixteen": ("png", _png(Image.fromarray(np.full((16, 16), 65535, np.uint16)))),
        "rotated": ("jpg", _jpeg(Image.fromarray(halves), exif=exif.tobytes())),
        "corrupt": ("jpg", b"this is not an image"),
        "truncated": ("jpg", good_jpeg[: len(good_jpeg) // 2]),
        "tiny": ("png", _png(Image.new("RGB", (4, 4)))),
        "zero": ("png", b""),
    }
    with TarShardWriter(str(tmp_path / "bad-000000.tar")) as w:
        for key, (ext, data) in samples.items():
            w.write({"__key__": key, ext: data, "txt": key.encode()})
        w.write({"__key__": "nocaption", "png": _png(Image.new("RGB", (16, 16)))})
    # A second shard cut inside its third member: the two samples before the cut survive.
    with TarShardWriter(str(tmp_path / "bad-000001.tar")) as w:
        for key in ("cut0", "cut1", "cut2"):
            w.write({"__key__": key, "jpg": good_jpeg, "txt": key.encode()})
    with open(tmp_path / "bad-000001.tar", "rb") as f:
        third = list(iter_samples(f, "bad-000001.tar", max_member_bytes=StreamConfig.max_member_bytes))[2].offset
    os.truncate(tmp_path / "bad-000001.tar", third + 512 + 100)

    (tmp_path / "bad-000002.tar").write_bytes(b"")  # a zero-byte shard
    cfg = DataConfig(shards=str(tmp_path / "bad-{000000..000002}.tar"), image_size=16, resize="stretch",
                     batch_size=4, num_workers=0)
    loader = image_loader(cfg, seed=0, finite=True)
    with caplog.at_level("WARNING", logger="bld_t2i.data"):
        out = {}
        for b in loader:
            out.update({k: img for k, img in zip(b["key"], b["image"])})
    assert sorted(out) == sorted(["rgb", "gray", "cmyk", "alpha", "sixteen", "rotated", "cut0", "cut1"])
    assert loader.skipped() == {"corrupt_image": 1, "truncated_image": 1, "tiny": 1, "zero_byte": 1,
                                "missing_caption": 1, "truncated_tar": 1, "empty_shard": 1}
    assert "(truncated_tar)" in caplog.text and "corrupt_image" in caplog.text
    pixel = lambda key, y, x: ((out[key][:, y, x] + 1) * 127.5).round().tolist()  # noqa: E731
    assert pixel("gray", 8, 8) == [128, 128, 128]
    assert pixel("alpha", 8, 8) == [255, 255, 255]  # transparent on white
    assert pixel("sixteen", 8, 8) == [255, 255, 255]  # 16-bit scaled to 8
    r, g, b = pixel("cmyk", 8, 8)
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    top, bottom = pixel("rotated", 1, 8), pixel("rotated", 14, 8)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # EXIF rotation applied


def test_too_few_shards_is_an_error_naming_the_counts():
    cfg = DataConfig(shards=f"{ASSETS}/tiny-{{000000..000001}}.tar", num_workers=2)
    counts = r"2 shard\(s\).*2 rank\(s\) x 2 loader worker\(s\) = 4 slots.*set resampled: true"
    with pytest.raises(ValueError, match=counts):
        image_loader(cfg, seed=0, rank=0, world_size=2)


def test_missing_shard_is_a_clear_error():
    cfg = DataConfig(shards=f"{ASSETS}/tiny-{{000000..000002}}.tar", num_workers=0)
    with pytest.raises(FileNotFoundError, match="tiny-000002.tar"):
        image_loader(cfg, seed=0)


def test_resume_refuses_another_shard_list_or_a_single_state(tmp_path, write_image_shards):
    spec = write_image_shards(str(tmp_path), num_shards=3, per_shard=4, size=8)
    a = image_loader(DataConfig(shards=spec, image_size=8, batch_size=2, num_workers=1), seed=0)
    next(a)
    fewer = image_loader(DataConfig(shards=spec.replace("000002", "000001"), image_size=8, num_workers=1), seed=0)
    with pytest.raises(ValueError, match=r"another shard list .* this run's 2 shard\(s\)"):
        fewer.load_state_dict([a.state_dict()])
    with pytest.raises(TypeError, match="list of every rank's state_dict"):
        fewer.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"ranks \[0\] .* one state from each rank"):
        image_loader(DataConfig(shards=spec, num_workers=1), seed=0, rank=0, world_size=2).load_state_dict(
            [{**a.state_dict(), "world_size": 2}])


def test_make_shards_sources(tmp_path, load_tool, capsys):
    main = load_tool("make_shards").main
    with pytest.raises(SystemExit, match="--skip-caption: not a regular expression"):
        main(["--source", "emoji", "--out", str(tmp_path / "bad"), "--skip-caption", "skin (tone"])
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(src / f"im{i}.jpg")
        if i != 3:
            (src / f"im{i}.txt").write_text(f"picture {i}")
    main(["--source", "folder", "--input", str(src), "--out", str(tmp_path / "folder"), "--shard-size", "3",
          "--size", "16"])
    m = json.loads((tmp_path / "folder" / "manifest.json").read_text())
    assert (m["total"], [s["count"] for s in m["shards"]], m["skipped"]) == (4, [3, 1], {"missing_caption": 1})

    (src / "pairs.tsv").write_text("path\ttext\nim0.jpg\tfirst\nim1.jpg\tsecond\nmissing.jpg\tthird\n")
    main(["--source", "csv", "--input", str(src / "pairs.tsv"), "--image-col", "path", "--caption-col", "text",
          "--out", str(tmp_path / "csv")])
    m = json.loads((tmp_path / "csv" / "manifest.json").read_text())
    assert (m["total"], m["skipped"]) == (2, {"missing_image": 1})

    main(["--source", "fashion-mnist", "--size", "32", "--limit", "20", "--shard-size", "10",
          "--out", str(tmp_path / "fm")])
    m = json.loads((tmp_path / "fm" / "manifest.json").read_text())
    assert m["total"] == 20 and len(m["labels"]) <= 10
    batch = next(image_loader(DataConfig(shards=str(tmp_path / "fm/shard-{000000..000001}.tar"), image_size=32,
                                         batch_size=20, num_workers=0), seed=0, finite=True))
    assert set(batch["caption"]) <= {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                     "Sneaker", "Bag", "Ankle boot"}
    assert batch["label"].min() >= 0

    main(["--source", "emoji", "--size", "32", "--limit", "12", "--out", str(tmp_path / "emoji"),
          "--contact-sheet", str(tmp_path / "sheet.png"), "--skip-caption", "medal|button"])
    m = json.loads((tmp_path / "emoji" / "manifest.json").read_text())
    assert m["total"] == 12 and Image.open(tmp_path / "sheet.png").size == (16 * 64, 64)
    assert m["skipped"]["caption_matched_skip"] == 5  # the names are sorted: 3 medals, 2 buttons come first
    batch = next(image_loader(DataConfig(shards=str(tmp_path / "emoji/shard-000000.tar"), image_size=32,
                                         batch_size=12, num_workers=0), seed=0, finite=True))
    assert all(c.strip() and "medal" not in c and "button" not in c for c in batch["caption"])
    assert all(meta["category"] for meta in batch["json"])
    assert (batch["image"] < 0.9).float().mean() > 0.05  # a picture, not a blank page


def test_a_worker_whose_shards_hold_nothing_usable_errors_instead_of_hanging(tmp_path):
    for s in range(2):
        with TarShardWriter(str(tmp_path / f"bad-{s:06d}.tar")) as w:
            w.write({"__key__": "zero", "png": b"", "txt": b"zero"})
    cfg = DataConfig(shards=str(tmp_path / "bad-{000000..000001}.tar"), batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match=r"whole epoch .* no usable sample \(skipped: \{'zero_byte': 2\}\)"):
        next(image_loader(cfg, seed=0))
