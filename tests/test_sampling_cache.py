"""Cached condition attention: keys and values of the condition computed once per sampling
call equal the uncached model's; the pipeline really computes them once per batch; the bf16
and compiled paths (torch.compile on the CPU here; with CUDA graphs where a GPU is at hand)."""

from __future__ import annotations

import pytest
import torch
from test_denoiser import MODES_AND_NULLS, inputs, make_cond, make_model
from test_pipeline import build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse fixture)

from bld_t2i.diffusion import keep_factors, sample
from bld_t2i.pipeline import BLDPipeline


@pytest.mark.parametrize("mode,null_cond", MODES_AND_NULLS)
def test_cached_condition_equals_uncached(mode, null_cond):
    gen = torch.Generator().manual_seed(7)
    model = make_model(mode, null_cond).eval()
    B = 4
    cond = make_cond(mode, B, gen=gen)
    if null_cond == "learned" and mode in ("cross_attn", "pooled_token"):
        cond["null"] = torch.tensor([False, True, False, True])  # two rows take the learned null
    with torch.no_grad():
        prepared = model.prepare_condition(cond, B)  # once, reused at every t below
        for t in (1.0, 0.5, 1 / 64):
            z_t, _ = inputs(B, gen)
            t_in = torch.full((B,), t)
            torch.testing.assert_close(model.denoise(z_t, t_in, prepared), model(z_t, t_in, cond), atol=1e-5, rtol=0)


def test_cached_sampler_equals_uncached_sampler_logits():
    """Through the sampler with guidance: every step's logits, cached against uncached."""
    model = make_model("cross_attn").eval()
    gen = torch.Generator().manual_seed(8)
    B = 3
    cond = make_cond("cross_attn", B, gen=gen)
    null = model.null_condition(B, "cpu", {k: v[:1] for k, v in make_cond("cross_attn", 1, gen=gen).items()})
    seen = {"cached": [], "uncached": []}

    def logged(kind, fn):
        def model_fn(z, t, c):
            out = fn(z, t, c)
            seen[kind].append((z.clone(), t.clone(), c, out))
            return out
        return model_fn

    a = keep_factors(16).float()
    with torch.no_grad():
        sample(logged("cached", model.denoise), (B, 16, 8), a, 6, model.prepare_condition(cond, B),
               model.prepare_condition(null, B), guidance=2.0, generator=torch.Generator().manual_seed(1))
        # uncached: the same inputs through the full forward, which projects the text every call
        raw = {k: torch.cat([cond[k], null[k]]) for k in cond}
        for z, t, _, out in seen["cached"]:
            torch.testing.assert_close(model(z, t, raw), out, atol=1e-5, rtol=0)
    assert len(seen["cached"]) == 6


def test_pipeline_projects_the_text_once_per_batch(tmp_path_factory):
    pipe = BLDPipeline.from_pretrained(build_tiny_model(shared_root(tmp_path_factory)), device="cpu")
    calls = []
    hooks = [b.cross.kv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for b in pipe.denoiser.blocks]
    try:
        pipe.sample_latents(["red apple"] * 3, steps=8, guidance=2.5, seed=0, batch_size=2)  # batches 2 and 1
    finally:
        for h in hooks:
            h.remove()
    depth = len(pipe.denoiser.blocks)
    # per batch: the condition and the null, each once per block, none at the 8 steps
    assert calls == [2] * depth + [2] * depth + [1] * depth + [1] * depth


def test_bf16_autocast_pipeline_is_close_to_fp32(tmp_path_factory):
    folder = build_tiny_model(shared_root(tmp_path_factory))
    fp32 = BLDPipeline.from_pretrained(folder, device="cpu")
    bf16 = BLDPipeline.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    z = torch.randint(0, 2, (2, 16, 16)).float()
    t = torch.full((2,), 0.5)
    cond, _ = fp32._conditions(["red apple", "blue square"], None)
    with torch.no_grad():
        exact = fp32._model_fn(z, t, fp32.denoiser.prepare_condition(cond, 2))
        with bf16._precision():
            low = bf16._model_fn(z, t, bf16.denoiser.prepare_condition(cond, 2))
    assert low.dtype == torch.float32 and bf16.denoiser.head.weight.dtype == torch.bfloat16
    assert (low - exact).abs().max() < 0.1 * exact.abs().max()  # bf16: ~3 significant digits
    images = bf16.decode(fp32.sample_latents(["red apple"], steps=4, seed=0))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="dtype must be"):
        BLDPipeline.from_pretrained(folder, device="cpu", dtype=torch.float16)


def test_compiled_pipeline_matches_eager(tmp_path_factory):
    """torch.compile on the CPU (inductor, ~10 s here); on a GPU with CUDA graphs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = build_tiny_model(shared_root(tmp_path_factory))
    eager = BLDPipeline.from_pretrained(folder, device=device)
    compiled = BLDPipeline.from_pretrained(folder, device=device, compile=True)
    prompts = ["red apple", "grinning face", "blue square", "green tree"]
    cond, _ = eager._conditions(prompts, None)
    z = torch.randint(0, 2, (4, 16, 16), device=device).float()
    with torch.no_grad():
        prepared = eager.denoiser.prepare_condition(cond, 4)
        for t in (1.0, 0.25):  # the same graph replayed with new inputs
            t_in = torch.full((4,), t, device=device)
            torch.testing.assert_close(compiled._model_fn(z, t_in, prepared), eager._model_fn(z, t_in, prepared),
                                       atol=1e-4, rtol=1e-4)
    b = compiled.sample_latents(prompts, steps=8, guidance=2.5, seed=0)
    assert torch.equal(b, compiled.sample_latents(prompts, steps=8, guidance=2.5, seed=0))
