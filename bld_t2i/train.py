"""Train a Bernoulli diffusion denoiser on pre-encoded latents under DeepSpeed ZeRO.

    python -m bld_t2i.train --recipe recipes/<name>.yaml [section.key=value ...]
    torchrun --nproc_per_node=N -m bld_t2i.train ...   |   srun ... (see slurm/train_t2i.sh)

Progress is counted in samples seen. Rerunning the same command resumes from the latest
checkpoint in `run.out_dir`, exactly: the data position, the optimizer and EMA states are
restored and every random draw comes from a generator seeded by (seed, rank, step).
SIGUSR1/SIGTERM (SLURM preemption) save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import posixpath
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, config_from_cli, save_config, to_dict
from .diffusion import diffusion_loss, keep_factors
from .models.conditioning import drop_condition
from .models.denoiser import Denoiser
from .models.text_encoders import build_text_encoder, condition_from_embeddings
from .data.latents import latent_loader, null_embedding, read_manifest
from .data.shards import expand_urls
from .models.binary_ae import BinaryAutoencoder
from .tracking import StatsLogger
from .train_ae import lr_at  # one warm-up + decay schedule for both trainers

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU
TIME_BUCKETS = 4
EXPORT_FILES = ("model.safetensors", "config.json")  # loss is also logged per quarter of t/T

# ----------------------------------------------------------------------------- helpers


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Every draw of one step (t, noise, caption dropout) from (seed, rank, step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return g


class ShardedEMA:
    """EMA of the weights that works under ZeRO-3: each rank averages only the partition of
    every parameter it holds (the whole parameter under ZeRO 0-2), in fp32."""

    def __init__(self, model: torch.nn.Module):
        self.named = list(model.named_parameters())
        self.shadow = [D.local_shard(p).detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for e, (_, p) in zip(self.shadow, self.named):
            e.lerp_(D.local_shard(p).float(), 1.0 - decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The consolidated EMA weights (a collective under ZeRO-3)."""
        return {n: D.full_from_shards(e, p).cpu() for e, (n, p) in zip(self.shadow, self.named)}

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for e, (n, p) in zip(self.shadow, self.named):
            e.copy_(D.shard_from_full(state[n].to(e.device, e.dtype), p))


def expected_latents(cfg: Config) -> tuple[str, tuple[int, int, int]]:
    """The autoencoder fingerprint and latent shape the latent shards must have."""
    if cfg.autoencoder.path:
        ae = BinaryAutoencoder.from_pretrained(cfg.autoencoder.path)
        return ae.fingerprint, ae.latent_shape
    # No autoencoder named (synthetic latents): take the data set's word for it, and say so.
    manifest = read_manifest(posixpath.dirname(expand_urls(cfg.latents.shards)[0]))
    D.print0("[train] autoencoder.path is empty: latents are not checked against an autoencoder, "
             "and no sample grids can be decoded")
    return manifest["autoencoder_fingerprint"], tuple(manifest["latent_shape"])


def make_condition(batch: dict, cfg: Config, text_encoder, device: torch.device):
    """The batch's condition for the denoiser (text tokens, class label or None)."""
    mode = cfg.denoiser.conditioning
    if mode == "none":
        return None
    if mode == "class":
        return {"label": batch["label"].to(device)}
    if cfg.latents.use_embeddings:
        return condition_from_embeddings(batch["emb"].to(device), batch["emb_mask"].to(device))
    return text_encoder.encode(batch["caption"])


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


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, ema: ShardedEMA, cfg: Config, state: dict, loader, out: Path) -> Path:
    """A collective: every rank writes its engine shard; rank 0 adds the consolidated EMA
    export and publishes the folder atomically (shared filesystem assumed, as on clusters)."""
    info = D.dist_info()
    ckpt_dir = out / "checkpoints"
    tag = ckpt.step_tag(state["step"])
    client = {
        "trainer": state,  # one key: DeepSpeed reserves names like "skipped_steps" at the top level
        "loader": D.all_gather_objects(loader.state_dict()),
        "rng": D.all_gather_objects({"torch": torch.get_rng_state()}),
        "config": to_dict(cfg),
    }
    engine.save_checkpoint(str(ckpt_dir), tag=f"{tag}.tmp", client_state=client, save_latest=False)
    ema_state = ema.full_state()
    D.barrier()
    if info.is_main:
        tmp = ckpt_dir / f"{tag}.tmp"
        export_model(ema_state, cfg, tmp)
        ckpt.publish(tmp, ckpt_dir / tag)
        ckpt.rotate(ckpt_dir, cfg.train.keep_checkpoints)
    D.barrier()
    return ckpt_dir / tag


