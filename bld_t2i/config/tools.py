"""The sections of the tools around training (shard making, encoding, sampling, evaluation)
and the whole tree, `Config`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from bld_t2i.config import schema
from bld_t2i.config.types import ConfigError, _Section


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
    # aspect-ratio buckets, "HxW" in pixels (multiples of the autoencoder's factor, about one
    # pixel budget): each image goes to the bucket nearest its aspect ratio; empty: square
    buckets: list[str] = field(default_factory=list)
    min_size: int = 8  # smaller source images are skipped as tiny
    device: Literal["auto", "cpu", "cuda"] = "auto"
    array_index: int = -1  # this SLURM array task; -1: SLURM_ARRAY_TASK_ID (or 0)
    array_count: int = 0  # array tasks in all; 0: SLURM_ARRAY_TASK_COUNT (or 1)


@dataclass
class SampleConfig(_Section):
    """python -m bld_t2i.cli.sample: images from an exported model. Sampler settings left at
    None/empty take the model's own config.diffusion."""

    _name = "sample"
    model: str = ""  # exported model folder
    out: str = ""  # output folder
    prompt: str = ""  # text-conditioned models
    class_label: int | None = None  # class-conditional models
    num_images: int = 4
    steps: int | None = None  # None: the model's diffusion.sample_steps
    temperature: float | None = None  # tau; None: the model's diffusion.temperature
    guidance: float | None = None  # w; None: the model's diffusion.guidance
    guidance_interval: list[float] | None = None  # [lo, hi]; None: the model's
    seed: int = 0  # image i is drawn from seed + i alone
    batch_size: int = 0  # images per batch; 0: 32 on a CPU, 64 on a GPU
    init_image: str = ""  # inpainting: the image, with mask (white = regenerate)
    mask: str = ""
    inpaint: Literal["clamp", "renoise"] = "clamp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    # torch.compile the denoiser (CUDA graphs on a GPU); every batch is padded to batch_size images
    # and guided at every step, so that one graph shape serves the whole call
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt and self.class_label is not None:
            raise ConfigError("'sample.prompt' and 'sample.class_label' exclude each other: give one")
        if bool(self.init_image) != bool(self.mask):
            raise ConfigError("'sample.init_image' and 'sample.mask' go together (--init-image with --mask)")


@dataclass
class EvaluateConfig(_Section):
    """python -m bld_t2i.cli.evaluate: a prompt sheet swept over sampler settings, with a report.
    Empty sweeps take the model's own config.diffusion."""

    _name = "evaluate"
    model: str = ""  # exported model folder
    prompts: str = ""  # prompt sheet: .txt, .csv, .tsv or .jsonl
    out: str = ""  # output folder (reruns resume in it)
    steps: list[int] = field(default_factory=list)
    guidance: list[float] = field(default_factory=list)  # w values
    temperature: list[float] = field(default_factory=list)
    guidance_interval: list[list[float]] = field(default_factory=list)  # [[lo, hi], ...]: guidance for t/T in them
    images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 0  # images per sampling batch; 0: 32 on a CPU, 64 on a GPU
    clip_model: str = ""  # OpenCLIP architecture (with clip_checkpoint) or local-dir:FOLDER; empty: no CLIP score
    clip_checkpoint: str = ""
    inception: str = ""  # local torch-fidelity InceptionV3 weights; empty: no FID/KID
    reference: str = ""  # reference image shards for FID/KID
    reference_limit: int = 10_000  # reference images read at most
    fid_features: Literal[64, 192, 768, 2048] = 2048  # Inception layer; 2048 is the standard FID
    # latent data set folder: nearest training samples, caption recall@1/@10 and the data's per-bit statistics
    neighbours: str = ""
    neighbours_k: int = 10
    neighbours_clip: bool = False  # also search in CLIP image space (decodes every training latent once, cached)
    classifier: str = ""  # class-conditional models: classifier folder (bld_t2i.cli.train_classifier) for accuracy
    cache_dir: str = ""  # reference features and CLIP features of training latents; empty: $XDG_CACHE_HOME/bld_t2i
    cache: Literal["use", "refresh", "off"] = "use"  # use: reuse and keep; refresh: recompute and keep; off: neither
    inpaint_image: str = ""  # inpaint it for every prompt and setting (with inpaint_mask, white = regenerate)
    inpaint_mask: str = ""
    wandb: bool = False  # log grids and the metrics table (the log section's mode, else $WANDB_MODE)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images_per_prompt < 1:
            raise ConfigError(f"'evaluate.images_per_prompt' must be >= 1, got {self.images_per_prompt}")
        if self.batch_size < 0:
            raise ConfigError(f"'evaluate.batch_size' must be >= 0, got {self.batch_size}")


@dataclass
class ClassifierConfig(_Section):
    """python -m bld_t2i.cli.train_classifier: a small CNN on labelled image shards, for the
    evaluation's class accuracy (evaluate.classifier)."""

    _name = "classifier"
    shards: str = ""  # labelled image shards (the .json "label"), brace/glob-expanded
    heldout: str = ""  # held-out image shards for the reported accuracy; empty: a random 1 in heldout_every of `shards`
    heldout_every: int = 10
    heldout_limit: int = 0  # held-out images read at most (0: all)
    out: str = ""  # classifier folder: model.safetensors + config.json
    resolution: int = 32  # images are centre-cropped and resized to it
    limit: int = 0  # training images read at most (0: all)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1.0e-2  # peak of the one-cycle schedule
    width: int = 32  # channels of the first stage (then 2x, 4x)
    flip: bool = False  # random horizontal flips (for mirror-symmetric classes, e.g. garments)
    autoencoder: str = ""  # exported autoencoder: held-out accuracy also on its reconstructions
    reconstructions: float = 0.0  # with autoencoder: probability that a training draw is the image's reconstruction
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("heldout_every", "resolution", "epochs", "batch_size", "width"):
            if getattr(self, name) < (2 if name == "heldout_every" else 1):
                raise ConfigError(f"'classifier.{name}' is too small: {getattr(self, name)}")
        if not 0 <= self.reconstructions <= 1 or (self.reconstructions and not self.autoencoder):
            raise ConfigError(f"'classifier.reconstructions' must be in [0, 1] and needs classifier.autoencoder, "
                              f"got {self.reconstructions} with autoencoder {self.autoencoder!r}")


@dataclass
class Config:
    run: schema.RunConfig = field(default_factory=schema.RunConfig)
    data: schema.DataConfig = field(default_factory=schema.DataConfig)
    latents: schema.LatentsConfig = field(default_factory=schema.LatentsConfig)
    autoencoder: schema.AutoencoderConfig = field(default_factory=schema.AutoencoderConfig)
    ae_loss: schema.AELossConfig = field(default_factory=schema.AELossConfig)
    diffusion: schema.DiffusionConfig = field(default_factory=schema.DiffusionConfig)
    denoiser: schema.DenoiserConfig = field(default_factory=schema.DenoiserConfig)
    text_encoder: schema.TextEncoderConfig = field(default_factory=schema.TextEncoderConfig)
    optim: schema.OptimConfig = field(default_factory=schema.OptimConfig)
    train: schema.TrainConfig = field(default_factory=schema.TrainConfig)
    init: schema.InitConfig = field(default_factory=schema.InitConfig)
    val: schema.ValConfig = field(default_factory=schema.ValConfig)
    log: schema.LogConfig = field(default_factory=schema.LogConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


