"""Exported model folders: the pipeline layout that `BLDPipeline.save_pretrained` writes, and
the flat one older exports have. `load_pretrained` reads either.

The pipeline layout (format 2), like diffusers' (https://huggingface.co/docs/diffusers), with
every path relative to the folder, so a folder moved or copied anywhere loads:

    model_index.json            {"_class_name": "BLDPipeline", "_bld_t2i_version", "format": 2,
                                 "name": run.name, and each part: [library, class]}
    denoiser/config.json        the DenoiserConfig fields, "latent_shape" [h, w, C], "text_dim"
    denoiser/model.safetensors  the (EMA) denoiser weights
    autoencoder/                exactly what `BinaryAutoencoder.save_pretrained` writes
                                (config.json, model.safetensors, fingerprint)
    text_encoder/config.json    the TextEncoderConfig: a reference, how to build the frozen
                                encoder for new prompts (kind, name or checkpoint, max_length),
                                also for models trained on pre-computed embeddings; its
                                `name` / `checkpoint` are read as written (a hub id, or a path)
    scheduler/config.json       the diffusion section: T, schedule, sample_steps, temperature,
                                guidance w, guidance_interval (and the training loss fields)

The flat layout (format 1): `config.json` (the resolved Config) and `model.safetensors` (the
EMA denoiser); `autoencoder.path` names the autoencoder folder, absolute, relative to the
working directory, or else relative to the model folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import bld_t2i
from bld_t2i.checkpoint import atomic_save_safetensors, atomic_write_text, save_folder
from bld_t2i.config import Config, ConfigError, from_dict
from bld_t2i.models.binary_ae import BinaryAutoencoder, check_state_dict
from bld_t2i.models.denoiser import TEXT_MODES, Denoiser
from bld_t2i.models.text_encoders import build_text_encoder

FORMAT = 2
INDEX_FILE = "model_index.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# part (its sub-folder) -> [library, class] in model_index.json; informative, checked on load
PARTS = {"denoiser": ["bld_t2i", "Denoiser"], "autoencoder": ["bld_t2i", "BinaryAutoencoder"],
         "text_encoder": ["bld_t2i", "TextEncoderConfig"], "scheduler": ["bld_t2i", "DiffusionConfig"]}


class PretrainedParts(NamedTuple):
    cfg: Config  # run.name, autoencoder.path, diffusion, denoiser and text_encoder as exported
    denoiser: Denoiser  # on the CPU, fp32, weights loaded
    autoencoder: BinaryAutoencoder
    text_encoder: object | None  # None for class and unconditional models


def _json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_pretrained(folder: str | Path, cfg: Config, denoiser_state: dict[str, torch.Tensor],
                     autoencoder: BinaryAutoencoder | str | Path, text_dim: int = 0) -> Path:
    """Write the pipeline layout (module docstring) to `folder` from its parts, atomically: it
    is built in `<folder>.tmp` and renamed into place, replacing `folder` as a whole.

    cfg: its run.name, denoiser, text_encoder and diffusion sections are written.
    denoiser_state: the denoiser's state dict (the trainer passes its EMA weights); it must
      fit `Denoiser(cfg.denoiser, autoencoder.latent_shape, text_dim)` exactly (ValueError).
    autoencoder: a model, or the folder of an exported one (loaded, so its fingerprint is checked).
    text_dim: the text condition's width the denoiser was trained on (0 for class and
      unconditional models).
    Returns the folder.
    """
    folder = Path(folder)
    ae = autoencoder if isinstance(autoencoder, BinaryAutoencoder) else BinaryAutoencoder.from_pretrained(autoencoder)
    with torch.device("meta"):  # shapes only: no memory, no init
        shapes = Denoiser(cfg.denoiser, ae.latent_shape, text_dim)
    check_state_dict(shapes, denoiser_state, "denoiser_state")
    index = {"_class_name": "BLDPipeline", "_bld_t2i_version": bld_t2i.__version__, "format": FORMAT,
             "name": cfg.run.name, **PARTS}
    denoiser_config = {**dataclasses.asdict(cfg.denoiser), "latent_shape": list(ae.latent_shape), "text_dim": text_dim}

    def write(tmp: Path) -> None:
        for part in PARTS:
            (tmp / part).mkdir()
        atomic_save_safetensors(denoiser_state, tmp / "denoiser" / WEIGHTS_FILE)
        atomic_write_text(tmp / "denoiser" / CONFIG_FILE, _json(denoiser_config))
        atomic_write_text(tmp / "text_encoder" / CONFIG_FILE, _json(dataclasses.asdict(cfg.text_encoder)))
        atomic_write_text(tmp / "scheduler" / CONFIG_FILE, _json(dataclasses.asdict(cfg.diffusion)))
        ae.save_pretrained(tmp / "autoencoder")
        atomic_write_text(tmp / INDEX_FILE, _json(index))  # last: a folder with an index is complete

    return save_folder(folder.parent, folder.name, write, point_latest=False)


def load_pretrained(folder: str | Path, device: torch.device) -> PretrainedParts:
    """The parts of an exported model, the pipeline layout when `model_index.json` is there,
    else the flat one. The text encoder is built on `device`; the rest is on the CPU."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        return _load_index(folder, device)
    return _load_flat(folder, device)


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's file; a clear error naming it otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"exported model is missing {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _section(name: str, data: dict, path: Path):
    """One config section from a part's config.json; unknown keys and bad values name the file."""
    try:
        return getattr(from_dict({name: data}), name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _load_index(folder: Path, device: torch.device) -> PretrainedParts:
    index_path = folder / INDEX_FILE
    index = read_json(index_path)
    if index.get("_class_name") != "BLDPipeline" or index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: expected _class_name 'BLDPipeline' and format {FORMAT}, got "
                         f"{index.get('_class_name')!r} and {index.get('format')!r}")
    for part, kind in PARTS.items():
        if index.get(part) != kind:
            raise ValueError(f"{index_path}: part '{part}' must be {kind}, got {index.get(part)!r}")
    den_path = folder / "denoiser" / CONFIG_FILE
    den = read_json(den_path)
    missing = [k for k in ("latent_shape", "text_dim") if k not in den]
    if missing:
        raise ValueError(f"{den_path}: missing field(s) {missing}")
    latent_shape, text_dim = den.pop("latent_shape"), den.pop("text_dim")
    if not (isinstance(latent_shape, list) and len(latent_shape) == 3 and all(isinstance(n, int) for n in latent_shape)):
        raise ValueError(f"{den_path}: latent_shape must be [h, w, C] integers, got {latent_shape!r}")
    if not isinstance(text_dim, int) or isinstance(text_dim, bool) or text_dim < 0:
        raise ValueError(f"{den_path}: text_dim must be an integer >= 0, got {text_dim!r}")
    latent_shape = tuple(latent_shape)
    cfg = Config()
    cfg.run.name = str(index.get("name", cfg.run.name))
    cfg.denoiser = _section("denoiser", den, den_path)
    te_path, sched_path = folder / "text_encoder" / CONFIG_FILE, folder / "scheduler" / CONFIG_FILE
    cfg.text_encoder = _section("text_encoder", read_json(te_path), te_path)
    cfg.diffusion = _section("diffusion", read_json(sched_path), sched_path)
    cfg.autoencoder.path = str(folder / "autoencoder")
    autoencoder = BinaryAutoencoder.from_pretrained(cfg.autoencoder.path)
    if latent_shape != autoencoder.latent_shape:
        raise ValueError(f"{den_path}: latent_shape {list(latent_shape)} differs from the autoencoder's "
                         f"{list(autoencoder.latent_shape)}")
    text_encoder = _text_encoder(cfg, te_path, device, text_dim)
    denoiser = _denoiser(cfg, latent_shape, text_dim, folder / "denoiser" / WEIGHTS_FILE)
    return PretrainedParts(cfg, denoiser, autoencoder, text_encoder)