def export_model(ema_state: dict, cfg: Config, folder: Path) -> None:
    """`model.safetensors` (EMA) + `config.json`: loadable on one process without DeepSpeed."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_save_safetensors(ema_state, folder / "model.safetensors")
    save_config(cfg, folder / "config.json")


def load_checkpoint(engine, ema: ShardedEMA, loader, out: Path) -> dict | None:
    from safetensors.torch import load_file

    ckpt_dir = out / "checkpoints"
    if D.dist_info().is_main:
        ckpt.remove_partial(ckpt_dir)
    D.barrier()
    folder = ckpt.read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    if folder is None:
        return None
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=folder.name, load_lr_scheduler_states=False)
    if client is None:
        raise RuntimeError(f"checkpoint {folder} could not be loaded by DeepSpeed")
    rank = D.dist_info().rank
    if len(client["loader"]) != D.dist_info().world_size:
        raise RuntimeError(f"checkpoint {folder} was written by {len(client['loader'])} ranks; this job has {D.dist_info().world_size}")
    loader.load_state_dict(client["loader"][rank])
    torch.set_rng_state(client["rng"][rank]["torch"])
    ema.load_full_state(load_file(str(folder / "model.safetensors")))
    return client


def draw_sample_grid(folder: Path, cfg: Config, path: Path, logger, step: int) -> None:
    """Samples for the recipe's fixed prompts from a checkpoint's EMA export (rank 0 only)."""
    if not cfg.autoencoder.path:
        return
    from .pipeline import BLDPipeline

    pipe = BLDPipeline.from_pretrained(folder)
    pipe.save_grid(cfg.train.sample_prompts, path, seed=cfg.run.seed)
    if logger:
        logger.log_image("samples", path, step)


# ----------------------------------------------------------------------------- training


def train(cfg: Config) -> Path:
    device = D.pick_device(cfg.train.device)
    info = D.init(device)
    out = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed + info.rank)
    D.install_stop_handlers()

    fingerprint, latent_shape = expected_latents(cfg)
    loader = latent_loader(cfg.latents, cfg.run.seed, fingerprint, latent_shape, info.rank, info.world_size)
    text_encoder = None
    if cfg.denoiser.conditioning in ("cross_attn", "pooled_token") and not cfg.latents.use_embeddings:
        text_encoder = build_text_encoder(cfg.text_encoder, device)
    latent_folder = posixpath.dirname(expand_urls(cfg.latents.shards)[0])
    null_emb = null_embedding(latent_folder) if cfg.latents.use_embeddings else None  # (N, D)
    text_dim = null_emb.shape[-1] if null_emb is not None else (text_encoder.dim if text_encoder else 0)
    model = Denoiser(cfg.denoiser, latent_shape, text_dim).to(device)
    D.print0(f"[train] world size {info.world_size}; denoiser {cfg.denoiser.preset} "
             f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), latents {latent_shape}, "
             f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}")
    print(f"[train] rank {info.rank}/{info.world_size} (local {info.local_rank}) on {device}", flush=True)
    flops = 3 * model.flops_per_sample(text_len=cfg.text_encoder.max_length) if cfg.denoiser.conditioning == "cross_attn" \
        else 3 * model.flops_per_sample()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and "null" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n and "null" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
    )
    B = cfg.latents.batch_size
    engine = D.build_engine(model, optimizer, D.deepspeed_config(
        cfg.train.zero_stage, B, cfg.train.grad_accum, cfg.optim.grad_clip, cfg.train.precision))
    ema = ShardedEMA(engine.module)

    state = {"step": 0, "samples": 0, "skipped_steps": 0, "run_id": uuid.uuid4().hex[:12]}
    client = load_checkpoint(engine, ema, loader, out)
    if client is not None:
        state = dict(client["trainer"])
        D.print0(f"[train] resumed from step {state['step']} ({state['samples']} samples)")
    state["run_id"] = D.broadcast_object(state["run_id"])
    logger = StatsLogger(out, cfg, cfg.log, state["run_id"], resume_samples=state["samples"]) if info.is_main else None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")

    a = keep_factors(cfg.diffusion.T, cfg.diffusion.schedule).float().to(device)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if text_encoder is not None:
        null_text = text_encoder.encode([""])
    elif null_emb is not None:
        null_text = condition_from_embeddings(null_emb[None].to(device), torch.ones(1, null_emb.shape[0], dtype=torch.bool, device=device))
    else:
        null_text = None

    def model_fn(z_t, t_in, cond):
        cond = None if cond is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return engine(z_t.to(dtype), t_in.to(dtype), cond).float()

    samples_per_step = B * info.world_size
    acc = torch.zeros(4 + 2 * TIME_BUCKETS, device=device)  # loss sum, n, data s, step s, bucket sums/counts
    last_log, last_ckpt, last_grid, t_log = state["samples"], state["samples"], state["samples"], time.time()
    engine.train()
    data_iter = iter(loader)
    stop = False
    while state["samples"] < cfg.train.total_samples and not (cfg.train.max_steps and state["step"] >= cfg.train.max_steps):
        t0 = time.time()
        batch = next(data_iter)
        t1 = time.time()
        g = step_generator(cfg.run.seed, info.rank, state["step"], device)
        z_0 = batch["bits"].to(device).float()  # (B, L, C)
        cond = make_condition(batch, cfg, text_encoder, device)
        null = engine.module.null_condition(z_0.shape[0], device, null_text)
        cond, _ = drop_condition(cond, null, cfg.denoiser.cond_drop_prob, g)
        loss, per_sample, t = diffusion_loss(model_fn, z_0, cond, a, cfg.diffusion.loss, cfg.diffusion.aux_weight, g)
        finite = D.all_reduce_sum(torch.tensor([float(torch.isfinite(loss))], device=device)).item() == info.world_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, state["samples"], cfg.train.total_samples)
        if finite:
            engine.backward(loss)
            engine.step()
            if engine.is_gradient_accumulation_boundary():
                ema.update(cfg.train.ema_decay)
            bucket = ((t - 1) * TIME_BUCKETS // cfg.diffusion.T).clamp(max=TIME_BUCKETS - 1)
            acc[0] += loss.detach()
            acc[1] += 1
            acc[4:4 + TIME_BUCKETS] += torch.zeros(TIME_BUCKETS, device=device).index_add_(0, bucket, per_sample)
            acc[4 + TIME_BUCKETS:] += torch.bincount(bucket, minlength=TIME_BUCKETS).float()
        else:  # NaN/inf guard: every rank skips the same step, so collectives stay matched
            state["skipped_steps"] += 1
        acc[2] += t1 - t0
        acc[3] += time.time() - t0
        state["step"] += 1
        state["samples"] += samples_per_step

        if state["samples"] - last_log >= cfg.train.log_every_samples or state["samples"] >= cfg.train.total_samples:
            tot = D.all_reduce_sum(acc) / torch.tensor([info.world_size] * 4 + [1] * 2 * TIME_BUCKETS, device=device)
            elapsed = time.time() - t_log
            sps = (state["samples"] - last_log) / elapsed
            grad_norm = engine.get_global_grad_norm()
            peak = peak_flops(device, cfg.train.precision)
            stats = {
                "step": state["step"], "samples": state["samples"],
                "loss": (tot[0] / tot[1].clamp(min=1)).item(),
                **{f"loss_t{i}": (tot[4 + i] / tot[4 + TIME_BUCKETS + i].clamp(min=1)).item() for i in range(TIME_BUCKETS)},
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": sps, "tokens_per_s": sps * z_0.shape[1],
                "mfu": flops * sps / (peak * info.world_size) if peak else None,
                "data_wait_frac": (tot[2] / tot[3].clamp(min=1e-9)).item(),
                "peak_mem_gb": peak_memory_gb(device), "skipped_steps": state["skipped_steps"],
            }
            if logger:
                logger.log(stats, state["step"])
                print(f"[train] step {stats['step']} samples {stats['samples']} loss {stats['loss']:.4f} "
                      f"lr {stats['lr']:.2e} {sps:.1f} samples/s", flush=True)
            acc.zero_()
            last_log, t_log = state["samples"], time.time()

        stop = D.stop_requested(device)
        done = state["samples"] >= cfg.train.total_samples or (cfg.train.max_steps and state["step"] >= cfg.train.max_steps)
        grid = bool(cfg.train.sample_every_samples) and state["samples"] - last_grid >= cfg.train.sample_every_samples
        if stop or done or grid or state["samples"] - last_ckpt >= cfg.train.ckpt_every_samples:
            folder = save_checkpoint(engine, ema, cfg, state, loader, out)
            last_ckpt = state["samples"]
            D.print0(f"[train] checkpoint {folder}")
            if grid:
                last_grid = state["samples"]
                if info.is_main:
                    draw_sample_grid(folder, cfg, out / "samples" / f"{folder.name}.png", logger, state["step"])
        if stop:
            D.print0(f"[train] preempted by signal {D.stop_signal() or 'on another rank'} at step {state['step']}; checkpoint saved")
            break

    latest = ckpt.read_latest(out / "checkpoints")
    export = out / "export"
    if info.is_main and not stop:
        # The finished model for sampling and evaluation, outside the rotating checkpoints.
        ckpt.save_folder(out, "export", lambda tmp: [shutil.copy2(latest / f, tmp / f) for f in EXPORT_FILES],
                         point_latest=False)
        print(f"[train] done: {state['samples']} samples; model exported to {export}", flush=True)
    if logger:
        logger.close()
    D.teardown()
    return export


def main(argv=None) -> None:
    cfg = config_from_cli("Train a text-conditioned Bernoulli diffusion model under DeepSpeed ZeRO.", argv)
    if cfg is not None:
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
