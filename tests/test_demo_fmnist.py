"""The Fashion-MNIST demos (data_tools/demo_fmnist.py): the unconditional one end to end in
its --quick form (real Fashion-MNIST, every stage's real command line, ~3 min), and the
demos' own parts: the inpainting inputs cut from a real shard, the prompt sheets and recipes
and the closing summary. The full demos take ~15 min each and are run by hand."""

from __future__ import annotations

import glob
import json

import numpy as np
from PIL import Image

from bld_t2i.config import load_config
from bld_t2i.data.latents import read_manifest
from bld_t2i.data.sources import FASHION_MNIST_CLASSES
from bld_t2i.eval.bitstats import ChannelCounter, bit_stats
from bld_t2i.eval.neighbours import read_latent_shard
from bld_t2i.eval.sheets import read_sheet


def test_quick_unconditional_demo_matches_the_data_bit_rates_and_inpaints(tmp_path, load_tool, capsys):
    """The samples' per-channel bit rates lie within the stated bounds of the training latents'
    (a denoiser that ignored the data, B(0.5) bits, is measured beside them and fails the
    bound), no more than one channel is dead or saturated beyond the data's, and inpainting
    keeps every known bit."""
    load_tool("demo_fmnist").main(["--task", "uncond", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "uncond" / "eval" / "metrics.json").read_text())
    (setting,) = report["settings"]
    latents = tmp_path / "latents"
    h, w, C = read_manifest(str(latents))["latent_shape"]
    counter = ChannelCounter((h, w, C))
    for shard in sorted(glob.glob(str(latents / "latents-*.tar"))):
        counter.add(read_latent_shard(shard, h * w * C // 8).packed)
    assert counter.latents == 2000  # the quick demo's four training shards
    ignores_data = bit_stats(np.full(C, 0.5), counter.rates)["bit_rate_diff_mean"]
    mean_bound, max_bound = 0.06, 0.2
    assert ignores_data > 1.5 * mean_bound  # the bound tells a model of the data from coin flips
    assert setting["bit_rate_diff_mean"] < mean_bound, setting
    assert setting["bit_rate_diff_max"] < max_bound, setting
    assert setting["dead_or_saturated"] <= setting["data_dead_or_saturated"] + 1 / C + 1e-9, setting
    assert report["inpainting"]["settings"][setting["setting"]]["known_bits_kept"] == 1.0
    out = capsys.readouterr().out
    assert f"bit rate |sample - data| mean {setting['bit_rate_diff_mean']:.4f}" in out
    assert "inpainting s16_w0_t1: known bits kept 1.0000" in out


def test_inpainting_inputs_come_from_the_first_image_of_a_real_shard(tmp_path, load_tool):
    load_tool("make_shards").main(["--source", "fashion-mnist", "--size", "32", "--limit", "4", "--shard-size", "4",
                                   "--out", str(tmp_path / "shards")])
    demo = load_tool("demo_fmnist")
    demo.write_inpainting_inputs(tmp_path / "shards" / "shard-000000.tar", tmp_path / "inpaint")
    image = np.asarray(Image.open(tmp_path / "inpaint" / "image.png"))
    mask = np.asarray(Image.open(tmp_path / "inpaint" / "mask.png"))
    assert image.shape == (32, 32, 3) and image.std() > 10  # a garment, not a blank
    assert mask.shape == (32, 32) and (mask[:, :16] == 0).all() and (mask[:, 16:] == 255).all()
    assert sorted(p.name for p in (tmp_path / "inpaint").iterdir()) == ["image.png", "mask.png"]  # no temp files


def test_sheets_and_recipes_fit_the_tasks(load_tool):
    demo = load_tool("demo_fmnist")
    classes = read_sheet(demo.ROOT / demo.SHEETS["class"])
    assert [int(r.prompt) for r in classes] == list(range(10))  # the label is the prompt, in the dataset's order
    assert [r.id for r in classes] == [n.lower().replace("/", "_").replace(" ", "_") for n in FASHION_MNIST_CLASSES]
    assert len(read_sheet(demo.ROOT / demo.SHEETS["uncond"])) >= 1
    for task, conditioning in (("class", "class"), ("uncond", "none")):
        cfg = load_config(demo.ROOT / f"recipes/fmnist_{task}.yaml")
        assert cfg.denoiser.conditioning == conditioning and cfg.run.out_dir == f"runs/fmnist/{task}/t2i"
        assert cfg.latents.shards == f"runs/fmnist/latents/latents-{{000000..{demo.TRAIN_SHARDS - 1:06d}}}.tar"
    assert load_config(demo.ROOT / "recipes/ae/fmnist32.yaml").autoencoder.resolution == 32


def test_summary_prints_accuracies_and_bit_statistics(load_tool):
    demo = load_tool("demo_fmnist")
    report = {"settings": [{"setting": "s16_w3_t1", "guidance": 3.0, "class_accuracy": 0.9, "bit_rate_diff_mean": 0.01,
                            "bit_rate_diff_max": 0.02, "dead_or_saturated": 0.0, "data_dead_or_saturated": 0.0}],
              "classifier": {"images": 5000, "accuracy": 0.91, "reconstructed_accuracy": 0.88},
              "inpainting": {"settings": {"s16_w0_t1": {"known_bits_kept": 1.0}}}}
    text = "\n".join(demo.summary(report))
    assert "class accuracy of the samples at w = 3: 0.900" in text
    assert "the classifier on 5000 real test images: 0.910" in text
    assert "on their autoencoder reconstructions: 0.880" in text
    assert "bit rate |sample - data| mean 0.0100" in text and "known bits kept 1.0000" in text
