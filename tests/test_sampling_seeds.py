"""Batched sampling with per-image seeds: a batch of B seeds gives, bit for bit, the images each
seed gives alone (the old one-image-per-call path), in the sampler and through the pipeline,
for text, class and unconditional models and for inpainting; the guidance interval, in the
sampler and in the evaluation's sweep."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from test_pipeline import RES, _drawing, build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse)

from bld_t2i.cli.evaluate import main as evaluate_main
from bld_t2i.config import ConfigError, DenoiserConfig, from_dict
from bld_t2i.data.latents import pack_bits
from bld_t2i.diffusion import keep_factors, p_step_prob, posterior_table, sample, step_prob
from bld_t2i.eval.sheets import derive_seed, read_sheet
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.pipeline import BLDPipeline

LATENT = (4, 4, 8)  # (h, w, C) of the sampler-level tests
SEEDS = [11, 12, 13, 14, 15]


def _class_model() -> Denoiser:
    """A random class-conditional denoiser whose condition matters: its class embedding and
    head are scaled up from the small init, so guidance visibly changes the draws."""
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(preset="tiny", conditioning="class", num_classes=3), LATENT).eval()
    with torch.no_grad():
        model.class_embed.weight.mul_(50)
        model.head.weight.mul_(50)
    return model


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_step_prob_is_p_step_prob_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    z_t = (torch.rand(6, 16, 8, generator=g) < 0.5).float()
    logits = torch.randn(6, 16, 8, generator=g) * 3
    a = keep_factors(64, "cosine").float()
    pairs = [(0, 1), (10, 30), (63, 64)]
    one, zero = posterior_table(a[[s for s, _ in pairs]][:, None], a[[t for _, t in pairs]][:, None])  # all at once
    for i, (s, t) in enumerate(pairs):
        assert torch.equal(step_prob(z_t, logits, one[i], zero[i]), p_step_prob(z_t, logits, a[s], a[t]))


@pytest.mark.parametrize("inpaint", [None, "clamp", "renoise"])
def test_per_row_generators_give_each_row_its_image_alone(inpaint):
    model, a = _class_model(), keep_factors(16).float()
    B, (h, w, C) = len(SEEDS), LATENT
    labels = torch.tensor([0, 1, 2, 0, 1])
    null = model.null_condition(B, "cpu")
    g = torch.Generator().manual_seed(99)
    known = (torch.rand(B, h * w, C, generator=g) < 0.5).float()
    mask = (torch.arange(h * w) < 6).float()[:, None]  # the first 6 cells kept
    inp = {} if inpaint is None else {"mask": mask, "inpaint": inpaint}
    batch = sample(model, (B, h * w, C), a, 8, {"label": labels}, null, guidance=2.0, generator=_gens(SEEDS),
                   known=None if inpaint is None else known, **inp)
    for i, seed in enumerate(SEEDS):
        # the old path: one image per call under one generator of its seed
        alone = sample(model, (1, h * w, C), a, 8, {"label": labels[i : i + 1]}, {"label": null["label"][:1]},
                       guidance=2.0, generator=torch.Generator().manual_seed(seed),
                       known=None if inpaint is None else known[i : i + 1], **inp)
        assert torch.equal(batch[i : i + 1], alone), f"row {i} differs from seed {seed} alone"
    assert not torch.equal(batch[0], batch[3])  # same label, other seed: another image
    with pytest.raises(ValueError, match="3 generators for a batch of 5"):
        sample(model, (B, h * w, C), a, 4, {"label": labels}, generator=_gens(SEEDS[:3]))


def test_guidance_interval_full_is_full_guidance_and_empty_is_unguided():
    model, a = _class_model(), keep_factors(16).float()
    B, (h, w, C) = 3, LATENT
    cond, null = {"label": torch.tensor([0, 1, 2])}, model.null_condition(B, "cpu")
    batches = []

    def counting(z, t, c):  # the real model; records the batch of every forward
        batches.append(z.shape[0])
        return model(z, t, c)

    def run(**kw):
        batches.clear()
        return sample(counting, (B, h * w, C), a, 8, cond, null, generator=torch.Generator().manual_seed(3), **kw)

    full = run(guidance=3.0)
    assert batches == [2 * B] * 8
    assert torch.equal(run(guidance=3.0, guidance_interval=[0.0, 1.0]), full)
    unguided = run(guidance=0.0)
    assert batches == [B] * 8
    assert torch.equal(run(guidance=3.0, guidance_interval=[0.0, 0.0]), unguided)
    assert batches == [B] * 8  # an empty interval never runs the null branch
    middle = run(guidance=3.0, guidance_interval=[0.3, 0.7])  # t = 16, 14, 12, 10, 7, 5, 3, 1 of T = 16
    assert batches == [B, B, B, 2 * B, 2 * B, 2 * B, B, B]
    assert not torch.equal(middle, full) and not torch.equal(middle, unguided)
    for bad in ([0.8, 0.2], [-0.1, 1.0], [0.0, 1.5], [0.5]):
        with pytest.raises(ValueError, match="diffusion.guidance_interval"):
            run(guidance=3.0, guidance_interval=bad)


def _pipe_model(tmp_path_factory, conditioning: str, null_cond: str = "empty_caption"):
    folder = build_tiny_model(shared_root(tmp_path_factory), conditioning, null_cond=null_cond,
                              train_steps=20 if conditioning == "cross_attn" else 4)
    return BLDPipeline.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("conditioning,null_cond", [("cross_attn", "empty_caption"), ("class", "learned"),
                                                    ("none", "learned"), ("pooled_token", "learned")])
def test_pipeline_batches_equal_one_by_one(tmp_path_factory, conditioning, null_cond):
    pipe = _pipe_model(tmp_path_factory, conditioning, null_cond)
    prompts = ["red apple", "grinning face", "blue square", "red apple", "a cat"]
    given = {"cross_attn": {"prompts": prompts}, "pooled_token": {"prompts": prompts},
             "class": {"class_labels": [0, 1, 2, 0, 3]}, "none": {"n": 5}}[conditioning]
    batch = pipe.sample_latents(**given, steps=8, guidance=2.5, seed=SEEDS, batch_size=2)  # batches 2, 2, 1
    for i, seed in enumerate(SEEDS):
        one = {k: v[i : i + 1] for k, v in given.items() if k != "n"} or {"n": 1}
        alone = pipe.sample_latents(**one, steps=8, guidance=2.5, seed=[seed], batch_size=1)
        assert torch.equal(batch[i : i + 1], alone), f"image {i} (seed {seed}) differs from its draw alone"
    # an int seed s gives image i the seed s + i; one default-sized batch is the same again
    assert torch.equal(pipe.sample_latents(**given, steps=8, guidance=2.5, seed=SEEDS[0]), batch)
    assert len({bytes(x.numpy().tobytes()) for x in batch}) == 5  # five seeds, five images


@pytest.mark.parametrize("inpaint", ["clamp", "renoise"])
def test_pipeline_inpainting_batches_equal_one_by_one(tmp_path_factory, inpaint):
    pipe = _pipe_model(tmp_path_factory, "cross_attn")
    init = Image.open(io.BytesIO(_drawing(0, 0)))
    mask = Image.new("L", (RES, RES), 0)
    mask.paste(255, (0, 0, RES, RES // 2))  # regenerate the top half
    kw = {"steps": 8, "guidance": 2.5, "init_image": init, "mask": mask, "inpaint": inpaint}
    batch = pipe.sample_latents(["grinning face"] * 3, seed=SEEDS[:3], batch_size=3, **kw)
    for i, seed in enumerate(SEEDS[:3]):
        assert torch.equal(batch[i : i + 1], pipe.sample_latents(["grinning face"], seed=[seed], batch_size=1, **kw))
    known, _ = pipe.inpainting_inputs(init, mask)
    kept = known.reshape(1, 4, 4, 16)[:, 2:].bool()  # the bottom half of the grid
    assert torch.equal(batch[:, 2:], kept.expand(3, -1, -1, -1))


def test_pipeline_rejects_bad_batch_size_and_seed_count(tmp_path_factory):
    pipe = _pipe_model(tmp_path_factory, "cross_attn")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe.sample_latents(["red apple"], steps=2, batch_size=0)
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        pipe.sample_latents(["red apple"], steps=2, seed=[1, 2])
    with pytest.raises(ValueError, match="diffusion.guidance_interval"):
        pipe.sample_latents(["red apple"], steps=2, guidance=2.0, guidance_interval=[0.9, 0.1])
    for bad in ([0.9, 0.1], [0.5], ["lo", "hi"]):  # a recipe fails at load, not at the first sample grid
        with pytest.raises(ConfigError, match="diffusion.guidance_interval"):
            from_dict({"diffusion": {"guidance_interval": bad}})


def test_evaluation_sweeps_the_guidance_interval_in_batches_across_prompts(tmp_path_factory, tmp_path):
    model = build_tiny_model(shared_root(tmp_path_factory))
    sheet = tmp_path / "s.txt"
    sheet.write_text("red apple\ngrinning face\nblue square\n")
    out = tmp_path / "sweep"
    base = ["--model", str(model), "--prompts", str(sheet), "--steps", "4", "--images-per-prompt", "2",
            "--device", "cpu", "--guidance", "0,2.5"]
    evaluate_main([*base, "--out", str(out), "--guidance-interval", "0:1,0.5:1", "--batch-size", "4"])
    report = json.loads((out / "metrics.json").read_text())
    # w = 0 has no interval to vary, so it appears once
    assert [s["setting"] for s in report["settings"]] == ["s4_w0_t1", "s4_w2.5_t1", "s4_w2.5_t1_g0.5-1"]
    html = (out / "index.html").read_text()
    assert "guided t/T" in html and "<td>0.5-1</td>" in html
    # batches of 4 images across the 3 prompts: every image is its seed's image drawn alone
    pipe = BLDPipeline.from_pretrained(model, device="cpu")
    bits = {}
    for s in report["settings"]:
        for row in read_sheet(sheet):
            for i in range(2):
                alone = pipe.sample_latents([row.prompt], steps=4, guidance=s["guidance"],
                                            guidance_interval=s["guidance_interval"], seed=[derive_seed(0, row.id, i)])
                stored = (out / "images" / s["setting"] / row.id / f"{i:03d}.bits").read_bytes()
                assert pack_bits(alone.numpy())[0].tobytes() == stored
                bits.setdefault(s["setting"], []).append(stored)
    assert bits["s4_w2.5_t1_g0.5-1"] != bits["s4_w2.5_t1"]  # guiding half the steps changes the images
    with pytest.raises(SystemExit, match="diffusion.guidance_interval"):
        evaluate_main([*base, "--out", str(tmp_path / "bad"), "--guidance-interval", "0.9:0.1"])
