"""The denoising transformer: shapes, conditioning modes, no unused parameters, FLOPs, size."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bld_t2i.config import DenoiserConfig
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import CONDITIONING_MODES, DENOISER_PRESETS, Denoiser

SHAPE = (4, 4, 8)  # (h, w, C): L = 16 positions of 8 bits
TEXT_DIM = 24
NUM_CLASSES = 10


def make_cond(mode: str, B: int, N: int = 5, gen: torch.Generator | None = None) -> dict | None:
    if mode in ("cross_attn", "pooled_token"):
        lengths = torch.randint(1, N + 1, (B,), generator=gen)
        return {
            "tokens": torch.randn(B, N, TEXT_DIM, generator=gen),
            "mask": torch.arange(N)[None] < lengths[:, None],
            "pooled": torch.randn(B, TEXT_DIM, generator=gen),
        }
    if mode == "class":
        return {"label": torch.randint(0, NUM_CLASSES, (B,), generator=gen)}
    return None


def make_model(mode: str, null_cond: str = "empty_caption", **kw) -> Denoiser:
    torch.manual_seed(0)
    cfg = DenoiserConfig(preset="tiny", conditioning=mode, num_classes=NUM_CLASSES, null_cond=null_cond, **kw)
    return Denoiser(cfg, SHAPE, text_dim=TEXT_DIM)


def inputs(B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    z_t = torch.randint(0, 2, (B, SHAPE[0] * SHAPE[1], SHAPE[2]), generator=gen).float()
    return z_t, torch.rand(B, generator=gen)


MODES_AND_NULLS = [(m, n) for m in CONDITIONING_MODES for n in ("empty_caption", "learned")]


@pytest.mark.parametrize("mode,null_cond", MODES_AND_NULLS)
def test_every_parameter_gets_a_gradient(mode, null_cond):
    """No mode leaves a parameter out of the graph (ZeRO and DDP need this), even when caption
    dropout drops nothing, and with the null condition mixed in by drop_condition."""
    gen = torch.Generator().manual_seed(1)
    model = make_model(mode, null_cond)
    B = 3
    z_t, t = inputs(B, gen)
    cond = make_cond(mode, B, gen=gen)
    text = mode in ("cross_attn", "pooled_token")
    empty = {k: v[:1] for k, v in make_cond(mode, 1, N=2, gen=gen).items()} if text else None
    null = model.null_condition(B, "cpu", empty_caption=empty)
    cond, dropped = drop_condition(cond, null, p=0.0, generator=gen)  # nothing dropped
    out = model(z_t, t, cond)
    assert out.shape == z_t.shape and out.dtype == torch.float32
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and "null" not in n]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


@pytest.mark.parametrize("mode", ["cross_attn", "pooled_token"])
def test_learned_null_replaces_the_text_of_flagged_samples(mode):
    gen = torch.Generator().manual_seed(2)
    model = make_model(mode, "learned")
    B = 4
    z_t, t = inputs(B, gen)
    cond, _ = drop_condition(make_cond(mode, B, gen=gen), model.null_condition(B, "cpu"), p=1.0)
    other, _ = drop_condition(make_cond(mode, B, N=3, gen=gen), model.null_condition(B, "cpu"), p=1.0)
    a, b = model(z_t, t, cond), model(z_t, t, other)
    torch.testing.assert_close(a, b)  # the dropped captions' content no longer matters
    a.sum().backward()
    null_param = model.null_tokens if mode == "cross_attn" else model.null_pooled
    assert null_param.grad.abs().sum() > 0  # and the learned null is what the model sees


def test_class_null_and_unconditional():
    model = make_model("class")
    null = model.null_condition(3, "cpu")
    assert null["label"].tolist() == [NUM_CLASSES] * 3
    assert make_model("none").null_condition(3, "cpu") is None
    with pytest.raises(ValueError, match="conditioning 'none' got cond=a dict"):
        make_model("none")(torch.zeros(1, 16, 8), torch.rand(1), {"label": torch.zeros(1, dtype=torch.long)})


def test_empty_caption_null_condition_is_the_expanded_encoding():
    model = make_model("cross_attn")
    empty = make_cond("cross_attn", 1, N=3)
    null = model.null_condition(5, "cpu", empty_caption=empty)
    assert null["tokens"].shape == (5, 3, TEXT_DIM) and null["mask"].shape == (5, 3)
    assert torch.equal(null["tokens"][4], empty["tokens"][0])
    with pytest.raises(ValueError, match="empty_caption"):
        model.null_condition(5, "cpu")


def test_masked_padding_tokens_do_not_change_the_output():
    gen = torch.Generator().manual_seed(3)
    model = make_model("cross_attn")
    B, N = 3, 6
    z_t, t = inputs(B, gen)
    cond = make_cond("cross_attn", B, N=N, gen=gen)
    cond["mask"][:, 3:] = False
    noisy = {**cond, "tokens": torch.where(cond["mask"][..., None], cond["tokens"], 100 * torch.randn(B, N, TEXT_DIM))}
    short = {**cond, "tokens": cond["tokens"][:, :3], "mask": cond["mask"][:, :3]}
    out = model(z_t, t, cond)
    torch.testing.assert_close(model(z_t, t, noisy), out)
    torch.testing.assert_close(model(z_t, t, short), out, atol=1e-5, rtol=1e-5)


def test_time_is_an_input_and_samples_are_independent():
    gen = torch.Generator().manual_seed(4)
    model = make_model("class")
    z_t, t = inputs(2, gen)
    cond = make_cond("class", 2, gen=gen)
    out = model(z_t, t, cond)
    assert not torch.allclose(model(z_t, t * 0.5, cond), out)
    torch.testing.assert_close(model(z_t[:1], t[:1], {"label": cond["label"][:1]}), out[:1], atol=1e-5, rtol=1e-5)


def assert_checkpointing_changes_nothing(plain: Denoiser, ckpt: Denoiser) -> None:
    """Activation checkpointing recomputes the blocks in backward: same loss, same gradients."""
    gen = torch.Generator().manual_seed(5)
    z_t, t = inputs(2, gen)
    cond = make_cond("cross_attn", 2, gen=gen)
    for m in (plain, ckpt):
        m(z_t, t, cond).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def assert_flops_match_a_counter(model: Denoiser, mode: str, grid: tuple[int, int] | None = None) -> None:
    N = 5
    h, w = model.grid_of(grid)
    # The math backend spells attention out as matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, h * w, SHAPE[2]), torch.rand(1), make_cond(mode, 1, N=N), grid=grid)
    assert model.flops_per_sample(text_len=N, grid=grid) == counter.get_total_flops(), grid


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    assert_checkpointing_changes_nothing(make_model("cross_attn"), make_model("cross_attn", grad_checkpointing=True))


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_flops_per_sample_matches_a_flop_counter(mode):
    model = make_model(mode)
    assert_flops_match_a_counter(model, mode)
    if mode == "cross_attn":
        with pytest.raises(ValueError, match="text_len"):
            model.flops_per_sample()


GRIDS = [(p, (16, 16, 64)) for p in sorted(DENOISER_PRESETS)] + [(p, (32, 32, 32)) for p in ("authors", "xl")]


@pytest.mark.parametrize("preset,latent_shape", GRIDS)
def test_every_preset_builds_and_runs_on_both_grids(preset, latent_shape):
    """Meta tensors: the real shapes of every preset at no memory or compute cost."""
    h, w, C = latent_shape
    with torch.device("meta"):
        model = Denoiser(DenoiserConfig(preset=preset), latent_shape, text_dim=768)
        cond = {"tokens": torch.zeros(2, 7, 768), "mask": torch.ones(2, 7, dtype=torch.bool), "pooled": torch.zeros(2, 768)}
        out = model(torch.zeros(2, h * w, C), torch.zeros(2), cond)
    assert out.shape == (2, h * w, C)
    assert model.pos_embed.shape == (1, h * w, DENOISER_PRESETS[preset][1])


def test_depth_width_heads_override_the_preset():
    """denoiser.depth / width / heads replace the preset's row where non-zero (0 keeps it)."""
    model = make_model("cross_attn", depth=3, width=48, heads=3)
    assert (len(model.blocks), model.width, model.blocks[0].attn.heads) == (3, 48, 3)
    assert model.pos_embed.shape == (1, SHAPE[0] * SHAPE[1], 48)
    assert_flops_match_a_counter(model, "cross_attn")  # the FLOPs follow the overrides too
    plain, deeper = make_model("none"), make_model("none", depth=3)
    assert (len(plain.blocks), plain.width) == DENOISER_PRESETS["tiny"][:2]
    assert (len(deeper.blocks), deeper.width) == (3, plain.width)
    for bad, field in [({"width": 50}, "denoiser.width"), ({"width": 64, "heads": 3}, "denoiser.width"),
                       ({"depth": -1}, "denoiser.depth")]:
        with pytest.raises(ValueError, match=field):
            make_model("none", **bad)


