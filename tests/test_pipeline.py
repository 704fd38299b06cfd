"""BLDPipeline: loading an exported folder, text / class / unconditional sampling, seeds,
guidance, bf16, inpainting (clamp and renoise), grids; the sample CLI. The diffusers-style
call and the pipeline folder layout are in test_pretrained.py.

`build_tiny_model` is the shared fixture of the sampling and evaluation tests: a random
tiny binary autoencoder, latent shards encoded from drawn images, and a tiny denoiser
trained on them for a few steps with a plain torch loop, exported like the trainer does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from bld_t2i.cli.evaluate import main as evaluate_main
from bld_t2i.cli.sample import main as sample_main
from bld_t2i.config import Config, save_config
from bld_t2i.data.encode import Encoder, encode_shards
from bld_t2i.data.images import ImageDecoder
from bld_t2i.data.latents import latent_loader, unpack_bits_tensor
from bld_t2i.data.shards import TarShardWriter
from bld_t2i.diffusion import diffusion_loss, keep_factors
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.models.text_encoders import build_text_encoder
from bld_t2i.pipeline import BLDPipeline, mask_to_grid
from bld_t2i.utils import make_grid, to_pil

RES = 32  # image size of the tiny model: 4x4 grid x 16 bits
CAPTIONS = ["red apple", "grinning face", "blue square", "green tree"]
COLOURS = [(220, 30, 30), (250, 200, 40), (40, 60, 220), (30, 160, 50)]
TRAIN_STEPS = 20


def _drawing(i: int, j: int) -> bytes:
    """Image j of caption i: its colour's shape on white, shifted a little per j."""
    img = Image.new("RGB", (RES, RES), (255, 255, 255))
    d = ImageDraw.Draw(img)
    o = j % 4
    box = (4 + o, 4 + o, 26 + o // 2, 26 + o // 2)
    (d.ellipse if i % 2 == 0 else d.rectangle)(box, fill=COLOURS[i])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_drawings(folder: Path, per_caption: int = 6) -> str:
    """Two image shards of drawings with captions and labels; returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [(i, j) for j in range(per_caption) for i in range(len(CAPTIONS))]
    half = len(items) // 2
    for s, part in enumerate((items[:half], items[half:])):
        with TarShardWriter(str(folder / f"draw-{s:06d}.tar")) as w:
            for i, j in part:
                w.write({"__key__": f"c{i}-{j:03d}", "png": _drawing(i, j), "txt": CAPTIONS[i].encode(),
                         "json": json.dumps({"label": i}).encode()})
    return str(folder / "draw-{000000..000001}.tar")


def build_tiny_model(root: Path, conditioning: str = "cross_attn", null_cond: str = "empty_caption",
                     train_steps: int = TRAIN_STEPS) -> Path:
    """An exported tiny model folder (config.json + model.safetensors) under `root`, with its
    autoencoder in root/ae and its training latents in root/latents (made once per root,
    shared by the models built there). Returns the model folder; an existing one is reused."""
    folder = root / f"model-{conditioning}-{null_cond}"
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    cfg = Config()
    cfg.autoencoder.preset, cfg.autoencoder.resolution = "ae64-tiny", RES
    cfg.autoencoder.path = str(root / "ae")
    cfg.denoiser.preset, cfg.denoiser.conditioning, cfg.denoiser.null_cond = "tiny", conditioning, null_cond
    cfg.denoiser.num_classes = len(CAPTIONS) if conditioning == "class" else 0
    text = conditioning in ("cross_attn", "pooled_token")
    if text:
        cfg.text_encoder.kind, cfg.text_encoder.random_init = "open_clip", True  # tiny random CLIP text tower
        cfg.text_encoder.max_length = 8
    cfg.diffusion.T, cfg.diffusion.sample_steps = 16, 4
    cfg.latents.shards = str(root / "latents" / "latents-{000000..000001}.tar")
    cfg.latents.batch_size = 12

    if not (root / "latents" / "manifest.json").is_file():
        ae = BinaryAutoencoder.from_config(cfg.autoencoder)
        ae.save_pretrained(cfg.autoencoder.path)
        spec = write_drawings(root / "images")
        encode_shards(spec, str(root / "latents"), Encoder(ae, torch.device("cpu")),
                      ImageDecoder(RES, "center_crop", 8), 16, 0, 1, None)
    ae = BinaryAutoencoder.from_pretrained(cfg.autoencoder.path)

    encoder = build_text_encoder(cfg.text_encoder, "cpu")
    model = Denoiser(cfg.denoiser, ae.latent_shape, encoder.dim if encoder else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    a = keep_factors(cfg.diffusion.T).float()
    null_text = encoder.encode([""]) if encoder else None
    loader = latent_loader(cfg.latents, 0, ae.fingerprint, ae.latent_shape, 0, 1)
    for _, batch in zip(range(train_steps), loader):
        B = len(batch["caption"])
        if text:
            cond = encoder.encode(batch["caption"])
            null = model.null_condition(B, "cpu", None if null_cond == "learned" else null_text)
        elif conditioning == "class":
            cond, null = {"label": batch["label"]}, model.null_condition(B, "cpu")
        else:
            cond = null = None
        cond, _ = drop_condition(cond, null, 0.1)
        loss, _, _ = diffusion_loss(model, unpack_bits_tensor(batch["packed"], ae.latent_shape).float(), cond, a)
        opt.zero_grad()
        loss.backward()
        opt.step()

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_config(cfg, folder / "config.json")
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one torch thread is as fast on a quiet machine and several times faster
    on a busy shared one, where threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_root(tmp_path_factory) -> Path:
    """One folder per test session for the tiny models, so every test module reuses them."""
    return tmp_path_factory.getbasetemp() / "bld-tiny-models"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return build_tiny_model(shared_root(tmp_path_factory))


def test_text_sampling_is_seeded_and_guidance_changes_it(text_model):
    pipe = BLDPipeline.from_pretrained(text_model, device="cpu")
    prompts = ["red apple", "grinning face", "a cat"]
    kw = {"num_inference_steps": 4, "batch_size": 2, "output_type": "pt"}
    out = pipe(prompts, guidance_scale=3.5, generator=torch.Generator().manual_seed(3), **kw)
    assert out.images.shape == (3, 3, RES, RES) and out.latents.shape == (3, 4, 4, 16)
    assert out.latents.dtype == torch.bool and out.images.min() >= 0 and out.images.max() <= 1
    again = pipe(prompts, guidance_scale=3.5, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out.latents, again.latents) and torch.equal(out.images, again.images)
    unguided = pipe(prompts, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), **kw)
    assert not torch.equal(out.latents, unguided.latents)
    # per-image seeds: an image regenerated alone equals its place in the batch
    batch = pipe.sample_latents(["red apple", "blue square"], steps=8, seed=[11, 12])
    alone = pipe.sample_latents(["blue square"], steps=8, seed=[12])
    assert torch.equal(batch[1:], alone)


@pytest.mark.parametrize("conditioning", ["class", "none", "pooled_token"])
def test_class_unconditional_and_pooled_models(tmp_path, tmp_path_factory, conditioning):
    folder = build_tiny_model(shared_root(tmp_path_factory), conditioning, null_cond="learned", train_steps=4)
    pipe = BLDPipeline.from_pretrained(folder, device="cpu")
    if conditioning == "class":
        out = pipe(class_labels=[0, 3], num_inference_steps=4, guidance_scale=3.0)
        with pytest.raises(ValueError, match="num_classes"):
            pipe(class_labels=[4])
    elif conditioning == "none":
        out = pipe(num_images=2, num_inference_steps=4, guidance_scale=3.0)
    else:
        out = pipe(["red apple", "grinning face"], num_inference_steps=4, guidance_scale=3.0)
    assert out.latents.shape == (2, 4, 4, 16)
    grid = pipe.save_grid(["red apple"], tmp_path / "grid.png", seed=1)
    assert Image.open(grid).size[0] > RES
    # the CLIs: a class label or no condition for `sample`; label sheets for `evaluate`
    condition = {"class": ["--class-label", "2"], "none": [], "pooled_token": ["--prompt", "red apple"]}[conditioning]
    sample_main(["--model", str(folder), "--out", str(tmp_path / "cli"), "--steps", "4", "--num-images", "2",
                 "--device", "cpu", *condition])
    assert len(list((tmp_path / "cli").glob("*.png"))) == 3
    if conditioning == "class":
        sheet = tmp_path / "labels.txt"
        sheet.write_text("0\n3\n")
        evaluate_main(["--model", str(folder), "--prompts", str(sheet), "--out", str(tmp_path / "eval"), "--steps", "4",
                       "--images-per-prompt", "2", "--device", "cpu"])
        assert len(list((tmp_path / "eval" / "grids").rglob("*.png"))) == 2
        sheet.write_text("0\napple\n")
        with pytest.raises(SystemExit, match="line 2: a class-conditional model takes an integer class label"):
            evaluate_main(["--model", str(folder), "--prompts", str(sheet), "--out", str(tmp_path / "eval2"),
                           "--device", "cpu"])


def test_bf16_sampling(text_model):
    pipe = BLDPipeline.from_pretrained(text_model, device="cpu", dtype=torch.bfloat16)
    out = pipe(["red apple"], num_inference_steps=4, guidance_scale=3.5, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


@pytest.mark.parametrize("inpaint", ["clamp", "renoise"])
def test_inpainting_keeps_every_bit_outside_the_mask(text_model, inpaint):
    pipe = BLDPipeline.from_pretrained(text_model, device="cpu")
    init = Image.open(io.BytesIO(_drawing(0, 0)))
    mask = Image.new("L", (RES, RES), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 12, 12), fill=255)  # top-left 13x13 px: regenerate
    keep = mask_to_grid(mask, RES, (4, 4)).reshape(4, 4)
    assert keep.sum() == 12  # cells (0..1, 0..1) touch the white square; max-pooling drops them
    known = pipe.autoencoder.encode(torch.from_numpy(np.array(init)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    out = pipe("grinning face", num_images_per_prompt=3, num_inference_steps=8, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), image=init, mask_image=mask, inpaint=inpaint)
    kept = keep.bool()
    assert torch.equal(out.latents[:, kept], known.expand(3, -1, -1, -1)[:, kept])
    assert not torch.equal(out.latents, known.expand(3, -1, -1, -1))  # the masked part was resampled


def test_mask_must_keep_and_regenerate_some_cells(tmp_path):
    black = tmp_path / "black.png"
    Image.new("L", (RES, RES), 0).save(black)
    with pytest.raises(ValueError, match="black.png: the mask is all black"):
        mask_to_grid(black, RES, (4, 4))
    speckled = Image.new("L", (RES, RES), 255)  # black pixels, but no cell all black
    for x in range(0, RES, RES // 4):
        speckled.putpixel((x, x), 0)
    with pytest.raises(ValueError, match="regenerates every cell of the 4x4 latent grid"):
        mask_to_grid(speckled, RES, (4, 4))
    one = Image.new("L", (RES, RES), 0)
    one.putpixel((0, 0), 255)  # a single white pixel regenerates its cell
    assert mask_to_grid(one, RES, (4, 4)).sum() == 15


def test_bad_folder_and_config_errors(tmp_path, text_model):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BLDPipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((text_model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        BLDPipeline.from_pretrained(broken)
    pipe = BLDPipeline.from_pretrained(text_model, device="cpu")
    with pytest.raises(ValueError, match="num_inference_steps must be an integer in 1..T=16"):
        pipe(["x"], num_inference_steps=17)
    with pytest.raises(ValueError, match="steps"):
        pipe.sample_latents(["x"], steps=17)
    with pytest.raises(ValueError, match="text-conditioned.*pass prompt"):
        pipe(num_images=2)


def test_grid_layout():
    imgs = to_pil(torch.zeros(5, 3, 8, 8))
    assert make_grid(imgs).size == (3 * 10 + 2, 2 * 10 + 2)


def test_sample_cli(tmp_path, text_model):
    init = tmp_path / "init.png"
    Image.open(io.BytesIO(_drawing(1, 0))).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (RES, RES), 0)
    ImageDraw.Draw(m).rectangle((16, 0, 31, 31), fill=255)
    m.save(mask)
    out = tmp_path / "out"
    sample_main(["--model", str(text_model), "--prompt", "red apple",
           "--out", str(out), "--steps", "4", "--guidance", "2.5", "--temperature", "0.9", "--num-images", "3",
           "--batch-size", "2", "--seed", "5", "--device", "cpu", "--init-image", str(init), "--mask", str(mask),
           "--inpaint", "renoise"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4  # three samples and their grid
    assert all(Image.open(p).size == (RES, RES) for p in pngs if "grid" not in p.name)
    # image 1 (seed 5 + 1) regenerated alone, with the full interval spelled out, is the same file
    sample_main(["--model", str(text_model), "--prompt", "red apple", "--out", str(tmp_path / "one"), "--steps", "4",
                 "--guidance", "2.5", "--guidance-interval", "0", "1", "--temperature", "0.9", "--num-images", "1",
                 "--seed", "6", "--device", "cpu", "--init-image", str(init), "--mask", str(mask), "--inpaint", "renoise"])
    assert (tmp_path / "one" / "0000.png").read_bytes() == (out / "0001.png").read_bytes()
