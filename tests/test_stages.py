"""Models made in stages: `init.from` another run's weights, validation on held-out data while
training, and decoder-only autoencoder fine-tuning whose latents stay valid.

The trainer runs are real (torchrun, DeepSpeed ZeRO 0/2/3 on CPU processes) on the tiny
Fashion-MNIST latents of t2i_fixtures.py; the matching and validation functions are also
tested on their own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bld_t2i.checkpoint import read_latest
from bld_t2i.config import Config, DenoiserConfig, LatentsConfig, load_config
from bld_t2i.data.latents import check_manifests, latent_loader, read_manifest, unpack_bits_tensor
from bld_t2i.diffusion import diffusion_loss, keep_factors
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.models.denoiser_blocks import resize_pos_embed
from bld_t2i.pretrained import load_pretrained
from bld_t2i.training.init_from import check_match, match_state, read_source
from bld_t2i.training.schedule import step_generator
from bld_t2i.training.validation import Share, denoiser_val_loss, keyed_z_t, validation_times

from t2i_fixtures import ROOT, run, train_command, train_env

CLASS = ("denoiser.conditioning=class", "denoiser.num_classes=10", "text_encoder.kind=none")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def _train(nproc: int, out: Path, latents: str, ae: Path, *overrides: str) -> str:
    proc = subprocess.run(train_command(nproc, out, latents, ae, *overrides), env=train_env(), capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"training failed:\n{log[-6000:]}")
    return log


# ----------------------------------------------------------------------------- matching, no trainer


def test_match_is_strict_by_default_and_names_the_keys():
    pooled = Denoiser(DenoiserConfig(preset="tiny", conditioning="pooled_token", time_cond="adaln_zero"), (8, 8, 8), 16)
    cross = Denoiser(DenoiserConfig(preset="tiny", conditioning="cross_attn", time_cond="adaln_zero"), (8, 8, 8), 16)
    match = match_state(cross, pooled.state_dict(), (8, 8), (8, 8))
    assert match.missing and match.unexpected
    with pytest.raises(ValueError, match=r"missing from the source: .*cross.*set init\.allow_missing=true / "
                                         r"init\.allow_unexpected=true") as e:
        check_match(match, load_config(None).init, "SRC")
    assert match.unexpected[0] in str(e.value) and "init.from SRC" in str(e.value)
    allowed = load_config(None, ["init.allow_missing=true", "init.allow_unexpected=true"]).init
    check_match(match, allowed, "SRC")  # a partial load that the config allows
    cross.load_state_dict(match.state, strict=False)
    for name in match.loaded:
        assert torch.equal(cross.state_dict()[name], pooled.state_dict()[name])
    # a class table of another size is "of another shape", left at its init under allow_missing
    ten = Denoiser(DenoiserConfig(preset="tiny", conditioning="class", num_classes=10), (8, 8, 8))
    twelve = Denoiser(DenoiserConfig(preset="tiny", conditioning="class", num_classes=12), (8, 8, 8))
    match = match_state(twelve, ten.state_dict(), (8, 8), (8, 8))
    assert [m.split(":")[0] for m in match.mismatched] == ["class_embed.weight"] and not match.missing
    with pytest.raises(ValueError, match=r"class_embed\.weight: \(11, 64\) vs \(13, 64\)"):
        check_match(match, load_config(None).init, "SRC")


def test_the_position_table_is_resized_to_the_new_grid():
    small = Denoiser(DenoiserConfig(preset="tiny", conditioning="none"), (8, 8, 8))
    big = Denoiser(DenoiserConfig(preset="tiny", conditioning="none"), (16, 16, 8))
    match = match_state(big, small.state_dict(), (8, 8), (16, 16))
    assert match.resized == ["pos_embed (8x8 -> 16x16)"] and not (match.missing or match.mismatched or match.unexpected)
    assert torch.equal(match.state["pos_embed"], resize_pos_embed(small.pos_embed.detach(), (8, 8), (16, 16)))
    # without the grids it is a shape mismatch like any other
    assert [m.split(":")[0] for m in match_state(big, small.state_dict()).mismatched] == ["pos_embed"]


# ----------------------------------------------------------------------------- validation, no trainer


def test_validation_times_and_keyed_noise_do_not_depend_on_the_batch():
    assert validation_times(64, 4) == [8, 24, 40, 56] and validation_times(16, 1) == [8]
    with pytest.raises(ValueError, match="val.t_values"):
        validation_times(4, 5)
    z_0 = (torch.rand(5, 12, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    keys = [f"k{i}" for i in range(5)]
    whole = keyed_z_t(z_0, 0.5, keys, seed=0, t=3)
    parts = torch.cat([keyed_z_t(z_0[:2], 0.5, keys[:2], 0, 3), keyed_z_t(z_0[2:], 0.5, keys[2:], 0, 3)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, keyed_z_t(z_0, 0.5, keys, seed=0, t=4))  # another t, other noise
    flipped = (whole != z_0).float().mean()
    assert 0.15 < flipped < 0.35  # a = 0.5 flips a quarter of the bits


def test_validation_loss_is_the_same_for_any_batch_size_and_falls_with_a_better_model():
    cfg = load_config(None, ["diffusion.T=16", "val.t_values=4", "denoiser.conditioning=none", "denoiser.preset=tiny"])
    torch.manual_seed(0)
    model = Denoiser(cfg.denoiser, (4, 4, 8))
    g = torch.Generator().manual_seed(1)
    bits = [(torch.rand(16, 8, generator=g) > 0.8).to(torch.uint8) for _ in range(11)]
    samples = [{"packed": torch.from_numpy(np.packbits(b.numpy().reshape(-1))), "grid": (4, 4), "key": f"s{i:02d}",
                "caption": "", "label": torch.tensor(-1)} for i, b in enumerate(bits)]  # as the latent loader gives them
    share, a = Share(samples, 11), keep_factors(16).float()
    values = []
    for batch in (1, 4, 11):
        c = dataclasses.replace(cfg, latents=dataclasses.replace(cfg.latents, batch_size=batch))
        values.append(denoiser_val_loss(model, share, lambda b: None, c, a, torch.device("cpu")))
    assert values[0].keys() == {"val/loss", "val/loss_t2", "val/loss_t6", "val/loss_t10", "val/loss_t14", "val/samples"}
    for v in values[1:]:
        for k in v:
            assert abs(v[k] - values[0][k]) <= 1e-6, (k, v[k], values[0][k])
    # a model trained a few steps on these samples (mostly zeros) scores lower than the random one
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    z_0 = torch.stack(bits).float()
    for step in range(30):
        g = torch.Generator().manual_seed(step)
        loss, _, _ = diffusion_loss(lambda z, t, c: model(z, t, c), z_0, None, a, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = denoiser_val_loss(model, share, lambda b: None, cfg, a, torch.device("cpu"))
    assert trained["val/loss"] < values[0]["val/loss"] - 0.05, (trained, values[0])


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_latents, tiny_ae) -> Path:
    """A class-conditional source model: 2 ranks, ZeRO-2, validated on a held-out shard."""
    out = tmp_path_factory.mktemp("stages") / "source"
    train_shards, val_shard = tiny_latents.replace("000003}", "000002}"), tiny_latents.split("{")[0] + "000003.tar"
    _train(2, out, train_shards, tiny_ae, *CLASS, "train.total_samples=128", "train.log_every_samples=16",
           f"val.shards={val_shard}", "val.every_samples=32", "val.max_samples=24", "optim.lr=3e-3")
    return out


def _val_shard(latents: str) -> str:
    return latents.split("{")[0] + "000003.tar"


def test_validation_records_at_the_cadence_and_a_trained_model_scores_lower(source_run):
    val = [r for r in _records(source_run) if "val/loss" in r]
    assert [r["samples"] for r in val] == [0, 32, 64, 96, 128]
    assert all(r["val/samples"] == 24 and {"val/loss_t2", "val/loss_t14"} <= r.keys() for r in val)
    assert val[-1]["val/loss"] < val[0]["val/loss"] - 0.02, val


def test_init_from_an_export_arrives_and_validates_alike_on_1_and_2_ranks(tmp_path, source_run, tiny_latents, tiny_ae):
    """A new run from the source's pipeline export (1 rank, ZeRO-0, batch 4) and from its
    checkpoint folder (2 ranks, ZeRO-3, batch 8), at lr 0 so the weights stay the source's: the
    first loss is the source model's loss on the same batch, and the validation loss is the same
    on both runs, at the start and the end."""
    export = source_run / "export"
    common = (*CLASS, "optim.lr=0", f"val.shards={_val_shard(tiny_latents)}", "val.max_samples=24",
              "train.log_every_samples=4")
    one = tmp_path / "one"
    log = _train(1, one, tiny_latents, tiny_ae, *common, f"init.from={export}", "train.zero_stage=0",
                 "latents.batch_size=4", "train.total_samples=8", "log.sample_keys=true")
    assert f"[init] weights from {export} (pipeline export): loaded" in log, log[-3000:]

    # the source model's loss on the run's first batch, with the step's own random draws
    cfg = load_config(str(ROOT / "recipes/test/t2i_tiny.yaml"),
                      [*CLASS, "latents.batch_size=4", f"latents.shards={tiny_latents}"])
    parts = load_pretrained(export, torch.device("cpu"))
    model = parts.denoiser.eval()
    loader = latent_loader(cfg.latents, cfg.run.seed, parts.autoencoder.fingerprint, parts.autoencoder.latent_shape,
                           rank=0, world_size=1)
    batch = next(iter(loader))
    first_keys = (one / "sample_keys" / "rank0.txt").read_text().splitlines()[0].split()[1:]
    assert batch["key"] == first_keys
    g = step_generator(cfg.run.seed, 0, 0, "cpu")
    cond, _ = drop_condition({"label": batch["label"]}, model.null_condition(4, "cpu"), cfg.denoiser.cond_drop_prob, g)
    with torch.no_grad():
        z_0 = unpack_bits_tensor(batch["packed"], parts.autoencoder.latent_shape).float()
        expected, _, _ = diffusion_loss(lambda z, t, c: model(z, t, c).float(), z_0, cond,
                                        keep_factors(cfg.diffusion.T, cfg.diffusion.schedule).float(),
                                        cfg.diffusion.loss, cfg.diffusion.aux_weight, g, cfg.diffusion.t_power)
    first = next(r for r in _records(one) if "loss" in r)
    assert first["step"] == 1 and abs(first["loss"] - expected.item()) <= 1e-6, (first["loss"], expected.item())

    # 2 ranks, ZeRO-3, from the source's checkpoint folder; stopped after a step, then rerun:
    # the rerun resumes its own checkpoint, not the init weights
    ckpt = source_run / "checkpoints" / (source_run / "checkpoints" / "latest").read_text()
    two = tmp_path / "two"
    first_log = _train(2, two, tiny_latents, tiny_ae, *common, f"init.from={ckpt}", "train.zero_stage=3",
                       "train.total_samples=32", "train.max_steps=1")
    assert f"[init] weights from {ckpt} (EMA weights of the checkpoint)" in first_log
    rerun = _train(2, two, tiny_latents, tiny_ae, *common, f"init.from={ckpt}", "train.zero_stage=3",
                   "train.total_samples=32")
    assert "resumed from step 1" in rerun and "[init]" not in rerun, rerun[-3000:]
    v1 = [r for r in _records(one) if "val/loss" in r]
    v2 = [r for r in _records(two) if "val/loss" in r]
    # the first launch ended at its max_steps (16 samples): a run validates at its end
    assert [r["samples"] for r in v1] == [0, 8] and [r["samples"] for r in v2] == [0, 16, 32]
    for a in (*v1, *v2):
        for k in ("val/loss", "val/loss_t2", "val/loss_t14"):
            assert abs(a[k] - v1[0][k]) <= 1e-6, (k, a[k], v1[0][k])

    # the raw training weights of both checkpoints (ZeRO-0 and the merged ZeRO-3 partitions) are
    # the source's EMA weights, untouched at lr 0
    source = load_file(str(export / "denoiser" / "model.safetensors"))
    for out in (one, two):
        raw = read_source(str(out), "denoiser", use_ema=False)
        assert raw.state.keys() == source.keys()
        assert all(torch.equal(raw.state[k].float(), source[k]) for k in source), out


def test_a_grid_change_and_a_partial_load_train(tmp_path, source_run, tiny_image_shards, tiny_ae):
    """The 8x8-grid source starts a 16x16 run (its autoencoder at 128 px); a strict mismatch is
    an error naming the keys; the same load allowed partial trains."""
    ae = BinaryAutoencoder.from_pretrained(tiny_ae)
    ae128 = BinaryAutoencoder(dataclasses.replace(ae.arch, resolution=128))
    ae128.load_state_dict(ae.state_dict())
    ae128.save_pretrained(tmp_path / "ae128")
    assert ae128.fingerprint == ae.fingerprint  # the same encoder: the resolution is not in it
    latents = tmp_path / "lat128"
    run([sys.executable, "data_tools/encode_latents.py", "--shards", tiny_image_shards, "--autoencoder",
         str(tmp_path / "ae128"), "--out", str(latents), "--batch-size", "64"])
    spec = f"{latents}/latents-{{000000..000003}}.tar"
    out = tmp_path / "grid16"
    log = _train(1, out, spec, tmp_path / "ae128", *CLASS, f"init.from={source_run / 'export'}",
                 "train.total_samples=32", "latents.batch_size=8", "train.log_every_samples=8")
    assert "resized: pos_embed (8x8 -> 16x16)" in log, log[-3000:]
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 4 and all(0 < v < 2 for v in losses)
    assert load_file(str(out / "export" / "denoiser" / "model.safetensors"))["pos_embed"].shape == (1, 256, 64)

    # a text model from the class model: strict refuses naming the keys, allowed it trains
    text = ("denoiser.conditioning=pooled_token", "text_encoder.kind=hf", "text_encoder.name=bert",
            "text_encoder.random_init=true", f"init.from={source_run / 'export'}", "train.total_samples=16")
    proc = subprocess.run(train_command(1, tmp_path / "strict", spec, tmp_path / "ae128", *text), env=train_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "source tensor(s) the new model lacks: class_embed.weight" in proc.stdout + proc.stderr
    log = _train(1, tmp_path / "partial", spec, tmp_path / "ae128", *text, "init.allow_missing=true",
                 "init.allow_unexpected=true")
    assert "unexpected, ignored: class_embed.weight" in log and "missing, left at their initialisation" in log
    assert (tmp_path / "partial" / "export" / "model_index.json").is_file()


# ----------------------------------------------------------------------------- the autoencoder


def test_decoder_only_fine_tuning_keeps_the_encoder_and_its_latents(tmp_path, tiny_ae, tiny_latents, tiny_image_shards):
    from bld_t2i.cli.train_ae import main as train_ae_main

    out = tmp_path / "ft"
    held_out = tiny_image_shards.split("{")[0] + "000003.tar"
    argv = ["--recipe", str(ROOT / "recipes/ae/test_tiny.yaml"), f"run.out_dir={out}",
            f"data.shards={tiny_image_shards.replace('000003}', '000002}')}", "data.image_size=64",
            f"init.from={tiny_ae}", "autoencoder.train_parts=decoder", "ae_loss.disc_weight=0",
            "ae_loss.deterministic_start_samples=1", "optim.lr=3e-3", "train.total_samples=96",
            f"val.shards={held_out}", "val.every_samples=48", "val.max_samples=32", "train.ema_decay=0.5"]
    train_ae_main([*argv, "train.max_steps=6"])  # stopped at 24 samples, then resumed to the end
    train_ae_main(argv)
    assert json.loads((read_latest(out / "checkpoints") / "trainer.json").read_text())["samples"] == 96
    before, after = BinaryAutoencoder.from_pretrained(tiny_ae), BinaryAutoencoder.from_pretrained(out / "export")
    b, a = before.state_dict(), after.state_dict()
    encoder = [k for k in b if k.startswith(("encoder.", "to_logits."))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert any(not torch.equal(a[k], b[k]) for k in b if k.startswith(("decoder.", "bit_embed.")))
    assert after.fingerprint == before.fingerprint and after.encoder_of == before.legacy_fingerprints
    # the latent shards encoded with the source load with the fine-tuned autoencoder
    cfg = LatentsConfig(shards=tiny_latents, num_workers=0, batch_size=64)
    assert sum(len(x["key"]) for x in latent_loader(cfg, 0, after.fingerprint, after.latent_shape, finite=True,
                                                    legacy_fingerprints=after.legacy_fingerprints)) == 256
    # and so does a manifest written before format 3, which names the source's weights' sha256
    folder = tiny_latents.split("/latents-")[0]
    old = tmp_path / "v2"
    old.mkdir()
    manifest = {**read_manifest(folder), "version": 2, "autoencoder_fingerprint": before.weights_sha256}
    (old / "manifest.json").write_text(json.dumps(manifest))
    check_manifests(str(old / "latents-000000.tar"), after.fingerprint, after.latent_shape, after.legacy_fingerprints)
    with pytest.raises(ValueError, match="manifest version 2"):
        check_manifests(str(old / "latents-000000.tar"), after.fingerprint, after.latent_shape, ())
    # validation: L1/PSNR and bit usage logged, and the held-out PSNR rises
    val = [r for r in _records(out) if "val/psnr" in r]
    assert [r["samples"] for r in val] == [0, 24, 48, 96]  # the first launch validated at its end too
    assert {"val/l1", "val/bit_entropy", "val/dead_channels", "val/saturated_channels", "val/bit_rate_min",
            "val/colour_error", "val/colour_shift_g"} <= val[0].keys()
    assert val[-1]["val/psnr"] > val[0]["val/psnr"] + 0.5, val
    assert len(json.loads((out / "eval.json").read_text())["val/bit_rates"]) == 8


def test_decoder_only_needs_init_from():
    from bld_t2i.training.autoencoder import AutoencoderTask

    cfg = load_config(str(ROOT / "recipes/ae/test_tiny.yaml"), ["autoencoder.train_parts=decoder"])
    with pytest.raises(ValueError, match="autoencoder.train_parts=decoder .* init.from"):
        AutoencoderTask().build(cfg, torch.device("cpu"), 1, None)


def test_init_from_is_the_from_key_everywhere():
    cfg = load_config(None, ["init.from=/some/run"])
    assert cfg.init.from_ == "/some/run"
    from bld_t2i.config import to_dict

    assert to_dict(cfg)["init"]["from"] == "/some/run" and "from_" not in to_dict(cfg)["init"]
    assert isinstance(Config().init.from_, str)


def test_the_colour_error_measures_a_hue_shift_and_bit_usage_counts_dead_channels():
    """An autoencoder stand-in that turns every image 10 levels greener, with a code whose
    channel 0 is always 0 and channel 1 always 1: the metrics say exactly that."""
    from bld_t2i.training.validation import autoencoder_val_metrics

    class Greener:
        def eval(self):
            return self

        def encode(self, x):
            self.x = x
            bits = torch.rand(len(x), 2, 2, 4, generator=torch.Generator().manual_seed(0)) > 0.5
            bits[..., 0], bits[..., 1] = False, True
            return bits

        def decode(self, bits):
            return self.x + torch.tensor([0.0, 10 / 127.5, 0.0]).view(1, 3, 1, 1)

    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(3, 16, 16, generator=g) * 1.6 - 0.8, "key": f"k{i}"} for i in range(6)]
    metrics, shown = autoencoder_val_metrics(Greener(), Share(samples, 6), (2, 2, 4), 4, torch.device("cpu"), shown=2)
    assert metrics["val/colour_shift_g"] == pytest.approx(10.0) and metrics["val/colour_shift_r"] == pytest.approx(0)
    assert metrics["val/colour_error"] == pytest.approx(10 / 3)
    assert metrics["val/dead_channels"] == 1 and metrics["val/saturated_channels"] == 1
    assert metrics["val/dead_bits"] == 0.5 and metrics["val/images"] == 6 and shown[0].shape == (2, 3, 16, 16)
    assert metrics["val/bit_rates"][:2] == [0.0, 1.0]
