"""Frozen text encoders: tiny random HF and OpenCLIP models built offline, the real MiniLM."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from bld_t2i.config import DenoiserConfig, TextEncoderConfig
from bld_t2i.data.latents import LatentDecoder, LatentItem
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.models.text_encoders import build_text_encoder, condition_from_embeddings, minilm_folder

CAPTIONS = ["a red apple on a table", "", "word " * 100]  # ordinary, empty, longer than max_length
N = 12


def check_condition(enc, out: dict, B: int) -> None:
    assert out["tokens"].shape == (B, N, enc.dim) and out["tokens"].dtype == torch.float32
    assert out["mask"].shape == (B, N) and out["mask"].dtype == torch.bool
    assert out["pooled"].shape == (B, enc.dim)
    lengths = out["mask"].sum(1)
    assert (lengths >= 1).all()  # even the empty caption has a token to attend to
    assert lengths[2] == N and lengths[0] < N  # truncated; padded
    assert torch.isfinite(out["tokens"]).all() and torch.isfinite(out["pooled"]).all()


@pytest.mark.parametrize("kind,name", [("hf", "bert"), ("hf", "t5"), ("hf", "clip"), ("open_clip", "")])
def test_tiny_random_encoders(kind, name):
    cfg = TextEncoderConfig(kind=kind, name=name, random_init=True, max_length=N)
    enc = build_text_encoder(cfg, "cpu")
    out = enc.encode(CAPTIONS)
    check_condition(enc, out, len(CAPTIONS))
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    # Padding does not leak: a caption encodes the same alone and next to a longer one.
    alone = enc.encode(CAPTIONS[:1])
    L = int(alone["mask"].sum())
    torch.testing.assert_close(alone["tokens"][0, :L], out["tokens"][0, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["pooled"][0], out["pooled"][0], atol=1e-5, rtol=1e-5)
    # Every rank builds the same random encoder.
    torch.testing.assert_close(build_text_encoder(cfg, "cpu").encode(CAPTIONS[:1]), alone)


def test_hf_encoder_from_a_local_folder(tmp_path):
    """The non-random path: AutoConfig -> CLIPTextModel from a saved folder, pooled = pooler output."""
    tiny = build_text_encoder(TextEncoderConfig(kind="hf", name="clip", random_init=True, max_length=N), "cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenize.tokenizer.save_pretrained(tmp_path)
    enc = build_text_encoder(TextEncoderConfig(kind="hf", name=str(tmp_path), max_length=N), "cpu")
    assert type(enc.model).__name__ == "CLIPTextModel"
    torch.testing.assert_close(enc.encode(CAPTIONS), tiny.encode(CAPTIONS))


def test_open_clip_encoder_from_an_architecture_and_checkpoint(tmp_path):
    """create_model(name, pretrained=<local file>) path; pooled equals OpenCLIP's encode_text."""
    import json

    import open_clip

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
        "text_cfg": {"width": 32, "heads": 2, "layers": 2},
    }
    (tmp_path / "bld-test-tiny-clip.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "bld-test-tiny-clip.json")
    reference = open_clip.create_model("bld-test-tiny-clip").eval()
    torch.save(reference.state_dict(), tmp_path / "tiny.pt")
    cfg = TextEncoderConfig(kind="open_clip", name="bld-test-tiny-clip", checkpoint=str(tmp_path / "tiny.pt"), max_length=N)
    enc = build_text_encoder(cfg, "cpu")
    out = enc.encode(CAPTIONS)
    check_condition(enc, out, len(CAPTIONS))
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer("bld-test-tiny-clip")(CAPTIONS))
    torch.testing.assert_close(out["pooled"], expected)


def test_minilm_gives_sensible_embeddings(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (minilm_folder() / "model.safetensors").is_file()
    enc = build_text_encoder(TextEncoderConfig(kind="hf", name="minilm", max_length=N), "cpu")
    assert enc.dim == 384
    out = enc.encode(["red apple", "an apple", "a car"])
    check = F.normalize(out["pooled"], dim=-1)
    sim = check @ check.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim  # "red apple" is nearer "an apple" than "a car"


def test_encoder_output_conditions_the_denoiser():
    """End to end: captions -> encoder -> caption dropout with the empty caption -> denoiser."""
    enc = build_text_encoder(TextEncoderConfig(kind="hf", name="bert", random_init=True, max_length=N), "cpu")
    model = Denoiser(DenoiserConfig(preset="tiny"), (4, 4, 8), text_dim=enc.dim)
    cond = enc.encode(CAPTIONS)
    null = model.null_condition(3, "cpu", empty_caption=enc.encode([""]))
    cond, dropped = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(0))
    out = model(torch.zeros(3, 16, 8), torch.rand(3), cond)
    assert out.shape == (3, 16, 8)


def test_condition_from_precomputed_embeddings():
    emb = torch.randn(2, 4, 6).half()
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    cond = condition_from_embeddings(emb, mask)
    assert cond["tokens"].dtype == torch.float32 and cond["mask"].dtype == torch.bool
    torch.testing.assert_close(cond["pooled"][0], emb[0, :2].float().mean(0))
    torch.testing.assert_close(cond["pooled"][1], emb[1].float().mean(0))


def test_kinds_and_errors(tmp_path):
    assert build_text_encoder(TextEncoderConfig(kind="none"), "cpu") is None
    with pytest.raises(ValueError, match="text_encoder.kind"):
        build_text_encoder(TextEncoderConfig(kind="sentencepiece"), "cpu")
    with pytest.raises(ValueError, match="text_encoder.name"):
        build_text_encoder(TextEncoderConfig(kind="hf", name="gpt9", random_init=True), "cpu")
    with pytest.raises(FileNotFoundError, match="text_encoder.checkpoint"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", name="ViT-B-32", checkpoint=str(tmp_path / "x.pt")), "cpu")
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", name="ViT-Q-99"), "cpu")
    with pytest.raises(ValueError, match="text_encoder.max_length"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", random_init=True, max_length=100), "cpu")
    with pytest.raises(ValueError, match="text_encoder.max_length"):
        build_text_encoder(TextEncoderConfig(kind="hf", name="minilm", max_length=100_000), "cpu")
    with pytest.raises(OSError, match="text_encoder.name"):
        build_text_encoder(TextEncoderConfig(kind="hf", name=str(tmp_path / "missing")), "cpu")


@pytest.mark.parametrize("kind,name", [("hf", "bert"), ("open_clip", "")])
def test_the_loader_workers_tokenize_and_the_trainer_encodes_the_ids(kind, name):
    """`tokenize` crosses into the loader's worker processes (pickled) and its ids, through the
    latent loader's collate, encode to what `encode` gives for the captions."""
    enc = build_text_encoder(TextEncoderConfig(kind=kind, name=name, random_init=True, max_length=8), "cpu")
    captions = ["a red apple", "", "a much longer caption about a cat on a mat, in the sun"]
    tokenize = pickle.loads(pickle.dumps(enc.tokenize))
    items = [LatentItem(bytes(2), c, f"k{i}", -1, {}, (2, 2), None) for i, c in enumerate(captions)]
    decoder = LatentDecoder((2, 2, 4), {(2, 2)}, None, tokenize=tokenize)
    batch = decoder.finish(decoder.collate(items))
    assert batch["text_ids"].dtype == torch.int64 and batch["text_mask"].dtype == torch.bool
    got, want = enc.encode_tokens(batch["text_ids"], batch["text_mask"]), enc.encode(captions)
    for k in want:
        assert torch.equal(got[k], want[k]), k
