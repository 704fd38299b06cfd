"""adaLN-Zero time and condition modulation (denoiser.time_cond: adaln_zero, docs/math.md (D2))."""

import pytest
import torch
from test_denoiser import (
    NUM_CLASSES,
    SHAPE,
    TEXT_DIM,
    assert_checkpointing_changes_nothing,
    assert_flops_match_a_counter,
    inputs,
    make_cond,
)

from bld_t2i.config import DenoiserConfig
from bld_t2i.diffusion import diffusion_loss, keep_factors
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import CONDITIONING_MODES, Denoiser

MODES_AND_NULLS = [(m, n) for m in CONDITIONING_MODES for n in ("empty_caption", "learned")
                   if n == "empty_caption" or m in ("cross_attn", "pooled_token")]


def make_adaln(mode: str, null_cond: str = "empty_caption", **kw) -> Denoiser:
    torch.manual_seed(0)
    cfg = DenoiserConfig(preset="tiny", conditioning=mode, num_classes=NUM_CLASSES, null_cond=null_cond,
                         time_cond="adaln_zero", **kw)
    return Denoiser(cfg, SHAPE, text_dim=TEXT_DIM)


def modulation_layers(model: Denoiser) -> list[torch.nn.Linear]:
    return [b.modulation[1] for b in model.blocks] + [model.final_modulation[1]]


def perturb(model: Denoiser, seed: int = 9) -> Denoiser:
    """Non-zero modulation (as after some training): zero gates give some weights no gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modulation_layers(model):
            m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_output_shape_and_no_extra_tokens(mode):
    gen = torch.Generator().manual_seed(0)
    model = make_adaln(mode)
    z_t, t = inputs(3, gen)
    out = model(z_t, t, make_cond(mode, 3, gen=gen))
    assert out.shape == z_t.shape and out.dtype == torch.float32
    assert model.n_extra == 0
    assert model.final_modulation is not None and all(b.modulation is not None for b in model.blocks)
    assert not any(n.startswith(("norm.", "blocks.0.norm1.", "blocks.0.norm3.")) for n, _ in model.named_parameters())


@pytest.mark.parametrize("mode,null_cond", MODES_AND_NULLS)
def test_every_parameter_gets_a_gradient(mode, null_cond):
    gen = torch.Generator().manual_seed(1)
    model = perturb(make_adaln(mode, null_cond))
    B = 3
    z_t, t = inputs(B, gen)
    text = mode in ("cross_attn", "pooled_token")
    empty = {k: v[:1] for k, v in make_cond(mode, 1, N=2, gen=gen).items()} if text else None
    cond, _ = drop_condition(make_cond(mode, B, gen=gen), model.null_condition(B, "cpu", empty_caption=empty), p=0.0)
    model(z_t, t, cond).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and "null" not in n]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_blocks_are_the_identity_at_init(mode):
    """Zero-initialised modulation: every gate is 0, so the attention and MLP branches add
    nothing; the cross-attention branch is a plain residual and still adds its part."""
    gen = torch.Generator().manual_seed(2)
    model = make_adaln(mode)
    for m in modulation_layers(model):
        assert m.weight.abs().sum() == 0 and m.bias.abs().sum() == 0
    x, c = torch.randn(2, 16, model.width, generator=gen), torch.randn(2, model.width, generator=gen)
    prepared = model.prepare_condition(make_cond(mode, 2, gen=gen), 2)
    for i, block in enumerate(model.blocks):
        kv = prepared["kv"][i] if mode == "cross_attn" else None
        mask = prepared["mask"] if mode == "cross_attn" else None
        expected = x if block.cross is None else x + block.cross(block.norm2(x), kv, mask)
        torch.testing.assert_close(block(x, kv, mask, c), expected, rtol=0, atol=0)
    # and the final adaLN is plain LayerNorm: the head reads norm(x)
    shift, scale = model.final_modulation(c).chunk(2, dim=-1)
    assert shift.abs().sum() == 0 and scale.abs().sum() == 0


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_prepare_condition_then_denoise_equals_forward(mode):
    gen = torch.Generator().manual_seed(3)
    model = perturb(make_adaln(mode)).eval()
    z_t, t = inputs(4, gen)
    cond = make_cond(mode, 4, gen=gen)
    prepared = model.prepare_condition(cond, 4)
    assert prepared is None if mode == "none" else ("vec" in prepared) == (mode in ("class", "pooled_token"))
    torch.testing.assert_close(model.denoise(z_t, t, prepared), model(z_t, t, cond), rtol=0, atol=0)
    # a grid other than the training one, through the same two paths
    z_wide = torch.randint(0, 2, (4, 2 * 8, SHAPE[2]), generator=gen).float()
    torch.testing.assert_close(model.denoise(z_wide, t, prepared, grid=(2, 8)), model(z_wide, t, cond, grid=(2, 8)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["class", "pooled_token", "cross_attn"])
def test_time_and_condition_change_the_output(mode):
    gen = torch.Generator().manual_seed(4)
    model = perturb(make_adaln(mode)).eval()
    z_t, t = inputs(2, gen)
    cond = make_cond(mode, 2, gen=gen)
    out = model(z_t, t, cond)
    assert not torch.allclose(model(z_t, t * 0.5, cond), out)
    assert not torch.allclose(model(z_t, t, make_cond(mode, 2, gen=gen)), out)
    # samples stay independent of one another
    one = {k: v[:1] for k, v in cond.items()}
    torch.testing.assert_close(model(z_t[:1], t[:1], one), out[:1], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    assert_checkpointing_changes_nothing(perturb(make_adaln("cross_attn")),
                                         perturb(make_adaln("cross_attn", grad_checkpointing=True)))


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_flops_per_sample_matches_a_flop_counter(mode):
    model = make_adaln(mode)
    for grid in (None, (2, 8)):
        assert_flops_match_a_counter(model, mode, grid)


def test_bad_time_cond_names_the_field():
    with pytest.raises(ValueError, match="denoiser.time_cond"):
        Denoiser(DenoiserConfig(conditioning="none", time_cond="film"), SHAPE)


def test_toy_class_conditional_fit_lowers_the_loss():
    """100 AdamW steps on 4 class-conditional bit patterns: the loss falls well below the ln 2
    of an untrained model (measured: 0.685 over the first 10 steps, 0.31 over the last 10;
    the time-token model with its best rate of the two tried, 3e-3: 0.44)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only add synchronisation
    try:
        _class_fit()
    finally:
        torch.set_num_threads(threads)


def _class_fit():
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2, (4, SHAPE[0] * SHAPE[1], SHAPE[2]), generator=g).float()
    a = keep_factors(32, "linear").float()
    model = make_adaln("class")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        label = torch.randint(0, 4, (32,), generator=g)
        loss, _, _ = diffusion_loss(lambda z, t, c: model(z, t, c), patterns[label], {"label": label}, a, "balanced",
                                    generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.2, (first, last)
    assert max(m.weight.abs().max().item() for m in modulation_layers(model)) > 0  # the gates opened
