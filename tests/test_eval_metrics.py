"""The evaluation's metrics that need no downloaded weights, on tiny data: caption recall
from the Hamming search (a sampler that copies its training set scores 1.0, a random one
about chance), class accuracy (a perfect and a random classifier, and the training tool on
drawings), and per-bit statistics on known bits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import CAPTIONS, write_drawings

from bld_t2i.cli.train_classifier import main as train_classifier_main
from bld_t2i.data.latents import FORMAT, VERSION, pack_bits
from bld_t2i.data.shards import TarShardWriter
from bld_t2i.eval.bitstats import LOW, ChannelCounter, bit_stats, channel_rates, dead_or_saturated
from bld_t2i.eval.classifier import Classifier, accuracy
from bld_t2i.eval.data_metrics import search_data
from bld_t2i.eval.metrics import read_images
from bld_t2i.eval.recall import TrainingConditions, normalise_caption, recall_at

SHAPE = (4, 4, 16)
PER_CAPTION = 50  # 4 captions x 50 random latents


def write_latents(folder: Path, bits: np.ndarray, captions: list[str], labels: list[int], per_shard: int = 64) -> str:
    """A latent data set (manifest + shards, the encoder's format) of the given (N, h, w, C) bits."""
    folder.mkdir(parents=True)
    packed = pack_bits(bits)
    shards = []
    for s, lo in enumerate(range(0, len(bits), per_shard)):
        name = f"latents-{s:06d}.tar"
        with TarShardWriter(str(folder / name)) as w:
            for i in range(lo, min(lo + per_shard, len(bits))):
                w.write({"__key__": f"{i:06d}", "bits": packed[i].tobytes(), "txt": captions[i].encode(),
                         "json": json.dumps({"label": labels[i]}).encode()})
        shards.append({"name": name, "count": min(per_shard, len(bits) - lo)})
    manifest = {"format": FORMAT, "version": VERSION, "latent_shape": list(bits.shape[1:]), "shards": shards,
                "total": len(bits)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 random training latents, 50 per caption (label = caption index), in 4 shards."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (len(CAPTIONS) * PER_CAPTION, *SHAPE), dtype=np.uint8)
    labels = [i % len(CAPTIONS) for i in range(len(bits))]
    folder = write_latents(tmp_path_factory.mktemp("latents") / "set", bits, [CAPTIONS[i] for i in labels], labels)
    return folder, bits, labels


# ----------------------------------------------------------------------------- caption recall


def test_a_sampler_that_copies_its_training_set_scores_recall_one(data):
    folder, bits, labels = data
    pick = np.random.default_rng(1).choice(len(bits), 40, replace=False)
    found = search_data(bits[pick], folder, 10)  # "samples" that are exact training latents
    prompts = [f"  {CAPTIONS[labels[i]].upper()} " for i in pick]  # matched after strip / lower
    targets = [found.conditions.target(p, "caption") for p in prompts]
    assert targets == [CAPTIONS[labels[i]] for i in pick]
    assert recall_at(found.found, targets, "caption") == {"recall_at_1": 1.0, "recall_at_10": 1.0}
    by_label = [found.conditions.target(str(labels[i]), "label") for i in pick]
    assert recall_at(found.found, by_label, "label") == {"recall_at_1": 1.0, "recall_at_10": 1.0}
    assert found.channels.latents == len(bits) and found.conditions.labels == {0, 1, 2, 3}


def test_random_samples_score_about_chance(data):
    """Random bits are unrelated to the caption: recall@1 ~ 1/4 (a caption's share of the data)
    and recall@10 ~ 1 - C(150, 10) / C(200, 10) = 0.947; with 400 samples the binomial standard
    deviations are 0.022 and 0.011, the bounds 0.1 and 0.05 (over 4 sigma)."""
    folder, _, _ = data
    rng = np.random.default_rng(2)
    queries = rng.integers(0, 2, (400, *SHAPE), dtype=np.uint8)
    found = search_data(queries, folder, 10)
    targets = [CAPTIONS[i % 4] for i in range(400)]
    r = recall_at(found.found, targets, "caption")
    chance10 = 1 - np.prod([(150 - i) / (200 - i) for i in range(10)])
    assert abs(r["recall_at_1"] - 0.25) < 0.1 and abs(r["recall_at_10"] - chance10) < 0.05, r


def test_unseen_prompts_are_left_out_and_k_beyond_the_search_is_not_reported(data):
    folder, bits, _ = data
    found = search_data(bits[:4], folder, 3)
    assert found.conditions.target("red apples", "caption") is None  # normalised, not stemmed
    assert found.conditions.target("7", "label") is None and found.conditions.target("x", "label") is None
    assert normalise_caption(" Red \t apple ") == "red apple"
    assert recall_at(found.found, [None] * 4, "caption") == {}
    assert recall_at(found.found, ["red apple"] * 4, "caption", ks=(1, 10)).keys() == {"recall_at_1"}
    conditions = TrainingConditions()
    assert conditions.target("red apple", "caption") is None


# ----------------------------------------------------------------------------- class accuracy


def test_accuracy_of_a_perfect_and_a_random_classifier():
    """10,000 labels of 10 classes: a random classifier's accuracy is 0.1 with a binomial
    standard deviation of 0.003; the bound is 0.02."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 10_000)
    assert accuracy(labels, labels) == 1.0
    assert abs(accuracy(rng.integers(0, 10, 10_000), labels) - 0.1) < 0.02
    assert accuracy(torch.tensor([1, 2, 3, 0]), np.array([1, 2, 0, 0])) == 0.75
    with pytest.raises(ValueError):
        accuracy(labels[:3], labels[:4])


def test_the_classifier_tool_learns_drawings_and_is_reloaded(tmp_path):
    """The drawings' four classes differ in colour and shape: the tool's held-out accuracy is 1.0,
    and the saved folder reloads to the same predictions."""
    spec = write_drawings(tmp_path / "drawings", per_caption=16)  # 64 images, labels 0-3
    out = tmp_path / "classifier"
    train_classifier_main(["--shards", spec, "--out", str(out), "--epochs", "12", "--heldout-every", "4",
                           "--batch-size", "16", "--width", "8", "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 4 and config["heldout"]["images"] == 16 and config["train_images"] == 48
    assert config["heldout"]["accuracy"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    clf = Classifier.load(out)
    images, labels = read_images(spec, 32, 0)
    assert accuracy(clf.predict(images), labels) == 1.0
    larger = torch.nn.functional.interpolate(images.float(), size=48).round().byte()  # resized to its 32 px
    assert accuracy(clf.predict(larger), labels) == 1.0
    with pytest.raises(FileNotFoundError, match="not a classifier folder"):
        Classifier.load(tmp_path)


# ----------------------------------------------------------------------------- per-bit statistics


def test_per_bit_statistics_of_known_bits():
    C = 8
    bits = np.zeros((10, 2, 2, C), np.uint8)
    bits[..., 1] = 1  # channel 1 saturated
    bits[:5, ..., 2] = 1  # channel 2 at 0.5
    bits[:, 0, 0, 3] = 1  # channel 3 at 1/4
    rates = channel_rates(bits)
    assert np.allclose(rates, [0, 1, 0.5, 0.25, 0, 0, 0, 0])
    counter = ChannelCounter((2, 2, C))
    counter.add(pack_bits(bits[:4]))
    counter.add(pack_bits(bits[4:]))
    assert counter.latents == 10 and np.allclose(counter.rates, rates)
    assert dead_or_saturated(rates) == 6 / 8  # every channel but 2 and 3 is below LOW or above 0.99
    data = np.full(C, 0.5)
    stats = bit_stats(rates, data)
    assert stats["bit_rate_diff_max"] == 0.5 and np.isclose(stats["bit_rate_diff_mean"], (0.5 * 6 + 0.25) / 8)
    assert stats["dead_or_saturated"] == 0.75 and stats["data_dead_or_saturated"] == 0.0
    assert bit_stats(data, data)["bit_rate_diff_mean"] == 0.0
    assert dead_or_saturated(np.array([LOW / 2, 0.5])) == 0.5
    with pytest.raises(ValueError, match="channels"):
        bit_stats(rates[:4], data)


def test_per_bit_statistics_of_training_copies_match_the_data(data):
    """Samples drawn from the data itself have its rates up to sampling noise: 200 latents x 16
    cells per channel, standard deviation 0.5 / sqrt(3200) = 0.009, so the mean |diff| is < 0.02."""
    folder, bits, _ = data
    found = search_data(bits[:200], folder, 1)
    stats = bit_stats(channel_rates(bits[:200]), found.channels.rates)
    assert stats["bit_rate_diff_max"] < 1e-12  # the same latents
    rng = np.random.default_rng(3)
    other = rng.integers(0, 2, (200, *SHAPE), dtype=np.uint8)
    assert bit_stats(channel_rates(other), found.channels.rates)["bit_rate_diff_mean"] < 0.02


# ----------------------------------------------------------------------------- in the evaluation


def test_class_model_evaluation_reports_accuracy_recall_and_bit_stats(tmp_path, tmp_path_factory):
    """A tiny class-conditional model evaluated with a classifier trained on its own drawings
    (and on its autoencoder's reconstructions of them): every new metric is in metrics.json,
    metrics.csv, prompts.csv and the HTML, the classifier's held-out accuracy beside them."""
    from test_pipeline import build_tiny_model, shared_root

    from bld_t2i.cli.evaluate import main as evaluate_main

    root = shared_root(tmp_path_factory)
    model = build_tiny_model(root, "class", null_cond="learned", train_steps=4)
    classifier = tmp_path / "classifier"
    train_classifier_main(["--shards", str(root / "images" / "draw-{000000..000001}.tar"), "--out", str(classifier),
                           "--epochs", "8", "--heldout-every", "4", "--batch-size", "8", "--width", "8",
                           "--device", "cpu", "--autoencoder", str(root / "ae"), "--reconstructions", "0.5"])
    held = json.loads((classifier / "config.json").read_text())["heldout"]
    assert 0 <= held["reconstructed_accuracy"] <= 1 and held["images"] == 6
    sheet = tmp_path / "classes.jsonl"
    sheet.write_text("".join(json.dumps({"id": c.replace(" ", "_"), "prompt": str(i)}) + "\n"
                             for i, c in enumerate(CAPTIONS)))
    out = tmp_path / "out"
    evaluate_main(["--model", str(model), "--prompts", str(sheet), "--out", str(out), "--steps", "4",
                   "--guidance", "0,2", "--images-per-prompt", "2", "--device", "cpu", "--classifier", str(classifier),
                   "--neighbours", str(root / "latents"), "--neighbours-k", "10"])
    report = json.loads((out / "metrics.json").read_text())
    assert report["classifier"]["accuracy"] == held["accuracy"] and "class_accuracy" not in report["skipped"]
    for s in report["settings"]:
        assert 0 <= s["class_accuracy"] <= 1 and s["seen_prompts"] == 4  # every label is a training label
        assert 0 <= s["recall_at_1"] <= s["recall_at_10"] <= 1
        assert 0 <= s["bit_rate_diff_mean"] <= s["bit_rate_diff_max"] <= 1
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"class_accuracy", "recall_at_1", "recall_at_10", "bit_rate_diff_mean", "dead_or_saturated"} <= set(header)
    assert "class_accuracy" in (out / "prompts.csv").read_text().splitlines()[0]
    html = (out / "index.html").read_text()
    assert "class accuracy" in html and "recall@10" in html and "dead/saturated channels" in html
    assert "on their autoencoder reconstructions" in html and "nothing decoded" in html
