"""The denoiser's task for the training loop: Bernoulli diffusion on pre-encoded latents
under DeepSpeed ZeRO, with caption dropout for classifier-free guidance.

A micro-step draws t, the noise and the caption dropout from its step generator, computes
the loss of docs/math.md (eq. 5, or the authors' eq. 6) and hands it to the engine, which
accumulates `grad_accum` micro-steps and skips an update whose gradient norm is not finite.
"""

from __future__ import annotations

import posixpath
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from bld_t2i import checkpoint as files
from bld_t2i import distributed as D
from bld_t2i.config import Config, save_config
from bld_t2i.data.latents import latent_loader, null_embedding, read_manifest, unpack_bits_tensor
from bld_t2i.data.shards import expand_urls
from bld_t2i.diffusion import diffusion_loss, keep_factors
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.conditioning import drop_condition
from bld_t2i.models.denoiser import TEXT_MODES, Denoiser
from bld_t2i.models.text_encoders import build_text_encoder, condition_from_embeddings
from bld_t2i.training.checkpointer import Checkpointer
from bld_t2i.training.ema import EMA
from bld_t2i.training.init_from import load_initial_weights
from bld_t2i.training.loop import Parts
from bld_t2i.training.validation import denoiser_val_loss, read_heldout_latents
from bld_t2i.utils import DTYPES

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU
TIME_BUCKETS = 4  # the loss is also logged per quarter of t/T
SECTIONS = ("run", "latents", "autoencoder", "diffusion", "denoiser", "text_encoder", "optim", "train", "init", "val",
            "log")


class ExpectedLatents(NamedTuple):
    """What the latent shards must have been encoded with (data/latents.py `check_manifests`)."""

    fingerprint: str
    latent_shape: tuple[int, int, int]
    legacy_fingerprints: tuple[str, ...]  # what manifests of versions 1-2 name for the same encoder