def test_authors_preset_has_172m_parameters():
    """24 layers, width 768, 12 heads, one pooled CLIP ViT-L/14 token, 16x16x64 latent."""
    with torch.device("meta"):
        model = Denoiser(DenoiserConfig(preset="authors", conditioning="pooled_token"), (16, 16, 64), text_dim=768)
    n = sum(p.numel() for p in model.parameters())
    assert n == 172_177_216, n  # ~172M, docs/math.md (D)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="denoiser.preset"):
        Denoiser(DenoiserConfig(preset="huge"), SHAPE)
    with pytest.raises(ValueError, match="denoiser.conditioning"):
        Denoiser(DenoiserConfig(conditioning="concat"), SHAPE, text_dim=8)
    with pytest.raises(ValueError, match="text_dim"):
        Denoiser(DenoiserConfig(conditioning="cross_attn"), SHAPE)
    with pytest.raises(ValueError, match="denoiser.num_classes"):
        Denoiser(DenoiserConfig(conditioning="class"), SHAPE)
    with pytest.raises(ValueError, match="denoiser.null_cond"):
        Denoiser(DenoiserConfig(null_cond="zeros"), SHAPE, text_dim=8)
    with pytest.raises(ValueError, match="latent shape"):
        make_model("none")(torch.zeros(1, 9, 8), torch.zeros(1), None)


