"""Latent shards: encode -> pack -> write -> load -> unpack == BinaryAutoencoder.encode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bld_t2i.config import AutoencoderConfig, LatentsConfig, StreamConfig, TextEncoderConfig
from bld_t2i.data.images import ImageDecoder, images_to_tensor
from bld_t2i.data.latents import latent_loader, pack_bits, unpack_bits, unpack_bits_tensor
from bld_t2i.data.shards import ShardError, TarShardWriter, expand_urls, iter_samples, open_shard
from bld_t2i.data.stream import SkipSample
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.text_encoders import build_text_encoder

TOOLS = os.path.join(os.path.dirname(__file__), "..", "data_tools")


def png_bytes(size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    """A random-initialised 32px autoencoder exported to a folder: (model, folder)."""
    torch.manual_seed(0)
    ae = BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny", resolution=32)).eval()
    folder = str(tmp_path_factory.mktemp("ae") / "export")
    ae.save_pretrained(folder)
    return ae, folder


def test_pack_unpack_roundtrip_and_bit_order():
    bits = np.random.default_rng(0).random((5, 3, 2, 7)) > 0.5  # odd sizes: 42 bits, padded to 6 bytes
    packed = pack_bits(bits)
    assert packed.shape == (5, 6)
    assert np.array_equal(unpack_bits(packed, (3, 2, 7)), bits.reshape(5, 6, 7))
    # the trainer's unpacking on the device: the same bits
    assert np.array_equal(unpack_bits_tensor(torch.from_numpy(packed), (3, 2, 7)).numpy(), bits.reshape(5, 6, 7))
    one = np.zeros((1, 1, 1, 8), bool)
    one[0, 0, 0, 0] = True  # the first bit of the C-order flattening is the byte's most significant
    assert pack_bits(one)[0, 0] == 0x80


def reference_codes(ae, spec: str, batch_size: int) -> dict[str, np.ndarray]:
    """What BinaryAutoencoder.encode gives on the same decoded images in the same batches."""
    decoder = ImageDecoder(ae.resolution, "center_crop", 8)
    out = {}
    for url in expand_urls(spec):
        items = []
        with open_shard(url) as f:
            try:
                for raw in iter_samples(f, url, max_member_bytes=StreamConfig.max_member_bytes):
                    try:
                        items.append(decoder.sample(raw))
                    except SkipSample:
                        pass
            except ShardError:
                pass
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            codes = ae.encode(images_to_tensor([c[0] for c in chunk])).numpy()  # (B, h, w, C) bool
            out.update({c[2]: code.reshape(-1, code.shape[-1]) for c, code in zip(chunk, codes)})
    return out


def test_encode_load_unpack_equals_autoencoder(tmp_path, tiny_ae, write_image_shards, load_tool):
    ae, folder = tiny_ae
    spec = write_image_shards(str(tmp_path / "img"), num_shards=2, per_shard=5, size=40)
    with TarShardWriter(str(tmp_path / "img" / "img-000002.tar")) as w:  # bad inputs are skipped, counted
        w.write({"__key__": "zero", "png": b"", "txt": b"zero"})
        w.write({"__key__": "nocap", "png": png_bytes(40)})
        w.write({"__key__": "junk", "jpg": b"not a jpeg", "txt": b"junk"})
        for key in ("tail0", "tail1"):  # the tar is cut inside tail1: tail0 survives
            w.write({"__key__": key, "png": png_bytes(40), "txt": f"caption {key}".encode(), "json": b'{"label": 0}'})
    with open(tmp_path / "img" / "img-000002.tar", "rb") as f:
        cut = list(iter_samples(f, "img-000002.tar", max_member_bytes=StreamConfig.max_member_bytes))[-1].offset + 600
    os.truncate(tmp_path / "img" / "img-000002.tar", cut)
    spec = str(tmp_path / "img" / "img-{000000..000002}.tar")
    recipe = tmp_path / "te.yaml"
    recipe.write_text("text_encoder: {kind: hf, name: bert, random_init: true, max_length: 8}\n")
    out = str(tmp_path / "lat")
    load_tool("encode_latents").main(["--shards", spec, "--autoencoder", folder, "--out", out, "--batch-size", "3",
                                      "--recipe", str(recipe)])
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["total"] == 11 and manifest["latent_shape"] == [4, 4, 16]
    assert manifest["skipped"] == {"zero_byte": 1, "missing_caption": 1, "corrupt_image": 1, "truncated_tar": 1}
    assert manifest["autoencoder_fingerprint"] == ae.fingerprint

    cfg = LatentsConfig(shards=os.path.join(out, "latents-{000000..000002}.tar"), batch_size=4, num_workers=0,
                        use_embeddings=True)
    batches = list(latent_loader(cfg, seed=0, fingerprint=ae.fingerprint, latent_shape=ae.latent_shape, finite=True))
    ref = reference_codes(ae, spec, batch_size=3)
    text = build_text_encoder(TextEncoderConfig(kind="hf", name="bert", random_init=True, max_length=8), "cpu")
    seen = []
    for b in batches:
        bits = unpack_bits_tensor(b["packed"], ae.latent_shape)
        assert bits.shape[1:] == (16, 16) and b["emb"].dtype == torch.float16
        enc = text.encode(b["caption"])
        for i, key in enumerate(b["key"]):
            seen.append(key)
            assert np.array_equal(bits[i].numpy(), ref[key])
            assert b["caption"][i] == f"caption {key}" and b["label"][i] == int(key[-1]) % 3
            n = int(enc["mask"][i].sum())
            assert b["emb_mask"][i].sum() == n
            assert torch.equal(b["emb"][i, :n], enc["tokens"][i][enc["mask"][i]].half())
    assert sorted(seen) == sorted(ref) and "tail0" in seen
    assert os.path.isfile(os.path.join(out, "null_emb.npy"))


def test_killed_encode_rerun_gives_every_sample_once(tmp_path, tiny_ae, write_image_shards, load_tool):
    ae, folder = tiny_ae
    spec = write_image_shards(str(tmp_path / "img"), num_shards=12, per_shard=3, size=32)
    out = str(tmp_path / "lat")
    args = ["--shards", spec, "--autoencoder", folder, "--out", out, "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "encode_latents.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = os.path.join(out, "_parts")
    deadline = time.time() + 120
    while not (os.path.isdir(parts) and os.listdir(parts)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(os.listdir(parts)) < 12, "the kill should land mid-way"
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    load_tool("encode_latents").main(args)
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["total"] == 36 and [s["count"] for s in manifest["shards"]] == [3] * 12
    cfg = LatentsConfig(shards=os.path.join(out, "latents-{000000..000011}.tar"), batch_size=8, num_workers=2)
    keys = [k for b in latent_loader(cfg, 0, ae.fingerprint, ae.latent_shape, finite=True) for k in b["key"]]
    assert sorted(keys) == sorted(f"s{s}-{i:04d}" for s in range(12) for i in range(3))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_latents_of_another_autoencoder_are_refused(tmp_path, tiny_ae, write_image_shards, load_tool):
    ae, folder = tiny_ae
    spec = write_image_shards(str(tmp_path / "img"), num_shards=1, per_shard=2, size=32)
    out = str(tmp_path / "lat")
    load_tool("encode_latents").main(["--shards", spec, "--autoencoder", folder, "--out", out])
    cfg = LatentsConfig(shards=os.path.join(out, "latents-000000.tar"), num_workers=0)
    other = "f" * 64
    with pytest.raises(ValueError, match=f"encoded by autoencoder {ae.fingerprint}.*recipe's autoencoder is {other}"):
        latent_loader(cfg, 0, other, ae.latent_shape)
    with pytest.raises(ValueError, match=r"\(4, 4, 16\).*\(8, 8, 16\)"):
        latent_loader(cfg, 0, ae.fingerprint, (8, 8, 16))


def test_version_1_shards_without_grids_load_as_the_manifests_square(tmp_path):
    """Shards encoded before aspect-ratio buckets have no {key}.grid: their grid is the
    manifest's; a sample whose grid is not the manifest's, or is not [h, w], is skipped."""
    from bld_t2i.checkpoint import atomic_write_bytes
    from bld_t2i.data.latents import BIT_ORDER, FORMAT, MANIFEST

    shape, rng = (2, 3, 8), np.random.default_rng(0)
    bits = rng.random((4, *shape)) > 0.5
    packed = pack_bits(bits)
    with TarShardWriter(str(tmp_path / "latents-000000.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "bits": packed[i].tobytes(), "txt": b"c"})
        w.write({"__key__": "wrong", "bits": packed[0].tobytes(), "grid": b"[3, 3]"})
        w.write({"__key__": "junk", "bits": packed[0].tobytes(), "grid": b"[2]"})
    manifest = {"format": FORMAT, "version": 1, "autoencoder_fingerprint": "f" * 64, "latent_shape": list(shape),
                "bit_order": BIT_ORDER}
    atomic_write_bytes(str(tmp_path / MANIFEST), json.dumps(manifest).encode())
    cfg = LatentsConfig(shards=str(tmp_path / "latents-000000.tar"), batch_size=8, num_workers=0)
    loader = latent_loader(cfg, 0, "e" * 64, shape, finite=True, legacy_fingerprints=("f" * 64,))
    (batch,) = list(loader)
    assert batch["grid"] == (2, 3) and sorted(batch["key"]) == [f"k{i}" for i in range(4)]
    order = [int(k[1]) for k in batch["key"]]
    assert np.array_equal(unpack_bits_tensor(batch["packed"], (2, 3, 8)).numpy(), bits.reshape(4, 6, 8)[order])
    assert loader.skipped() == {"unknown_grid": 1, "corrupt_grid": 1}
