"""Shards and latents through s3:// against a real moto server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

from bld_t2i.config import AutoencoderConfig, DataConfig, LatentsConfig
from bld_t2i.data.images import image_loader
from bld_t2i.data.latents import latent_loader, unpack_bits_tensor
from bld_t2i.data.shards import read_bytes
from bld_t2i.models.binary_ae import BinaryAutoencoder


@pytest.fixture(scope="module")
def bucket(moto_server):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bld-test")
    return "s3://bld-test"


def test_write_read_resume_and_encode_through_s3(bucket, tmp_path, load_tool):
    load_tool("make_shards").main(["--source", "fashion-mnist", "--size", "32", "--limit", "24", "--shard-size", "6",
                                   "--out", f"{bucket}/fm"])
    manifest = json.loads(read_bytes(f"{bucket}/fm/manifest.json"))
    assert manifest["total"] == 24 and len(manifest["shards"]) == 4

    spec = f"{bucket}/fm/shard-{{000000..000003}}.tar"
    cfg = DataConfig(shards=spec, image_size=32, batch_size=4, num_workers=2, shuffle_window=5)
    keys = [k for b in image_loader(cfg, seed=0, finite=True) for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(24)]

    straight = image_loader(cfg, seed=3)
    expected = [next(straight)["key"] for _ in range(5)]
    first = image_loader(cfg, seed=3)
    head = [next(first)["key"] for _ in range(2)]
    resumed = image_loader(cfg, seed=3)
    resumed.load_state_dict([json.loads(json.dumps(first.state_dict()))])  # seeks inside s3 objects
    assert head + [next(resumed)["key"] for _ in range(3)] == expected

    with pytest.raises(FileNotFoundError, match="6 of 10 shard.*not found: s3://bld-test/fm/shard-000004.tar"):
        image_loader(DataConfig(shards=f"{bucket}/fm/shard-{{000000..000009}}.tar", num_workers=0), seed=0)

    torch.manual_seed(0)
    ae = BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", resolution=32))
    ae.save_pretrained(str(tmp_path / "ae"))
    load_tool("encode_latents").main(["--shards", spec, "--autoencoder", str(tmp_path / "ae"),
                                      "--out", f"{bucket}/lat", "--batch-size", "6"])
    lcfg = LatentsConfig(shards=f"{bucket}/lat/latents-{{000000..000003}}.tar", batch_size=8, num_workers=2)
    batches = list(latent_loader(lcfg, 0, ae.fingerprint, ae.latent_shape, finite=True))
    assert sorted(k for b in batches for k in b["key"]) == sorted(keys)
    assert all(unpack_bits_tensor(b["packed"], ae.latent_shape).shape[1:] == (16, 16) for b in batches)