@pytest.mark.parametrize("mode", CONDITIONING_MODES)
def test_any_grid_runs_and_the_training_grid_is_unchanged(mode):
    """Aspect-ratio buckets: any (h, w) grid of the C bits; the training grid's path is the
    one without `grid` (bit for bit), and every parameter still takes part on another grid."""
    gen = torch.Generator().manual_seed(7)
    model = make_model(mode)
    z_t, t = inputs(2, gen)
    cond = make_cond(mode, 2, gen=gen)
    assert torch.equal(model(z_t, t, cond, grid=SHAPE[:2]), model(z_t, t, cond))
    assert model.position_embedding() is model.pos_embed
    for grid in [(2, 8), (8, 2), (3, 5), (1, 1)]:
        z = torch.randint(0, 2, (2, grid[0] * grid[1], SHAPE[2]), generator=gen).float()
        model.zero_grad(set_to_none=True)
        out = model(z, t, cond, grid=grid)
        assert out.shape == z.shape
        torch.testing.assert_close(model.denoise(z, t, model.prepare_condition(cond, 2), grid), out, rtol=0, atol=0)
        out.square().mean().backward()
        assert not [n for n, p in model.named_parameters() if p.grad is None], grid
    with pytest.raises(ValueError, match=r"grid \(3, 5\)"):
        model(torch.zeros(1, 16, SHAPE[2]), torch.zeros(1), make_cond(mode, 1), grid=(3, 5))


def test_position_embedding_of_another_grid_is_the_table_resized_bicubically():
    model = make_model("none")
    h0, w0, _ = SHAPE
    D = model.width
    table = model.pos_embed.detach().reshape(1, h0, w0, D).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(table, size=(3, 6), mode="bicubic", align_corners=False, antialias=True)
    got = model.position_embedding((3, 6)).detach()
    assert got.shape == (1, 18, D)
    torch.testing.assert_close(got, expected.permute(0, 2, 3, 1).reshape(1, 18, D))
    # the table is the sin-cos of the training grid at init, and a wide grid keeps the row
    # structure: positions in one row share their row half of the channels
    wide = model.position_embedding((2, 8))[0].reshape(2, 8, D)
    assert torch.allclose(wide[:, :1, : D // 2], wide[:, :, : D // 2], atol=1e-5)