def _load_flat(folder: Path, device: torch.device) -> PretrainedParts:
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"exported model is missing {path} (and has no {INDEX_FILE})")
    try:
        cfg = from_dict(read_json(config_path))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    if not cfg.autoencoder.path:
        raise ValueError(f"{config_path}: autoencoder.path is empty; it must name the exported autoencoder folder")
    ae_path = Path(cfg.autoencoder.path)
    if not ae_path.is_absolute() and not ae_path.exists():
        ae_path = folder / ae_path  # a path relative to the model folder
    autoencoder = BinaryAutoencoder.from_pretrained(ae_path)
    text_encoder = _text_encoder(cfg, config_path, device, None)
    text_dim = text_encoder.dim if text_encoder is not None else 0
    return PretrainedParts(cfg, _denoiser(cfg, autoencoder.latent_shape, text_dim, weights_path), autoencoder,
                           text_encoder)


def _text_encoder(cfg: Config, where: Path, device: torch.device, text_dim: int | None):
    """The encoder for new prompts (None unless the denoiser is text-conditioned); its width
    must be `text_dim` when given."""
    if cfg.denoiser.conditioning not in TEXT_MODES:
        return None
    if cfg.text_encoder.kind == "none":
        raise ValueError(f"{where}: denoiser.conditioning '{cfg.denoiser.conditioning}' needs a text encoder for "
                         "new prompts, but text_encoder.kind is 'none'")
    encoder = build_text_encoder(cfg.text_encoder, device)
    if text_dim is not None and encoder.dim != text_dim:
        raise ValueError(f"{where}: this text encoder is {encoder.dim} wide, but the denoiser was trained on "
                         f"text_dim {text_dim}")
    return encoder


def _denoiser(cfg: Config, latent_shape: tuple[int, int, int], text_dim: int, weights_path: Path) -> Denoiser:
    """The denoiser of a folder, its config checked against the weights file's header (shapes
    only, on the meta device) before anything is allocated: a config that does not fit its
    weights (a hand edit, a hostile folder asking for a huge model) is an error naming them."""
    if not weights_path.is_file():
        raise FileNotFoundError(f"exported model is missing {weights_path}")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        with torch.device("meta"):
            shapes = Denoiser(cfg.denoiser, latent_shape, text_dim)
        check_state_dict(shapes, header, weights_path)
        denoiser = Denoiser(cfg.denoiser, latent_shape, text_dim)
        state = load_file(str(weights_path))
    except SafetensorError as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    denoiser.load_state_dict(state, strict=True)
    return denoiser
