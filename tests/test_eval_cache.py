"""The evaluation reuses what it computed: FID/KID reference features cached per reference
set (keyed by the shards and the extractor's weights) give the same FID/KID a second time,
the CLIP features of the training latents are decoded once, and the report says which."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import _random_inception, _tiny_clip, _write
from test_pipeline import build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse fixture)

from bld_t2i.cli.evaluate import main as evaluate_main
from bld_t2i.eval.cache import cache_key, default_cache_dir, file_digest, lookup, shards_fingerprint
from bld_t2i.eval.fid import fid_kid, frechet_distance, kernel_distance


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The shared tiny text model, its drawings, autoencoder and latents (test_pipeline.build_tiny_model)."""
    root = shared_root(tmp_path_factory)
    build_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return _random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_reference_features_are_cached_and_give_the_same_fid_kid(tiny, inception, tmp_path):
    spec = str(tiny / "images" / "draw-{000000..000001}.tar")
    generated = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        metric = fid_kid(inception, spec, 32, 8, torch.device("cpu"), 64, tmp_path / "cache")
        runs.append((metric, metric(generated), time.perf_counter() - start))
    (first, scores1, t1), (second, scores2, t2) = runs
    print(f"\nreference statistics: first run {t1:.2f} s ({first.reuse.describe()}); second run {t2:.2f} s "
          f"({second.reuse.describe()})")
    assert first.reuse.status == "computed" and second.reuse.status == "reused" and first.reuse.path == second.reuse.path
    assert first.reuse.count == 8 and second.reuse.computed_at == first.reuse.computed_at
    assert np.array_equal(first.reference, second.reference) and scores1 == scores2  # the same FID/KID, exactly
    assert scores1["fid"] > 0 and np.isfinite(scores1["kid"])
    files = list((tmp_path / "cache" / "fid_reference").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # written atomically: no temp file left
    # another image count, or a different set of shards, is another key; refresh recomputes, off keeps nothing
    assert fid_kid(inception, spec, 32, 6, torch.device("cpu"), 64, tmp_path / "cache").reuse.status == "computed"
    one = str(tiny / "images" / "draw-000000.tar")
    assert fid_kid(inception, one, 32, 8, torch.device("cpu"), 64, tmp_path / "cache").reuse.status == "computed"
    assert fid_kid(inception, spec, 32, 8, torch.device("cpu"), 64, tmp_path / "cache",
                   "refresh").reuse.status == "computed"
    off = fid_kid(inception, spec, 32, 8, torch.device("cpu"), 64, tmp_path / "off", "off")
    assert off.reuse.status == "computed, not cached" and not (tmp_path / "off").exists()


def test_cache_keys_follow_the_shards_and_the_weights(tmp_path, monkeypatch):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    before = shards_fingerprint(str(shard))
    assert before["manifests"] == {str(tmp_path): None} and before["shards"][0]["size"] == 10
    shard.write_bytes(b"y" * 11)  # no manifest: size and modification time
    assert cache_key(shards_fingerprint(str(shard))) != cache_key(before)
    (tmp_path / "manifest.json").write_text(json.dumps({"total": 1}))
    with_manifest = shards_fingerprint(str(shard))
    assert with_manifest["manifests"][str(tmp_path)] == {"total": 1} and "mtime" not in with_manifest["shards"][0]
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"1")
    digest = file_digest(weights)
    weights.write_bytes(b"2")
    assert file_digest(weights) != digest
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bld_t2i"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "bld_t2i"
    # a damaged cache file is computed again, not an error
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3)}, 3

    arrays, reuse = lookup("thing", tmp_path / "c", {"k": 1}, "use", compute)
    Path(reuse.path).write_bytes(b"not an npz")
    again, reuse2 = lookup("thing", tmp_path / "c", {"k": 1}, "use", compute)
    assert len(calls) == 2 and reuse2.status == "computed" and np.array_equal(again["x"], arrays["x"])
    assert lookup("thing", tmp_path / "c", {"k": 1}, "use", compute)[1].status == "reused" and len(calls) == 2


def test_fid_and_kid_from_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)).astype(np.float32)
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = a + 1.0  # FID of a shift by 1 in each of 8 dimensions: |mu_r - mu_g|^2 = 8
    assert abs(frechet_distance(a, shifted) - 8) < 1e-6
    from torchmetrics.image.kid import poly_mmd

    from bld_t2i.eval.fid import _mmd2

    assert np.isclose(_mmd2(a[:50].astype(np.float64), shifted[:50].astype(np.float64)),
                      float(poly_mmd(torch.from_numpy(a[:50]).double(), torch.from_numpy(shifted[:50]).double())))
    same = rng.normal(size=(200, 8)).astype(np.float32)  # another draw of the same distribution
    kid, std = kernel_distance(a, same, subsets=50, subset_size=100)
    far, _ = kernel_distance(a, shifted, subsets=50, subset_size=100)
    assert abs(kid) < 0.1 and far > 5 and std > 0
    assert kernel_distance(a, shifted, subsets=10, subset_size=50) == kernel_distance(a, shifted, subsets=10,
                                                                                      subset_size=50)


def test_a_second_evaluation_reuses_reference_and_clip_features(tiny, inception, tmp_path):
    """Two evaluations into two folders on the same reference set and latent data set: the
    second reads the reference statistics and the CLIP training features from the cache,
    says so in the report, and gives the same FID/KID and neighbours."""
    sheet = _write(tmp_path / "s.txt", "red apple\nunicorn face\n")
    clip = _tiny_clip(tmp_path / "clip")
    reports, seconds = [], []
    for run in ("first", "second"):
        start = time.perf_counter()
        evaluate_main(["--model", str(tiny / "model-cross_attn-empty_caption"), "--prompts", str(sheet),
                       "--out", str(tmp_path / run), "--steps", "4", "--images-per-prompt", "2", "--device", "cpu",
                       "--inception", inception, "--reference", str(tiny / "images" / "draw-{000000..000001}.tar"),
                       "--reference-limit", "8", "--fid-features", "64", "--neighbours", str(tiny / "latents"),
                       "--neighbours-k", "3", "--neighbours-clip", "--clip-model", clip,
                       "--cache-dir", str(tmp_path / "cache")])
        seconds.append(time.perf_counter() - start)
        reports.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    first, second = reports
    r1, r2 = first["reuse"], second["reuse"]
    print(f"\nevaluation: first run {seconds[0]:.2f} s, reference statistics {r1['reference_statistics']['this_run_s']:.3f}"
          f" s; second run {seconds[1]:.2f} s, reference statistics {r2['reference_statistics']['this_run_s']:.3f} s")
    assert r1["reference_statistics"]["status"] == "computed" and r2["reference_statistics"]["status"] == "reused"
    assert r1["clip_neighbour_features"]["status"] == "computed" and r2["clip_neighbour_features"]["status"] == "reused"
    assert r2["neighbours"]["training_latents_decoded"] == 0
    for key in ("fid", "kid", "kid_std", "recall_at_1", "bit_rate_diff_mean"):
        assert first["settings"][0][key] == second["settings"][0][key], key
    n1, n2 = (json.loads((tmp_path / run / "neighbours.json").read_text()) for run in ("first", "second"))
    assert n1 == n2
    html = (tmp_path / "second" / "index.html").read_text()
    assert "reference statistics: reused from " in html and "CLIP features of the training latents: reused" in html
    assert "nothing decoded" in html and "reference statistics: computed (8 images" in (tmp_path / "first" /
                                                                                     "index.html").read_text()
