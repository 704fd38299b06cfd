"""A new run's initial weights from another run (`init` section): staged resolution, fine-tuning.

Weights only: the optimizer, schedule, sample count and data position start fresh, and once
the new run has a checkpoint of its own, its resume wins (the trainers read `init.from` only
for a fresh start). The source, `init.from`, is any of

    pipeline export     model_index.json: its denoiser/ or autoencoder/ part
    flat export         config.json + model.safetensors of a denoiser, or an autoencoder's
                        export folder (BinaryAutoencoder.save_pretrained)
    checkpoint folder   checkpoints/step_* (it has trainer.json): its EMA export, or with
                        `init.use_ema: false` the raw training weights (the denoiser's fp32
                        ZeRO partitions merged, any stage and world size; the autoencoder's states.pt)
    run folder          the checkpoint its checkpoints/latest names

Tensors are matched by name (`match_state`). Strict by default: a tensor of the new model the
source lacks, or has in another shape, is an error naming it unless `init.allow_missing`
(it keeps its fresh initialisation), and a source tensor the new model lacks is one unless
`init.allow_unexpected`. The denoiser's position table is the exception to shapes: it is
resized from the source's grid to the new one as any other grid reads it (docs/math.md (D1)),
so a 32 px model starts a 64 px run. Every rank loads the same weights into its module
before DeepSpeed or DDP wraps it, which then partitions or broadcasts them: any ZeRO stage,
any number of ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors.torch import load_file

from bld_t2i import checkpoint as files
from bld_t2i import distributed as D
from bld_t2i.config.schema import InitConfig
from bld_t2i.models.binary_ae import AEArch, BinaryAutoencoder
from bld_t2i.models.denoiser_blocks import resize_pos_embed
from bld_t2i.pretrained import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, read_json
from bld_t2i.training.checkpointer import STATES, TRAINER

Part = Literal["denoiser", "autoencoder"]
POSITION_TABLE = "pos_embed"  # the denoiser's (1, h*w, D) table, resized to the new grid
AE_SUBDIR = "autoencoder"  # a pipeline export's part and an autoencoder checkpoint's export (training/autoencoder.py)
SHOWN = 8  # key names an error or log line lists before "and N more"


class Source(NamedTuple):
    """The weights `init.from` names, read."""

    state: dict[str, torch.Tensor]
    what: str  # the file or folder they came from, and which weights, for the log and errors
    grid: tuple[int, int] | None  # the denoiser's training grid (h, w); None for an autoencoder
    encoder_of: tuple[str, ...]  # an autoencoder source's weights sha256 and its ancestry (BinaryAutoencoder.encoder_of)


class Match(NamedTuple):
    """How a source state fits a model, by name (`match_state`)."""

    state: dict[str, torch.Tensor]  # what to load: the matching tensors, the position table resized
    loaded: list[str]
    resized: list[str]  # "name (h0xw0 -> hxw)"
    missing: list[str]  # the model's tensors the source lacks
    mismatched: list[str]  # "name: source shape vs model shape"
    unexpected: list[str]  # the source's tensors the model lacks


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def match_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source_grid: tuple[int, int] | None = None,
                grid: tuple[int, int] | None = None) -> Match:
    """Match `state` to `model`'s tensors by name; the position table (1, h0*w0, D) is resized
    from `source_grid` to `grid` (docs/math.md (D1)) where both are given and differ."""
    own = model.state_dict()
    out, loaded, resized, missing, mismatched = {}, [], [], [], []
    for name, target in own.items():
        if name not in state:
            missing.append(name)
            continue
        value = state[name]
        if name == POSITION_TABLE and source_grid and grid and tuple(source_grid) != tuple(grid) \
                and value.shape[1] == source_grid[0] * source_grid[1] and value.shape[-1] == target.shape[-1]:
            value = resize_pos_embed(value, source_grid, grid)
            resized.append(f"{name} ({source_grid[0]}x{source_grid[1]} -> {grid[0]}x{grid[1]})")
        if value.shape != target.shape:
            mismatched.append(f"{name}: {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        out[name] = value.to(target.dtype)
        loaded.append(name)
    unexpected = sorted(set(state) - set(own))
    return Match(out, loaded, resized, missing, mismatched, unexpected)


def check_match(match: Match, cfg: InitConfig, what: str) -> None:
    """Raise naming the keys unless the mismatch is one `cfg` allows."""
    problems = []
    if match.missing and not cfg.allow_missing:
        problems.append(f"{len(match.missing)} tensor(s) of the new model missing from the source: {_names(match.missing)}")
    if match.mismatched and not cfg.allow_missing:
        problems.append(f"{len(match.mismatched)} of another shape (source vs new): {_names(match.mismatched)}")
    if match.unexpected and not cfg.allow_unexpected:
        problems.append(f"{len(match.unexpected)} source tensor(s) the new model lacks: {_names(match.unexpected)}")
    if problems:
        allow = " / ".join(f"init.{k}=true" for k, bad in (("allow_missing", match.missing or match.mismatched),
                                                            ("allow_unexpected", match.unexpected)) if bad)
        raise ValueError(f"init.from {what} does not fit the new model: " + "; ".join(problems)
                         + f" (set {allow} to start with a partial load)")


def describe(match: Match, what: str) -> str:
    lines = [f"[init] weights from {what}: loaded {len(match.loaded)} tensor(s)"]
    for label, keys in (("resized", match.resized), ("missing, left at their initialisation", match.missing),
                        ("of another shape, left at their initialisation", match.mismatched),
                        ("unexpected, ignored", match.unexpected)):
        if keys:
            lines.append(f"[init]   {len(keys)} {label}: {_names(keys)}")
    return "\n".join(lines)


def load_initial_weights(model: torch.nn.Module, cfg: InitConfig, part: Part,
                         grid: tuple[int, int] | None = None) -> Source:
    """Load `cfg.from_`'s weights into `model` (before DeepSpeed or DDP wraps it), checked and
    logged as the module docstring says; returns the source. `grid`: the new denoiser's grid."""
    source = read_source(cfg.from_, part, cfg.use_ema)
    load_source(model, source, cfg, grid)
    return source


