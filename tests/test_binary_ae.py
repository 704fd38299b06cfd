"""The binary autoencoder: shapes of every preset, the straight-through gradient,
deterministic codes, export/reload, and the losses and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from bld_t2i.config import AELossConfig, AutoencoderConfig
from bld_t2i.models.ae_losses import (
    LPIPS,
    LPIPS_LIN_FILE,
    VGG16_FILE,
    PatchDiscriminator,
    adaptive_weight,
    bit_stats,
    generator_loss,
    hinge_d_loss,
    psnr,
    ssim,
)
from bld_t2i.models.binary_ae import AE_PRESETS, WEIGHTS_FILE, WEIGHTS_SHA_FILE, BinaryAutoencoder


def tiny(preset: str = "ae64-tiny", **kw) -> BinaryAutoencoder:
    torch.manual_seed(0)
    return BinaryAutoencoder.from_config(AutoencoderConfig(preset=preset, base_width=8, **kw))


def images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("preset", sorted(AE_PRESETS))
def test_every_preset_encodes_and_decodes_at_its_resolution(preset):
    model = tiny(preset)  # reduced width, the preset's levels and resolution
    arch = AE_PRESETS[preset]
    x = images(1, arch.resolution)
    bits = model.encode(x)
    h = arch.resolution // 2 ** (len(arch.mults) - 1)
    assert model.latent_shape == (h, h, arch.bits)
    assert bits.shape == (1, h, h, arch.bits) and bits.dtype == torch.bool
    assert model.decode(bits).shape == x.shape


def test_authors_and_1024_presets():
    assert {AE_PRESETS[f"bae256-c{c}"].bits for c in (32, 64, 128)} == {32, 64, 128}
    for c in (32, 64, 128):
        arch = AE_PRESETS[f"bae256-c{c}"]
        assert (arch.base_width, arch.mults, arch.grid) == (128, (1, 1, 2, 2, 4), 16)
    big = AE_PRESETS["bae1024-f32"]
    assert (big.downsample, big.grid) == (32, 32)


def test_unknown_preset_and_bad_images_are_clear_errors():
    with pytest.raises(ValueError, match="autoencoder.preset"):
        BinaryAutoencoder.from_config(AutoencoderConfig(preset="nope"))
    with pytest.raises(ValueError, match="divisible"):
        tiny().encode(torch.zeros(1, 3, 60, 60))


def test_straight_through_gradient_reaches_encoder_and_no_parameter_is_unused():
    model = tiny()
    out = model(images(2, 64), generator=torch.Generator().manual_seed(1))
    assert set(out.bits.detach().unique().tolist()) <= {0.0, 1.0}
    out.recon.abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_deterministic_encoding_is_the_threshold():
    model = tiny()
    x = images(3, 64)
    a, b = model.encode(x), model.encode(x)
    assert torch.equal(a, b)
    assert torch.equal(a, (model.bit_probs(x) > 0.5).permute(0, 2, 3, 1))
    # training samples: two draws differ somewhere
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(model(x, generator=g).bits, model(x, generator=g).bits)


def test_deterministic_training_pass_decodes_the_encoded_code_and_keeps_the_gradient():
    model = tiny()
    x = images(2, 64)
    out = model(x, deterministic=True)
    assert torch.equal(out.bits.detach().bool().permute(0, 2, 3, 1), model.encode(x))
    assert torch.allclose(out.recon, model.decode(model.encode(x)), atol=1e-5)
    out.recon.abs().mean().backward()  # straight-through: the encoder still learns
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_export_and_reload_give_identical_codes(tmp_path):
    model = tiny()
    x = images(4, 64)
    folder = tmp_path / "ae"
    fp = model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "fingerprint", "model.safetensors"]
    again = BinaryAutoencoder.from_pretrained(folder)
    assert again.fingerprint == fp == model.fingerprint
    assert again.latent_shape == model.latent_shape and again.resolution == 64
    assert torch.equal(again.encode(x), model.encode(x))
    assert torch.equal(again.decode(model.encode(x)), model.decode(model.encode(x)))
    # re-export over an existing folder replaces it; no temp folders are left behind
    with torch.no_grad():
        model.to_logits.weight.add_(1.0)
    assert model.save_pretrained(folder) != fp
    assert BinaryAutoencoder.from_pretrained(folder).fingerprint == model.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_the_fingerprint_covers_the_encoder_and_the_code_not_the_decoder():
    """What determines the latents: a decoder change keeps the fingerprint (its latent shards stay
    valid) but not the weights' sha256; an encoder or logit-head change changes both."""
    model = tiny()
    fp, sha = model.fingerprint, model.weights_sha256
    with torch.no_grad():
        model.bit_embed.weight.add_(1.0)
        model.decoder.conv_out.bias.add_(1.0)
    assert model.fingerprint == fp and model.weights_sha256 != sha
    for part in (model.encoder.conv_in.weight, model.to_logits.bias):
        before = model.fingerprint
        with torch.no_grad():
            part.add_(1e-3)
        assert model.fingerprint != before
    assert model.legacy_fingerprints[0] == model.weights_sha256


