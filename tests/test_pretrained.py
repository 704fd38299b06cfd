"""The diffusers-style call (`pipe(prompt, num_inference_steps, guidance_scale, ...)`) and the
pipeline folder (`save_pretrained` / `write_pretrained` / `from_pretrained`): a saved folder
moved elsewhere loads in a fresh process and gives the same images; the old flat export
still loads; clear errors for bad arguments and broken folders."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_pipeline import RES, build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse fixture)

from bld_t2i.config import ConfigError, from_dict, to_dict
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.pretrained import INDEX_FILE, write_pretrained

PROMPTS = ["red apple", "blue square"]
FRESH = """
import sys, torch
from bld_t2i.pipeline import BLDPipeline
torch.set_num_threads(1)
pipe = BLDPipeline.from_pretrained(sys.argv[1], device="cpu")
out = pipe({prompts!r}, num_inference_steps=4, guidance_scale=3.5, num_images_per_prompt=2,
           generator=torch.Generator().manual_seed(7), output_type="pt")
torch.save({{"images": out.images, "latents": out.latents}}, sys.argv[2])
"""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory) -> Path:
    """The old flat export (config.json + model.safetensors, autoencoder.path elsewhere)."""
    return build_tiny_model(shared_root(tmp_path_factory))


@pytest.fixture(scope="module")
def pipe(flat_model) -> BLDPipeline:
    return BLDPipeline.from_pretrained(flat_model, device="cpu")


def test_saved_folder_moved_and_loaded_in_a_fresh_process_gives_the_same_images(tmp_path, pipe):
    saved = pipe.save_pretrained(tmp_path / "a" / "export")
    names = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert names == ["autoencoder/config.json", "autoencoder/fingerprint", "autoencoder/model.safetensors",
                     "denoiser/config.json", "denoiser/model.safetensors", INDEX_FILE, "scheduler/config.json",
                     "text_encoder/config.json"]
    assert not list((tmp_path / "a").glob("*.tmp"))  # built aside, then renamed
    index = json.loads((saved / INDEX_FILE).read_text())
    assert index["_class_name"] == "BLDPipeline" and index["format"] == 2
    assert set(index) >= {"_bld_t2i_version", "denoiser", "autoencoder", "text_encoder", "scheduler"}
    den = json.loads((saved / "denoiser" / "config.json").read_text())
    assert den["latent_shape"] == [4, 4, 16] and den["text_dim"] == pipe.denoiser.text_dim
    sched = json.loads((saved / "scheduler" / "config.json").read_text())
    assert (sched["T"], sched["sample_steps"]) == (16, 4)
    text = " ".join(p.read_text() for p in saved.rglob("*.json"))
    assert str(tmp_path) not in text and "bld-tiny-models" not in text  # nothing points outside the folder

    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(str(saved), str(moved))
    result = tmp_path / "fresh.pt"
    proc = subprocess.run([sys.executable, "-c", FRESH.format(prompts=PROMPTS), str(moved), str(result)],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(result)
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.5, num_images_per_prompt=2, generator=_gen(7),
               output_type="pt")
    assert torch.equal(fresh["latents"], out.latents) and torch.equal(fresh["images"], out.images)
    assert len({x.numpy().tobytes() for x in out.latents}) == 4


def test_output_types(pipe):
    kw = {"num_inference_steps": 2, "num_images_per_prompt": 2}
    pil = pipe(PROMPTS, generator=_gen(1), **kw)
    assert len(pil.images) == 4 and all(isinstance(im, Image.Image) for im in pil.images)
    assert all(im.size == (RES, RES) and im.mode == "RGB" for im in pil.images)
    pt = pipe(PROMPTS, generator=_gen(1), output_type="pt", **kw)
    assert pt.images.shape == (4, 3, RES, RES) and pt.images.dtype == torch.float32
    assert 0 <= pt.images.min() and pt.images.max() <= 1 and torch.equal(pt.latents, pil.latents)
    assert np.array_equal(np.asarray(pil.images[3]), (pt.images[3] * 255).round().byte().permute(1, 2, 0).numpy())
    arr = pipe(PROMPTS, generator=_gen(1), output_type="np", **kw).images
    assert isinstance(arr, np.ndarray) and arr.shape == (4, RES, RES, 3)
    assert np.array_equal(arr, pt.images.permute(0, 2, 3, 1).numpy())
    latent = pipe(PROMPTS, generator=_gen(1), output_type="latent", **kw)
    assert latent.images is latent.latents and torch.equal(latent.latents, pil.latents)


def test_guidance_scale_is_one_plus_w_and_seeds_come_from_the_generator(pipe):
    prompts = ["red apple", "grinning face", "a cat"]
    out = pipe(prompts, num_inference_steps=4, guidance_scale=1, generator=_gen(5), output_type="latent")
    assert out.seeds == torch.randint(0, 2**63 - 1, (3,), generator=_gen(5)).tolist()
    assert torch.equal(out.latents, pipe.sample_latents(prompts, steps=4, guidance=0.0, seed=out.seeds))
    guided = pipe(prompts, num_inference_steps=4, guidance_scale=3.5, generator=_gen(5), output_type="latent")
    assert guided.seeds == out.seeds and not torch.equal(guided.latents, out.latents)
    assert torch.equal(guided.latents, pipe.sample_latents(prompts, steps=4, guidance=2.5, seed=out.seeds))
    # defaults: the config's steps and w (0 here, so guidance_scale 1)
    default = pipe(prompts, generator=_gen(5), output_type="latent")
    assert torch.equal(default.latents, out.latents)
    g = _gen(5)  # a generator advances: the next call draws other images, as diffusers
    first, second = (pipe(prompts[:1], num_inference_steps=2, generator=g, output_type="latent") for _ in range(2))
    assert first.seeds != second.seeds


def test_num_images_per_prompt_and_a_list_of_generators(pipe):
    gens = [_gen(s) for s in (1, 2, 3, 4)]
    out = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0, generator=gens,
               output_type="latent", batch_size=3)
    assert out.latents.shape == (4, 4, 4, 16)
    repeated = ["red apple", "red apple", "blue square", "blue square"]  # each prompt's images together
    assert torch.equal(out.latents, pipe.sample_latents(repeated, steps=4, guidance=1.0, seed=out.seeds))
    alone = pipe("blue square", num_inference_steps=4, guidance_scale=2.0, generator=[_gen(3)], output_type="latent")
    assert torch.equal(alone.latents, out.latents[2:3])  # image i depends on generator i alone
    with pytest.raises(ValueError, match="generator: a list of 3 generators for 4 images"):
        pipe(PROMPTS, num_images_per_prompt=2, generator=gens[:3])
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        pipe(PROMPTS, generator=7)


def test_bad_arguments_name_themselves(pipe):
    for kw, match in [({"output_type": "jpg"}, "output_type"), ({"guidance_scale": 0.5}, "guidance_scale"),
                      ({"guidance_scale": float("nan")}, "guidance_scale"), ({"num_images_per_prompt": 0},
                      "num_images_per_prompt"), ({"num_inference_steps": 0}, "num_inference_steps"),
                      ({"height": 30}, "height must be a positive multiple of 8"), ({"width": 0}, "width"),
                      ({"num_images": 2}, "text-conditioned"), ({"class_labels": [1]}, "text-conditioned"),
                      ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            pipe("red apple", **kw)
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list"):
        pipe([])
    if "grid" not in inspect.signature(pipe.denoiser.denoise).parameters:
        with pytest.raises(ValueError, match="only its own 4x4 latent grid"):
            pipe("red apple", width=2 * RES)
    else:  # a denoiser that takes any grid: the image size follows height and width
        out = pipe("red apple", width=2 * RES, num_inference_steps=2, output_type="pt")
        assert out.latents.shape == (1, 4, 8, 16) and out.images.shape == (1, 3, RES, 2 * RES)
        init, mask = Image.new("RGB", (2 * RES, 2 * RES), (200, 30, 30)), Image.new("L", (2 * RES, 2 * RES), 0)
        mask.paste(255, (0, 0, 2 * RES, RES))  # regenerate the top half
        with pytest.raises(ValueError, match="inpainting needs a square image"):
            pipe("red apple", width=2 * RES, image=init, mask_image=mask)
        big = pipe("red apple", height=2 * RES, width=2 * RES, num_inference_steps=2, image=init, mask_image=mask,
                   output_type="latent").latents  # a square size other than the native one
        known, _ = pipe.inpainting_inputs(init, mask, 2 * RES)
        assert torch.equal(big[:, 4:], known.reshape(1, 8, 8, 16)[:, 4:].bool())


@pytest.mark.parametrize("conditioning", ["class", "none"])
def test_class_and_unconditional_pipelines_round_trip(tmp_path, tmp_path_factory, conditioning):
    folder = build_tiny_model(shared_root(tmp_path_factory), conditioning, null_cond="learned", train_steps=4)
    pipe = BLDPipeline.from_pretrained(folder, device="cpu")
    given = {"class_labels": [0, 3]} if conditioning == "class" else {"num_images": 2}
    out = pipe(**given, num_inference_steps=4, guidance_scale=3.0, generator=_gen(2), output_type="latent")
    again = BLDPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "export"), device="cpu")
    assert torch.equal(again(**given, num_inference_steps=4, guidance_scale=3.0, generator=_gen(2),
                             output_type="latent").latents, out.latents)
    assert json.loads((tmp_path / "export" / "text_encoder" / "config.json").read_text())["kind"] == "none"
    if conditioning == "class":
        assert pipe(class_labels=2, num_images_per_prompt=3, num_inference_steps=2).latents.shape[0] == 3
        with pytest.raises(ValueError, match="class-conditioned: pass class_labels"):
            pipe("red apple")
    else:
        with pytest.raises(ValueError, match="unconditional.*pass num_images"):
            pipe(num_images=2, num_images_per_prompt=2)
        with pytest.raises(ValueError, match="num_images must be an integer >= 1"):
            pipe()


def test_write_pretrained_from_parts_and_the_flat_layout(tmp_path, flat_model, pipe):
    cfg = from_dict(json.loads((flat_model / "config.json").read_text()))
    state = load_file(str(flat_model / "model.safetensors"))
    folder = write_pretrained(tmp_path / "parts", cfg, state, cfg.autoencoder.path, text_dim=pipe.denoiser.text_dim)
    loaded = BLDPipeline.from_pretrained(folder, device="cpu")
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "generator": _gen(4), "output_type": "latent"}
    assert torch.equal(loaded("red apple", **kw).latents, pipe("red apple", **{**kw, "generator": _gen(4)}).latents)
    write_pretrained(folder, cfg, state, loaded.autoencoder, text_dim=pipe.denoiser.text_dim)  # replaces it
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="denoiser_state does not fit"):
        write_pretrained(tmp_path / "bad", cfg, {k: v for k, v in state.items() if "head" not in k},
                         cfg.autoencoder.path, text_dim=pipe.denoiser.text_dim)
    with pytest.raises(ValueError, match="needs text_dim > 0"):
        write_pretrained(tmp_path / "bad", cfg, state, cfg.autoencoder.path)
    with pytest.raises(ValueError, match="save_pretrained needs a float32 pipeline"):
        BLDPipeline.from_pretrained(flat_model, device="cpu", dtype=torch.bfloat16).save_pretrained(tmp_path / "x")
    # a flat export whose autoencoder.path is relative to the model folder, loaded from another cwd
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(flat_model / "model.safetensors", flat)
    shutil.copytree(cfg.autoencoder.path, flat / "ae")
    (flat / "config.json").write_text(json.dumps({**to_dict(cfg), "autoencoder": {
        **dataclasses.asdict(cfg.autoencoder), "path": "ae"}}))
    assert torch.equal(BLDPipeline.from_pretrained(flat, device="cpu")("red apple", **{**kw, "generator": _gen(4)})
                       .latents, pipe("red apple", **{**kw, "generator": _gen(4)}).latents)


def _edit(file: str, **changes):
    def edit(folder: Path) -> None:
        path = folder / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


# (how the folder is broken, the error, the text it must carry: the file and the field at fault)
BROKEN_FOLDERS = [
    (_edit(INDEX_FILE, format=3), ValueError, "model_index.json: expected _class_name 'BLDPipeline' and format 2"),
    (lambda f: (f / "denoiser" / "model.safetensors").unlink(), FileNotFoundError, "denoiser/model.safetensors"),
    (_edit("denoiser/config.json", num_layers=3), ConfigError,
     "denoiser/config.json: unknown config key 'denoiser.num_layers'"),
    (_edit("denoiser/config.json", depth=3), ValueError,
     "denoiser/model.safetensors does not fit the architecture: 22 missing"),  # weights of 2 blocks, config of 3
    (_edit("denoiser/config.json", latent_shape=[8, 8, 16]), ValueError,
     "latent_shape \\[8, 8, 16\\] differs from the autoencoder's"),
    (_edit("denoiser/config.json", text_dim=7), ValueError, "trained on text_dim 7"),
    (_edit("scheduler/config.json", schedule="square"), ConfigError, "scheduler/config.json: 'diffusion.schedule'"),
    (lambda f: (f / "text_encoder" / "config.json").write_text("{not json"), ValueError,
     "text_encoder/config.json is not valid JSON"),
]


def test_broken_pipeline_folders_name_the_file_and_field(tmp_path, pipe):
    good = pipe.save_pretrained(tmp_path / "good")
    for i, (breaks, error, match) in enumerate(BROKEN_FOLDERS):
        folder = Path(shutil.copytree(good, tmp_path / f"broken{i}"))
        breaks(folder)
        with pytest.raises(error, match=match):
            BLDPipeline.from_pretrained(folder, device="cpu")
