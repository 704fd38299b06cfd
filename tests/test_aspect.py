"""Aspect-ratio buckets end to end: mixed-aspect image shards -> latent shards of three grids
(encode_latents.py with encode.buckets) -> single-grid batches that resume exactly -> the real
trainer on 2 CPU ranks (recipes/test/t2i_aspect_tiny.yaml) -> a wide sample decoded.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bld_t2i.config import AutoencoderConfig, LatentsConfig, StreamConfig, load_config
from bld_t2i.data.images import fit, images_to_tensor, nearest_bucket, parse_buckets
from bld_t2i.data.latents import VERSION, latent_loader, unpack_bits_tensor
from bld_t2i.data.plan import describe_resume
from bld_t2i.data.shards import TarShardWriter, expand_urls, iter_samples, join, open_shard
from bld_t2i.diffusion import keep_factors, sample
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.pipeline import BLDPipeline

from t2i_fixtures import ROOT, free_port, train_env

RECIPE = ROOT / "recipes" / "test" / "t2i_aspect_tiny.yaml"
BUCKETS = load_config(RECIPE).encode.buckets  # 32x32, 24x40, 40x24
GRIDS = {(4, 4), (3, 5), (5, 3)}  # at the tiny autoencoder's factor 8
# (width, height) of the source images and their label: square 0, wide 1, tall 2. Off-ratio
# sizes land in the nearest bucket.
SIZES = [((48, 48), 0), ((80, 48), 1), ((48, 80), 2), ((52, 44), 0), ((96, 50), 1), ((36, 64), 2)]
NUM_SHARDS, PER_SHARD = 4, 24


def png(size: tuple[int, int], label: int, rng) -> bytes:
    """A disc (square), horizontal stripes (wide) or vertical stripes (tall) in a random colour."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    mask = [(x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2, (y // 6) % 2 == 0, (x // 6) % 2 == 0][label]
    colour = rng.integers(0, 256, 3)
    img = np.where(mask[..., None], colour, 255 - colour).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory, load_tool):
    """(autoencoder, its folder, latent shard spec, image shard spec)."""
    root = tmp_path_factory.mktemp("aspect")
    rng = np.random.default_rng(0)
    for s in range(NUM_SHARDS):
        with TarShardWriter(join(str(root / "img"), f"img-{s:06d}.tar")) as w:
            for i in range(PER_SHARD):
                size, label = SIZES[(s + i) % len(SIZES)]
                key = f"s{s}-{i:03d}-{label}"
                w.write({"__key__": key, "png": png(size, label, rng), "txt": f"shape {label}".encode(),
                         "json": json.dumps({"label": label}).encode()})
    torch.manual_seed(0)
    ae = BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", resolution=32, base_width=8, bits=8))
    ae.eval().save_pretrained(root / "ae")
    images = str(root / "img" / f"img-{{000000..{NUM_SHARDS - 1:06d}}}.tar")
    load_tool("encode_latents").main(["--shards", images, "--autoencoder", str(root / "ae"), "--out", str(root / "lat"),
                                      "--recipe", str(RECIPE)])
    return ae, root / "ae", str(root / "lat" / f"latents-{{000000..{NUM_SHARDS - 1:06d}}}.tar"), images


def test_buckets_are_checked_and_chosen_by_aspect_ratio():
    buckets = parse_buckets(BUCKETS, 8)
    assert buckets == [(32, 32), (24, 40), (40, 24)]
    assert [nearest_bucket(w, h, buckets) for (w, h), _ in SIZES] == [(32, 32), (24, 40), (40, 24)] * 2
    for bad, match in [(["30x32"], "multiples"), (["32"], "HxW"), (["32x32", "32X32"], "twice")]:
        with pytest.raises(ValueError, match=f"encode.buckets.*{match}"):
            parse_buckets(bad, 8)
    wide = fit(Image.new("RGB", (96, 50)), (24, 40), "center_crop")  # cover, then the centre
    assert wide.size == (40, 24)


