"""Prompt-sheet evaluation end to end on a tiny trained model: the three sheet formats,
bad rows, rerun, rank split, CLIP score / FID / KID from local weights, nearest neighbours,
and the report rendered in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse fixture)

from bld_t2i.cli.evaluate import main as evaluate_main
from bld_t2i.data.latents import pack_bits, read_manifest, unpack_bits
from bld_t2i.eval import metrics as M
from bld_t2i.eval.generate import EvalOptions, settings_grid
from bld_t2i.eval.neighbours import hamming, nearest_neighbours, read_latent_shard
from bld_t2i.eval.run import evaluate
from bld_t2i.eval.sheets import SheetError, derive_seed, read_sheet
from bld_t2i.pipeline import BLDPipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """root with model-cross_attn-empty_caption/, ae/, latents/, images/ (test_pipeline.build_tiny_model)."""
    root = shared_root(tmp_path_factory)
    build_tiny_model(root)
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- sheets


def test_sheets_in_three_formats(tmp_path):
    txt = read_sheet(_write(tmp_path / "s.txt", "# emoji\nred apple\n\ngrinning face\n"))
    assert [(r.id, r.prompt, r.line) for r in txt] == [("0", "red apple", 2), ("1", "grinning face", 4)]
    parti = read_sheet(_write(tmp_path / "parti.tsv", "Prompt\tCategory\tChallenge\tNote\n"
                                                      "a red apple\tFood\tBasic\t\nthe sun\tOutdoor\tBasic\tx\n"))
    assert [(r.prompt, r.category) for r in parti] == [("a red apple", "Food"), ("the sun", "Outdoor")]
    csv_rows = read_sheet(_write(tmp_path / "s.csv", 'id,prompt,seed\napple,"red apple, shiny",7\n'))
    assert (csv_rows[0].id, csv_rows[0].prompt, csv_rows[0].seed) == ("apple", "red apple, shiny", 7)
    jl = read_sheet(_write(tmp_path / "s.jsonl", '{"prompt": "red apple", "id": "a/1", "category": "food"}\n'
                                                 '{"prompt": "cat", "seed": 3}\n'))
    assert [(r.id, r.category, r.seed) for r in jl] == [("a_1", "food", None), ("1", "uncategorised", 3)]
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1) != derive_seed(0, "a", 2)


@pytest.mark.parametrize("name,text,match", [
    ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', r"empty.jsonl:2: empty prompt"),
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x",\n', r"bad.jsonl:3: not valid JSON"),
    ("nokey.jsonl", '{"text": "x"}\n', r"nokey.jsonl:1: no 'prompt' key"),
    ("nocol.csv", "text,category\nx,y\n", r"nocol.csv:1: no prompt column"),
    ("short.csv", "prompt,category\nok,a\n,b\n", r"short.csv:3: empty prompt"),
    ("wide.tsv", "Prompt\tCategory\nok\ta\nx\ty\tz\n", r"wide.tsv:3: 3 fields"),
    ("dup.jsonl", '{"prompt": "a", "id": "p"}\n{"prompt": "b", "id": "p"}\n',
     r"dup.jsonl:2: prompt id 'p' already used on line 1"),
    ("seed.csv", "prompt,seed\nok,1.5\n", r"seed.csv:2: seed must be an integer"),
])
def test_bad_rows_name_the_line(tmp_path, name, text, match):
    with pytest.raises(SheetError, match=match):
        read_sheet(_write(tmp_path / name, text))


# ----------------------------------------------------------------------------- end to end


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _tiny_clip(folder: Path) -> str:
    """A random tiny OpenCLIP model saved as an OpenCLIP local-dir export."""
    import open_clip

    model_cfg = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                                 "image_size": 32},
                 "text_cfg": {"width": 32, "heads": 2, "layers": 2, "context_length": 16}}
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**model_cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def _random_inception(path: Path) -> str:
    """torch-fidelity's InceptionV3 with random weights, saved where --inception points
    (the architecture is real; only its trained weights are not shipped offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    cls = fi.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, fi.load_state_dict_from_url
    cls.load_state_dict, fi.load_state_dict_from_url = (lambda self, sd: None), (lambda *a, **k: {})
    try:
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fi.load_state_dict_from_url = original_load, original_url
    for m in model.modules():  # variance-preserving, so ~40 layers deep the features are not ~0
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return str(path)


def test_three_sheet_formats_end_to_end_and_rerun(tiny, tmp_path):
    model = tiny / "model-cross_attn-empty_caption"
    sheets = {
        "txt": _write(tmp_path / "emoji.txt", "red apple\nunicorn face\n"),
        "tsv": _write(tmp_path / "parti.tsv", "Prompt\tCategory\tChallenge\tNote\nred apple\tFood\tBasic\t\n"
                                              "grinning face\tPeople\tBasic\t\n"),
        "jsonl": _write(tmp_path / "sheet.jsonl", '{"prompt": "green tree", "id": "tree", "category": "plants"}\n'
                                                  '{"prompt": "blue square", "seed": 5}\n'),
    }
    for kind, sheet in sheets.items():
        out = tmp_path / f"out-{kind}"
        argv = ["--model", str(model), "--prompts", str(sheet), "--out", str(out), "--steps", "4",
                "--images-per-prompt", "2", "--device", "cpu"]
        if kind == "tsv":
            argv += ["--guidance", "0,2.5", "--temperature", "0.9"]
        evaluate_main(argv)
        report = json.loads((out / "metrics.json").read_text())
        rows = read_sheet(sheet)
        assert len(report["settings"]) == (2 if kind == "tsv" else 1)
        for s in report["settings"]:
            for row in rows:
                assert (out / "grids" / s["setting"] / f"{row.id}.png").is_file()
                assert all((out / "images" / s["setting"] / row.id / f"{i:03d}.png").is_file() for i in range(2))
            assert 0 < s["diversity"] <= 1 and s["generation_s_per_sample"] > 0 and s["decode_s_per_sample"] > 0
        assert set(report["timing_by_steps"]) == {"4"}
        assert report["skipped"]["clip_score"] == "no --clip-model given"
        assert report["skipped"]["fid"] == "no --reference image shards given"
        assert (out / "metrics.csv").read_text().count("\n") == len(report["settings"]) + 1
        html = (out / "index.html").read_text()
        assert all(row.prompt in html for row in rows)
        if kind == "tsv":
            assert "People" in html and "Food" in html
        before = _files(out)
        evaluate_main(argv)  # a rerun of a finished evaluation writes nothing
        assert _files(out) == before


def test_images_are_reproducible_alone_and_split_across_ranks(tiny, tmp_path, monkeypatch):
    pipe = BLDPipeline.from_pretrained(tiny / "model-cross_attn-empty_caption", device="cpu")
    rows = read_sheet(_write(tmp_path / "s.txt", "red apple\ngrinning face\nblue square\n"))
    opts = EvalOptions(settings=settings_grid([4], [2.5], [1.0]), images_per_prompt=2, seed=1)
    for rank in (1, 0):  # two ranks of one job, one after the other (no process group: barriers are no-ops)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        evaluate(pipe, rows, tmp_path / "split", opts)
        if rank == 1:
            done = {p.parent.name for p in (tmp_path / "split" / "images").rglob("*.png")}
            assert done == {"1"}  # rank 1 of 2 drew only the second prompt
    timing = {p.name for p in (tmp_path / "split" / "timing").iterdir()}
    assert timing == {"rank0.json", "rank1.json"}
    report = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert report["settings"][0]["samples_timed"] == 6
    # image 1 of "grinning face" regenerated alone matches the evaluation's
    monkeypatch.setenv("WORLD_SIZE", "1")
    alone = pipe.sample_latents(["grinning face"], steps=4, guidance=2.5, seed=[derive_seed(1, "1", 1)])
    stored = (tmp_path / "split" / "images" / "s4_w2.5_t1" / "1" / "001.bits").read_bytes()
    assert pack_bits(alone.numpy())[0].tobytes() == stored


def test_torchrun_splits_prompts_across_two_ranks(tiny, tmp_path):
    sheet = _write(tmp_path / "s.txt", "red apple\ngrinning face\nblue square\n")
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bld_t2i.cli.evaluate",
           "--model", str(tiny / "model-cross_attn-empty_caption"), "--prompts", str(sheet), "--out", str(out),
           "--steps", "4", "--images-per-prompt", "2", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    timing = {p.name: json.loads(p.read_text())["s4_w0_t1"]["n"] for p in (out / "timing").iterdir()}
    assert timing == {"rank0.json": 4, "rank1.json": 2}  # prompts 0 and 2 on rank 0, prompt 1 on rank 1
    assert json.loads((out / "metrics.json").read_text())["settings"][0]["samples_timed"] == 6
    assert len(list((out / "images").rglob("*.png"))) == 6 and (out / "index.html").is_file()


def test_nearest_neighbour_of_a_training_latent_is_itself(tiny):
    folder = str(tiny / "latents")
    manifest = read_manifest(folder)
    shape = tuple(manifest["latent_shape"])
    shard = read_latent_shard(f"{folder}/{manifest['shards'][1]['name']}", (int(np.prod(shape)) + 7) // 8)
    packed, keys = shard.packed, shard.keys
    queries = unpack_bits(packed[[0, 5]], shape).reshape(2, *shape)
    found = nearest_neighbours(queries, folder, k=10)
    for f, key in zip(found, (keys[0], keys[5])):  # itself at distance 0 (drawings may share a code)
        assert f[0].distance == 0 and key in {n.key for n in f if n.distance == 0}
    assert all(len(f) == 10 and [n.distance for n in f] == sorted(n.distance for n in f) for f in found)
    # the packed-byte popcount equals the plain count of differing bits
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, (3, 4, 4, 16)), rng.integers(0, 2, (5, 4, 4, 16))
    expected = (a.reshape(3, 1, -1) != b.reshape(1, 5, -1)).sum(-1)
    assert np.array_equal(hamming(pack_bits(a), pack_bits(b)), expected)
    assert M.diversity(np.stack([a[0], a[0]])) == 0.0
    assert M.diversity(np.stack([a[0], 1 - a[0]])) == 1.0


def test_report_with_metrics_and_neighbours_renders_in_chromium(tiny, tmp_path):
    model = tiny / "model-cross_attn-empty_caption"
    sheet = _write(tmp_path / "s.jsonl", '{"prompt": "red apple", "category": "seen"}\n'
                                         '{"prompt": "unicorn face", "category": "unseen"}\n')
    out = tmp_path / "report"
    evaluate_main(["--model", str(model), "--prompts", str(sheet), "--out", str(out), "--steps", "4",
                   "--images-per-prompt", "2", "--device", "cpu", "--neighbours", str(tiny / "latents"),
                   "--neighbours-k", "3", "--neighbours-clip", "--clip-model", _tiny_clip(tmp_path / "clip"),
                   "--inception", _random_inception(tmp_path / "inception.pth"),
                   "--reference", str(tiny / "images" / "draw-{000000..000001}.tar"), "--reference-limit", "6",
                   "--fid-features", "64",
                   "--wandb"])
    report = json.loads((out / "metrics.json").read_text())
    s = report["settings"][0]
    assert report["skipped"] == {"class_accuracy": "the model is not class-conditional",
                                 "recall_at_10": "--neighbours-k 3 < 10"}
    assert 0 <= s["clip_score"] <= 100 and s["fid"] > 0 and np.isfinite(s["kid"])
    # "red apple" is a training caption, "unicorn face" is not: recall over the first prompt's samples
    assert s["seen_prompts"] == 1 and s["recall_at_1"] in (0.0, 0.5, 1.0) and "recall_at_10" not in s
    assert 0 <= s["bit_rate_diff_mean"] <= s["bit_rate_diff_max"] <= 1 and 0 <= s["dead_or_saturated"] <= 1
    assert set(report["reuse"]) == {"reference_statistics", "neighbours", "clip_neighbour_features"}
    neighbours = json.loads((out / "neighbours.json").read_text())
    for kind in ("hamming", "clip"):  # 2 images of prompt "0", 3 neighbours each, nearest first
        found = neighbours[kind]["s4_w0_t1"]["0"]
        assert len(found) == 2 and all(len(f) == 3 for f in found)
        assert all([n["distance"] for n in f] == sorted(n["distance"] for n in f) for f in found)
    assert list((out / "wandb").glob("offline-run-*"))

    # Chromium: a copy of the page reports every image's natural size once the page has loaded
    probe = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';"
             " p.textContent = JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth,"
             " i.naturalHeight])); document.body.appendChild(p); });</script>")
    page = (out / "index.html").read_text()
    (out / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian package chromium is required (make setup installs it)"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", (out / "probe.html").as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    images = json.loads(dom[start : dom.index("</pre>", start)].replace("&amp;", "&"))
    assert len(images) == page.count("<img ")
    assert len(images) == 2 * (1 + 2 * 2 * (1 + 3)) and all(w > 0 and h > 0 for _, w, h in images), images
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1000,1400", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # text and images drawn, not a blank page


# ----------------------------------------------------------------------------- inpainting


def _inpainting_inputs(folder: Path, res: int) -> tuple[Path, Path]:
    """A drawing (a bright square on black) and a mask whose white right half is regenerated."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (res, res))
    ImageDraw.Draw(image).rectangle((res // 4, res // 4, 3 * res // 4, 3 * res // 4), fill=(230, 200, 40))
    mask = Image.new("L", (res, res), 0)
    mask.paste(255, (res // 2, 0, res, res))
    image.save(folder / "image.png")
    mask.save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_inpainting_keeps_the_known_bits_and_is_reported(tiny, tmp_path):
    from test_pipeline import build_tiny_model

    model = build_tiny_model(tiny, "none", null_cond="learned", train_steps=4)
    pipe = BLDPipeline.from_pretrained(model, device="cpu")
    image, mask = _inpainting_inputs(tmp_path, pipe.autoencoder.resolution)
    sheet = _write(tmp_path / "uncond.jsonl", '{"prompt": "group a", "id": "a"}\n{"prompt": "group b", "id": "b"}\n')
    out = tmp_path / "out"
    argv = ["--model", str(model), "--prompts", str(sheet), "--out", str(out), "--steps", "4", "--guidance", "0",
            "--images-per-prompt", "3", "--device", "cpu", "--inpaint-image", str(image), "--inpaint-mask", str(mask)]
    evaluate_main(argv)
    inpainting = json.loads((out / "metrics.json").read_text())["inpainting"]
    h, w, C = pipe.latent_shape
    assert inpainting["cells"] == h * w and inpainting["kept_cells"] == h * w // 2  # the left half
    assert inpainting["settings"] == {"s4_w0_t1": {"known_bits_kept": 1.0}}
    # checked again here from the stored bits against the image's own encoding
    known, keep = pipe.inpainting_inputs(str(image), str(mask))
    kept = keep.reshape(h * w).bool()
    changed = 0
    for row in ("a", "b"):
        for i in range(3):
            bits = (out / "inpaint" / "images" / "s4_w0_t1" / row / f"{i:03d}.bits").read_bytes()
            z = torch.from_numpy(unpack_bits(np.frombuffer(bits, np.uint8)[None], (h, w, C))).reshape(h * w, C)
            assert torch.equal(z[kept].float(), known[0, kept])
            free = (out / "images" / "s4_w0_t1" / row / f"{i:03d}.bits").read_bytes()
            changed += bits != free
        assert (out / "inpaint" / "grids" / "s4_w0_t1" / f"{row}.png").is_file()
    assert changed == 6  # the same seeds as the free samples, yet other images: the known half steers them
    html = (out / "index.html").read_text()
    assert "<h2 id='inpainting'>Inpainting</h2>" in html and "known bits kept 1.000" in html
    for src in ("inpaint/input.png", "inpaint/reconstruction.png", "inpaint/mask.png",
                "inpaint/grids/s4_w0_t1/a.png", "inpaint/grids/s4_w0_t1/b.png"):
        assert f"src='{src}'" in html and (out / src).is_file()
    before = _files(out)
    evaluate_main(argv)  # a rerun of a finished evaluation writes nothing
    assert _files(out) == before


@pytest.mark.parametrize("problem", ["missing image", "not an image", "black mask", "mask alone"])
def test_bad_inpainting_input_names_the_file(tiny, tmp_path, problem):
    from PIL import Image

    model = tiny / "model-cross_attn-empty_caption"
    image, mask = _inpainting_inputs(tmp_path, 32)
    if problem == "missing image":
        image, match = tmp_path / "nowhere.png", "nowhere.png: cannot read the image"
    elif problem == "not an image":
        mask, match = _write(tmp_path / "mask.txt", "white on the right"), "mask.txt: cannot read the image"
    elif problem == "black mask":
        Image.new("L", (32, 32), 0).save(mask)
        match = "mask.png: the mask is all black"
    else:
        image, match = "", "inpainting needs both an image and a mask"
    sheet = _write(tmp_path / "s.txt", "red apple\n")
    argv = ["--model", str(model), "--prompts", str(sheet), "--out", str(tmp_path / "out"), "--steps", "2",
            "--images-per-prompt", "1", "--device", "cpu", "--inpaint-image", str(image), "--inpaint-mask", str(mask)]
    with pytest.raises(SystemExit, match=match):
        evaluate_main(argv)
    assert not (tmp_path / "out" / "images").exists()  # refused before drawing anything