def load_source(model: torch.nn.Module, source: Source, cfg: InitConfig, grid: tuple[int, int] | None = None) -> None:
    """`load_initial_weights` of a source already read."""
    match = match_state(model, source.state, source.grid, grid)
    check_match(match, cfg, source.what)
    model.load_state_dict(match.state, strict=False)
    D.print0(describe(match, source.what))


# ----------------------------------------------------------------------------- reading sources


def read_source(path: str, part: Part, use_ema: bool = True) -> Source:
    """The `part` weights of the folder `path` names (module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"init.from: {folder} is not a folder (an export, a checkpoints/step_* "
                                "folder or a run folder)")
    if (folder / "checkpoints").is_dir() and not (folder / TRAINER).is_file():
        latest = files.read_latest(folder / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"init.from: run folder {folder} has no complete checkpoint (checkpoints/latest)")
        folder = latest
    checkpoint = (folder / TRAINER).is_file()
    if not use_ema and not checkpoint:
        raise ValueError(f"init.use_ema=false needs a checkpoint folder (the raw training weights); {folder} is an "
                         "export, which holds the EMA weights only")
    if part == "autoencoder":
        return _autoencoder_source(folder, checkpoint, use_ema)
    if (folder / INDEX_FILE).is_file():
        config = read_json(folder / "denoiser" / CONFIG_FILE)
        grid = tuple(config.get("latent_shape", [0, 0])[:2])
        return Source(_safetensors(folder / "denoiser" / WEIGHTS_FILE), f"{folder} (pipeline export)", grid or None, ())
    if checkpoint and not use_ema:
        state = D.checkpoint_fp32_weights(folder)
        return Source(state, f"{folder} (raw training weights)", _flat_grid(folder, state), ())
    state = _safetensors(folder / WEIGHTS_FILE)
    kind = "EMA weights of the checkpoint" if checkpoint else "flat export"
    return Source(state, f"{folder} ({kind})", _flat_grid(folder, state), ())


def _autoencoder_source(folder: Path, checkpoint: bool, use_ema: bool) -> Source:
    if checkpoint and not use_ema:
        path = folder / STATES
        if not path.is_file():
            raise FileNotFoundError(f"init.from: {folder} is not an autoencoder checkpoint (no {STATES})")
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        return Source(state, f"{folder} (raw training weights)", None, ())
    for candidate in (folder / AE_SUBDIR, folder):  # a pipeline export or a checkpoint: its autoencoder/
        if (candidate / CONFIG_FILE).is_file() and "arch" in read_json(candidate / CONFIG_FILE):
            ae = BinaryAutoencoder.from_pretrained(candidate)
            return Source(ae.state_dict(), f"{candidate} (autoencoder export)", None, ae.legacy_fingerprints)
    raise FileNotFoundError(f"init.from: {folder} holds no autoencoder export (config.json with 'arch', "
                            f"or {AE_SUBDIR}/ with one)")


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"init.from: missing {path}")
    return load_file(str(path))


def _flat_grid(folder: Path, state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """The training grid of a flat export or checkpoint: its autoencoder's (config.json), else a
    square position table's side."""
    config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    ae_path = Path(config.get("autoencoder", {}).get("path", ""))
    if ae_path.parts and not ae_path.is_absolute() and not ae_path.exists():
        ae_path = folder / ae_path  # relative to the model folder, as pretrained.py reads it
    if ae_path.parts and (ae_path / CONFIG_FILE).is_file():
        arch = read_json(ae_path / CONFIG_FILE)["arch"]
        grid = AEArch(**{**arch, "mults": tuple(arch["mults"])}).grid
        return grid, grid
    if POSITION_TABLE in state:
        side = math.isqrt(state[POSITION_TABLE].shape[1])
        if side * side == state[POSITION_TABLE].shape[1]:
            return side, side
    return None