def test_latent_shards_record_each_samples_grid(aspect_data):
    ae, _, latents, images = aspect_data
    manifest = json.loads((Path(latents).parent / "manifest.json").read_text())
    n = NUM_SHARDS * PER_SHARD
    assert manifest["version"] == VERSION and manifest["total"] == n
    assert manifest["buckets"] == [[32, 32], [24, 40], [40, 24]]
    assert manifest["grids"] == {"3x5": n // 3, "4x4": n // 3, "5x3": n // 3}
    # each sample's bits are the autoencoder's code of its image fitted to its bucket
    sources = {}
    for url in expand_urls(images):
        with open_shard(url) as f:
            samples = iter_samples(f, url, max_member_bytes=StreamConfig.max_member_bytes)
            sources.update({raw.key: raw.members["png"] for raw in samples})
    with open_shard(expand_urls(latents)[0]) as f:
        samples = list(iter_samples(f, "latents-000000.tar", max_member_bytes=StreamConfig.max_member_bytes))
    for raw in samples:
        h, w = json.loads(raw.members["grid"])
        img = Image.open(io.BytesIO(sources[raw.key])).convert("RGB")
        H, W = nearest_bucket(*img.size, parse_buckets(BUCKETS, 8))
        assert (h, w) == (H // 8, W // 8)
        code = ae.encode(images_to_tensor([np.asarray(fit(img, (H, W), "center_crop"))]))[0]  # (h, w, C)
        assert raw.members["bits"] == np.packbits(code.numpy().reshape(-1)).tobytes()


def test_loader_batches_by_grid_and_resumes_exactly(aspect_data):
    ae, _, latents, _ = aspect_data
    cfg = LatentsConfig(shards=latents, batch_size=5, num_workers=2, shuffle_window=16)

    def loader(c=cfg, rank=0, world=1, finite=False):
        return latent_loader(c, 3, ae.fingerprint, ae.latent_shape, rank=rank, world_size=world, finite=finite)

    # one epoch: single-grid batches, every bucket, every sample once
    epoch = list(loader(finite=True))
    for b in epoch:
        h, w = b["grid"]
        assert unpack_bits_tensor(b["packed"], (h, w, 8)).shape == (len(b["key"]), h * w, 8)
    assert {b["grid"] for b in epoch} == GRIDS
    keys = [k for b in epoch for k in b["key"]]
    assert len(keys) == NUM_SHARDS * PER_SHARD and len(set(keys)) == len(keys)

    # a resume mid-epoch, with samples waiting in the other buckets, continues bit for bit
    full = loader()
    ref = [next(full) for _ in range(14)]
    first = loader()
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps([first.state_dict()]))  # through JSON, as in a checkpoint
    assert any(at.get("pending") for at in state[0]["workers"].values()), "no sample waited: a weak test"
    resumed = loader()
    resumed.load_state_dict(state)
    for want in ref[5:]:
        got = next(resumed)
        assert got["key"] == want["key"] and got["grid"] == want["grid"] and torch.equal(got["packed"], want["packed"])

    # on 2 ranks instead (another slot count): the epoch is delivered with nothing lost, and
    # only the open shuffle windows' delivered samples come again
    one = LatentsConfig(shards=latents, batch_size=5, num_workers=1, shuffle_window=16)
    start = loader(one, finite=True)
    seen = [k for _ in range(6) for k in next(start)["key"]]
    state = json.loads(json.dumps([start.state_dict()]))
    again = int(describe_resume(state, 2, 1).split("; ")[1].split(" ")[0])
    for rank in range(2):
        rest = loader(one, rank, 2, finite=True)
        rest.load_state_dict(state)
        seen += [k for b in rest for k in b["key"]]
    counts = Counter(seen)
    assert set(counts) == set(keys) and sum(counts.values()) - len(keys) == again


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_on_mixed_grids_then_sample_a_wide_image(tmp_path, aspect_data, zero_stage):
    """2 ranks under ZeRO-2 or ZeRO-3 (parameters gathered per module): both read batches of
    all three grids, so the ranks of one step often hold different grids."""
    ae, ae_folder, latents, _ = aspect_data
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bld_t2i.cli.train", "--recipe", str(RECIPE), f"run.out_dir={out}",
           f"latents.shards={latents}", f"autoencoder.path={ae_folder}", "log.sample_keys=true",
           f"train.zero_stage={zero_stage}"]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    losses = [r["loss"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines())]
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    # keys end in the label, which names the bucket: 0 square, 1 wide, 2 tall
    shapes = [[{k[-1] for k in line.split()[1:]} for line in (out / "sample_keys" / f"rank{r}.txt").read_text().splitlines()]
              for r in range(2)]
    assert all(len(batch) == 1 for rank in shapes for batch in rank)  # one grid per batch
    assert all(set().union(*rank) == {"0", "1", "2"} for rank in shapes)
    assert any(a != b for a, b in zip(*shapes)), "the ranks never held different grids in one step"

    pipe = BLDPipeline.from_pretrained(out / "export", device="cpu")  # the self-contained pipeline folder
    wide = pipe(class_labels=[1], width=40, height=24, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert wide.images[0].size == (40, 24) and wide.latents.shape == (1, 3, 5, 8)
    model = pipe.denoiser
    h, w, C = 3, 5, 8  # the wide bucket's grid
    labels = torch.tensor([1])
    z = sample(lambda z_t, t, c: model(z_t, t, c, grid=(h, w)), (1, h * w, C), keep_factors(16), 4,
               cond={"label": labels}, null_cond=model.null_condition(1, "cpu"), guidance=1.0,
               generator=torch.Generator().manual_seed(0))
    image = ae.decode(z.reshape(1, h, w, C))
    assert image.shape == (1, 3, 24, 40) and torch.isfinite(image).all()