def expected_latents(cfg: Config) -> ExpectedLatents:
    """The autoencoder's fingerprints and latent shape that the latent shards must have."""
    if cfg.autoencoder.path:
        ae = BinaryAutoencoder.from_pretrained(cfg.autoencoder.path)
        return ExpectedLatents(ae.fingerprint, ae.latent_shape, ae.legacy_fingerprints)
    # No autoencoder named (synthetic latents): take the data set's word for it, and say so.
    manifest = read_manifest(posixpath.dirname(expand_urls(cfg.latents.shards)[0]))
    D.print0("[train] autoencoder.path is empty: latents are not checked against an autoencoder, "
             "and no sample grids can be decoded")
    fingerprint = manifest["autoencoder_fingerprint"]
    return ExpectedLatents(fingerprint, tuple(manifest["latent_shape"]), (fingerprint,))


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None  # unknown peak: MFU is not reported rather than guessed
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def optimizer_for(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and the learned null condition."""
    def decays(n: str, p: torch.nn.Parameter) -> bool:
        return p.dim() >= 2 and "embed" not in n and "null" not in n

    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def null_condition_text(text_encoder, null_emb: torch.Tensor | None, device: torch.device) -> dict | None:
    """The empty caption's condition for caption dropout: encoded, or the data set's stored one."""
    if text_encoder is not None:
        return text_encoder.encode([""])
    if null_emb is not None:
        mask = torch.ones(1, null_emb.shape[0], dtype=torch.bool, device=device)
        return condition_from_embeddings(null_emb[None].to(device), mask)
    return None


class T2ITask:
    """build() and train_step() of the denoiser (text, class or unconditional)."""

    name = "train"
    sections = SECTIONS
    accumulates = True

    def micro_batch(self, cfg: Config) -> int:
        return cfg.latents.batch_size

    def build(self, cfg: Config, device: torch.device, grad_accum: int, resume_world: int | None) -> Parts:
        info = D.dist_info()
        if cfg.train.compile and cfg.train.zero_stage == 3:
            raise ValueError("train.compile needs train.zero_stage 0, 1 or 2: under ZeRO-3 the compiled forward "
                             "would trace DeepSpeed's parameter-gathering hooks; set train.compile false for ZeRO-3")
        expected = expected_latents(cfg)
        latent_shape = expected.latent_shape
        # compiled: stored text embeddings padded to max_length, so that every batch has one shape
        text_length = cfg.text_encoder.max_length if cfg.train.compile else 0
        text_encoder = None
        if cfg.denoiser.conditioning in TEXT_MODES and not cfg.latents.use_embeddings:
            text_encoder = build_text_encoder(cfg.text_encoder, device)
        # captions tokenized in the loader's workers, batches pinned for copies that don't wait
        tokenize = text_encoder.tokenize if text_encoder is not None else None
        loader = latent_loader(cfg.latents, cfg.run.seed, expected.fingerprint, latent_shape, info.rank,
                               info.world_size, legacy_fingerprints=expected.legacy_fingerprints,
                               text_length=text_length, pin_memory=device.type == "cuda", tokenize=tokenize)
        null_emb = None
        if cfg.latents.use_embeddings:
            null_emb = null_embedding(posixpath.dirname(expand_urls(cfg.latents.shards)[0]))  # (N, D)
        text_dim = null_emb.shape[-1] if null_emb is not None else (text_encoder.dim if text_encoder else 0)
        model = Denoiser(cfg.denoiser, latent_shape, text_dim).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        D.print0(f"[train] world size {info.world_size}; denoiser {cfg.denoiser.preset} "
                 f"({len(model.blocks)}x{model.width}, {n_params / 1e6:.2f}M params), "
                 f"latents {latent_shape}, ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, grad_accum {grad_accum}")
        if resume_world is None and cfg.init.from_:  # a fresh start from another run's weights
            load_initial_weights(model, cfg.init, "denoiser", grid=latent_shape[:2])
        if cfg.train.compile:
            model.compile()
        optimizer = optimizer_for(model, cfg)
        elastic = resume_world is not None and resume_world != info.world_size
        engine = D.build_engine(model, optimizer, D.deepspeed_config(
            cfg.train, cfg.latents.batch_size, grad_accum, cfg.optim.grad_clip, n_params, load_universal=elastic))
        self.attach(cfg, device, engine, null_condition_text(text_encoder, null_emb, device), text_encoder)
        self.ema = EMA(engine.module)
        self.heldout, self.val_model = None, None
        if cfg.val.shards:
            self.heldout = read_heldout_latents(cfg, expected.fingerprint, latent_shape, expected.legacy_fingerprints,
                                                tokenize)
        return Parts(loader=loader, ema=self.ema, optimizers=[(optimizer, 1.0)],
                     checkpointer=Checkpointer(cfg.run.out_dir, cfg.train.keep_checkpoints, engine=engine,
                                               universal=elastic),
                     export=self.export, export_files=("model.safetensors", "config.json"),
                     publish=self.publish if cfg.autoencoder.path else None,
                     on_sample=self.draw_grid if cfg.autoencoder.path else None, log_extra=self.log_extra,
                     validate=self.validate if self.heldout is not None else None)

    def attach(self, cfg: Config, device: torch.device, engine, null_text: dict | None, text_encoder=None,
               dtype: torch.dtype | None = None) -> None:
        """What the step needs, around an engine: `build` gives it a DeepSpeed engine, and
        bench/bench_train.py the same step around a plain torch loop. `dtype`: the weights'
        (default: train.precision's)."""
        self.cfg, self.device, self.engine, self.null_text, self.text_encoder = cfg, device, engine, null_text, text_encoder
        self.a = keep_factors(cfg.diffusion.T, cfg.diffusion.schedule).float().to(device)
        self.dtype = dtype or DTYPES[cfg.train.precision]
        module = engine.module
        self.tokens = module.latent_shape[0] * module.latent_shape[1]  # L = h * w
        cross = cfg.denoiser.conditioning == "cross_attn"
        self.flops = 3 * (module.flops_per_sample(text_len=cfg.text_encoder.max_length) if cross
                          else module.flops_per_sample())
        engine.train()

    def condition(self, batch: dict) -> dict | None:
        """The batch's condition for the denoiser (text tokens, class label or None)."""
        mode, device = self.cfg.denoiser.conditioning, self.device
        if mode == "none":
            return None
        if mode == "class":
            return {"label": batch["label"].to(device, non_blocking=True)}
        if self.cfg.latents.use_embeddings:  # pinned by the loader on CUDA: the copies don't wait
            return condition_from_embeddings(batch["emb"].to(device, non_blocking=True),
                                             batch["emb_mask"].to(device, non_blocking=True))
        return self.text_encoder.encode_tokens(batch["text_ids"], batch["text_mask"])  # tokenized by the loader

    def model_fn(self, z_t: torch.Tensor, t_in: torch.Tensor, cond: dict | None,
                 grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The engine's denoiser on (B, h*w, C) latents of `grid` (None: the training grid).
        t/T stays float32, as the sampler passes it: in bf16 only ~500 of T = 1000 values survive."""
        if cond is not None:
            cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        kwargs = {} if grid is None else {"grid": tuple(grid)}
        return self.engine(z_t.to(self.dtype), t_in.float(), cond, **kwargs).float()

    def train_step(self, parts: Parts, batch: dict, g: torch.Generator, samples: int, boundary: bool, guard):
        cfg = self.cfg
        # One grid per batch (aspect-ratio buckets); ranks may hold different grids in one step:
        # each rank's forward is its own, and only gradients of the same parameters are reduced.
        grid = batch.get("grid")
        h, w = grid if grid is not None else self.engine.module.latent_shape[:2]
        packed = batch["packed"].to(self.device, non_blocking=True)  # (B, nbytes), pinned by the loader on CUDA
        z_0 = unpack_bits_tensor(packed, (h, w, self.engine.module.latent_shape[2])).float()  # (B, h*w, C)
        null = self.engine.module.null_condition(z_0.shape[0], self.device, self.null_text)
        cond, _ = drop_condition(self.condition(batch), null, cfg.denoiser.cond_drop_prob, g)
        model_fn = self.model_fn if grid is None else partial(self.model_fn, grid=grid)
        loss, per_sample, t = diffusion_loss(model_fn, z_0, cond, self.a, cfg.diffusion.loss, cfg.diffusion.aux_weight,
                                             g, cfg.diffusion.t_power)
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step at the accumulation boundary only
        # [sum, count] of the loss per quarter of t/T, made on the device: torch.bincount would
        # read its input's range back to the host at every step
        bucket = ((t - 1) * TIME_BUCKETS // cfg.diffusion.T).clamp(max=TIME_BUCKETS - 1)
        per_bucket = torch.zeros(TIME_BUCKETS, 2, device=self.device).index_add_(
            0, bucket, torch.stack([per_sample.detach().float(), torch.ones_like(per_sample, dtype=torch.float32)], 1))
        stats = {"loss": loss.detach(), **{f"loss_t{i}": per_bucket[i] for i in range(TIME_BUCKETS)}}
        return stats, (not boundary) or self.engine.was_step_applied()

    def validate(self) -> dict:
        """The EMA weights' loss on the held-out latents (training/validation.py); a collective."""
        state = self.ema.full_state()  # a collective: every rank gets the whole EMA weights
        module = self.engine.module
        if self.val_model is None:
            self.val_model = Denoiser(self.cfg.denoiser, module.latent_shape, module.text_dim).to(self.device)
        self.val_model.load_state_dict(state)
        return denoiser_val_loss(self.val_model, self.heldout, self.condition, self.cfg, self.a, self.device)

    def log_extra(self, samples_per_s: float) -> dict:
        info, cfg = D.dist_info(), self.cfg
        grad_norm = self.engine.get_global_grad_norm()
        peak = peak_flops(self.device, cfg.train.precision)
        return {"grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": samples_per_s * self.tokens,
                "mfu": self.flops * samples_per_s / (peak * info.world_size) if peak else None,
                "peak_mem_gb": peak_memory_gb(self.device)}

    def export(self, ema_state: dict, folder: Path) -> None:
        """`model.safetensors` (EMA) + `config.json`: loadable on one process without DeepSpeed."""
        folder.mkdir(parents=True, exist_ok=True)
        files.atomic_save_safetensors(ema_state, folder / "model.safetensors")
        save_config(self.cfg, folder / "config.json", SECTIONS)

    def publish(self, checkpoint: Path, folder: Path) -> None:
        """<out>/export: the self-contained pipeline folder (bld_t2i/pretrained.py) of the newest
        checkpoint's EMA weights, with a copy of the autoencoder, loadable from any path.
        (Without an autoencoder path the checkpoint's flat export is copied instead.)"""
        from bld_t2i.pretrained import write_pretrained

        state = load_file(str(checkpoint / "model.safetensors"))
        write_pretrained(folder, self.cfg, state, self.cfg.autoencoder.path, text_dim=self.engine.module.text_dim)

    def draw_grid(self, folder: Path, logger, record: dict) -> None:
        """Samples for the recipe's fixed prompts from a checkpoint's EMA export (rank 0)."""
        from bld_t2i.pipeline import BLDPipeline

        path = Path(self.cfg.run.out_dir) / "samples" / f"{folder.name}.png"
        BLDPipeline.from_pretrained(folder).save_grid(self.cfg.train.sample_prompts, path, seed=self.cfg.run.seed)
        logger.log_image("samples", path, record["step"])