def test_truncated_or_foreign_weights_are_clear_errors(tmp_path):
    folder = tmp_path / "ae"
    tiny().save_pretrained(folder)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        BinaryAutoencoder.from_pretrained(folder)

    # weights of another architecture, with a fingerprint that matches them
    other = tmp_path / "other"
    tiny("ae64-tiny", bits=8).save_pretrained(other)
    (folder / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    (folder / WEIGHTS_SHA_FILE).write_text((other / WEIGHTS_SHA_FILE).read_text())
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the architecture"):
        BinaryAutoencoder.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="config.json"):
        BinaryAutoencoder.from_pretrained(folder)


# ----------------------------------------------------------------------------- losses


def test_lpips_loads_from_a_local_folder_only(tmp_path):
    import torchvision

    with pytest.raises(FileNotFoundError, match=VGG16_FILE):
        LPIPS.from_folder(tmp_path)
    # files under the upstream names and key layouts (random values: no download here)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / VGG16_FILE)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.CHANNELS)}
    torch.save(lin, tmp_path / LPIPS_LIN_FILE)
    lpips = LPIPS.from_folder(tmp_path)
    assert torch.equal(lpips.lin[2].weight, lin["lin2.model.1.weight"])
    x = images(2, 32)
    y = images(2, 32, seed=1).requires_grad_(True)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())

    lin.pop("lin4.model.1.weight")
    torch.save(lin, tmp_path / LPIPS_LIN_FILE)
    with pytest.raises(ValueError, match=LPIPS_LIN_FILE):
        LPIPS.from_folder(tmp_path)


def test_generator_loss_with_gan_and_adaptive_weight():
    model = tiny()
    disc = PatchDiscriminator(n_layers=2, width=8)
    x = images(2, 64)
    out = model(x)
    cfg = AELossConfig(bit_balance_weight=0.1, max_adaptive_weight=1.0)
    loss, stats = generator_loss(cfg, x, out, model.last_layer, disc, lpips=None)
    assert set(stats) == {"l1", "g_loss", "adaptive_weight", "bit_balance"}
    assert 0.0 <= stats["adaptive_weight"] <= 1.0
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    # before the GAN starts: reconstruction only
    _, stats = generator_loss(AELossConfig(), x, model(x), model.last_layer, None, None)
    assert set(stats) == {"l1"}


def test_adaptive_weight_is_the_clamped_gradient_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, gan = (3 * w).sum(), (w * 4).sum()  # gradients (3, 3) and (4, 4)
    assert adaptive_weight(rec, gan, w, max_weight=10.0).item() == pytest.approx(0.75, rel=1e-4)
    assert adaptive_weight((30 * w).sum(), gan, w, max_weight=1.0).item() == 1.0


def test_hinge_loss():
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 1.0


def test_metrics():
    x = images(2, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.95).all()
    # a uniform error of 0.2 on [-1, 1] is 0.1 on [0, 1]: 20 dB
    assert torch.allclose(psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.2)), torch.tensor([20.0]))
    bits = torch.zeros(4, 2, 2, 4, dtype=torch.bool)
    bits[:2, :, :, 0] = True  # channel 0 is half on: alive, entropy 1; channels 1..3 dead
    stats = bit_stats(bits)
    assert stats["dead_bits"] == 0.75
    assert stats["bit_entropy"] == pytest.approx(0.25, abs=1e-4)
