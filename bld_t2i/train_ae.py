"""Train the binary autoencoder: `python -m bld_t2i.train_ae --recipe recipes/ae/<name>.yaml [k=v ...]`.

Data parallel over the ranks of torchrun or srun with torch DDP. Not DeepSpeed: the GAN
needs two optimisers stepping two networks in one iteration, and the adaptive weight takes
`autograd.grad` at the decoder's last layer in the middle of the generator step; a
DeepSpeed engine owns exactly one model and one optimiser and (under ZeRO) hooks and
partitions the gradients that this needs whole. The autoencoder fits one device, so ZeRO
would save nothing.

Progress is counted in samples; the bits are sampled with a generator seeded from
(seed, rank, samples seen), so a resumed run draws what the uninterrupted one would have.
Rerunning the same command resumes from the latest checkpoint in `run.out_dir/checkpoints`.
SIGUSR1/SIGTERM (SLURM preemption) save a checkpoint at the next step and exit without an
export, so the requeued job resumes there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image

from bld_t2i import distributed
from bld_t2i.checkpoint import atomic_torch_save, atomic_write_text
from bld_t2i.config import Config, OptimConfig, config_from_cli, save_config, to_dict
from bld_t2i.data.images import image_loader
from bld_t2i.ema import update_ema
from bld_t2i.models.ae_losses import LPIPS, PatchDiscriminator, bit_stats, generator_loss, hinge_d_loss, psnr, ssim
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.tracking import StatsLogger

EXPORT_DIR = "export"  # like the t2i trainer: <out_dir>/export


# ----------------------------------------------------------------------------- helpers


def lr_at(cfg: OptimConfig, samples: int, total: int) -> float:
    """Linear warm-up over `warmup_samples`, then cosine/linear decay to `min_lr_ratio * lr`."""
    if samples < cfg.warmup_samples:
        return cfg.lr * (samples + 1) / cfg.warmup_samples
    progress = min(1.0, (samples - cfg.warmup_samples) / max(1, total - cfg.warmup_samples))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    if cfg.decay not in shape:
        raise ValueError(f"optim.decay must be one of {sorted(shape)}, got {cfg.decay!r}")
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape[cfg.decay])


def step_generator(seed: int, rank: int, samples: int, device: torch.device) -> torch.Generator:
    """The RNG of one step, derived from (seed, rank, samples seen)."""
    state = int(np.random.SeedSequence([seed, rank, samples]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def autocast(device: torch.device, precision: str):
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def save_checkpoint(ckpt_dir: Path, state: dict, keep: int) -> Path:
    """Write ckpt-<samples>.pt through a temp name; keep the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt-{state['samples']:012d}.pt"
    atomic_torch_save(state, path)
    for old in sorted(ckpt_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_latest_checkpoint(ckpt_dir: Path) -> dict | None:
    paths = sorted(ckpt_dir.glob("ckpt-*.pt"))
    if not paths:
        return None
    try:
        state = torch.load(paths[-1], map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f"cannot resume: checkpoint {paths[-1]} is unreadable ({e}); remove it to resume from the one before") from e
    state["path"] = str(paths[-1])
    return state


def save_grid(path: Path, x: torch.Tensor, x_hat: torch.Tensor) -> Path:
    """Originals on the top row, reconstructions below; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    grid = torch.cat([x, x_hat.clamp(-1, 1)]).float().cpu().add(1).div(2)
    save_image(grid, tmp, nrow=len(x), format="png")
    os.replace(tmp, path)
    return path


@torch.no_grad()
def evaluate(cfg: Config, ae: BinaryAutoencoder, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Deterministic codes of the held-out images: PSNR, SSIM and bit usage; a few images for the grid."""
    loader = image_loader(cfg.data, cfg.run.seed, rank=0, world_size=1, finite=True, shards=cfg.data.eval_shards)
    codes, scores, shown = [], defaultdict(list), None
    seen = 0
    for batch in loader:
        x = batch["image"][: cfg.ae_loss.eval_samples - seen].to(device)
        bits = ae.encode(x)
        x_hat = ae.decode(bits).float()
        codes.append(bits.cpu())
        scores["psnr"].append(psnr(x, x_hat).cpu())
        scores["ssim"].append(ssim(x, x_hat).cpu())
        if shown is None:
            shown = (x[: cfg.ae_loss.grid_images], x_hat[: cfg.ae_loss.grid_images])
        seen += len(x)
        if seen >= cfg.ae_loss.eval_samples:
            break
    metrics = {f"eval/{k}": torch.cat(v).mean().item() for k, v in scores.items()}
    metrics.update({f"eval/{k}": v for k, v in bit_stats(torch.cat(codes)).items()}, **{"eval/images": seen})
    return metrics, *shown


# ----------------------------------------------------------------------------- training


def train(cfg: Config) -> Path | None:
    """Train, checkpoint, resume; returns the export folder (EMA weights), None if preempted."""
    device = distributed.pick_device(cfg.train.device)
    info = distributed.init(device)
    distributed.install_stop_handlers()
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    lc, tc = cfg.ae_loss, cfg.train

    torch.manual_seed(cfg.run.seed)
    model = BinaryAutoencoder.from_config(cfg.autoencoder).to(device)
    if cfg.data.image_size % model.arch.downsample:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not divisible by the autoencoder's f={model.arch.downsample}")
    ema = copy.deepcopy(model).requires_grad_(False)
    disc = PatchDiscriminator(lc.disc_layers, lc.disc_width).to(device) if lc.disc_weight > 0 else None
    if lc.lpips_path:
        lpips = LPIPS.from_folder(lc.lpips_path).to(device)
    else:
        lpips = None
        distributed.print0("perceptual loss off: ae_loss.lpips_path is empty")
    betas = tuple(cfg.optim.betas)
    opt_g = torch.optim.AdamW(model.parameters(), cfg.optim.lr, betas, cfg.optim.eps, cfg.optim.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), cfg.optim.lr, betas, cfg.optim.eps, cfg.optim.weight_decay) if disc else None
    loader = image_loader(cfg.data, cfg.run.seed)

    samples = step = 0
    resumed = load_latest_checkpoint(ckpt_dir)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt_g.load_state_dict(resumed["opt_g"])
        if disc is not None:
            disc.load_state_dict(resumed["disc"])
            opt_d.load_state_dict(resumed["opt_d"])
        if len(resumed["data"]) != info.world_size:
            raise ValueError(f"{resumed['path']} was written by {len(resumed['data'])} ranks; this job has {info.world_size}")
        loader.load_state_dict(resumed["data"][info.rank])
        samples, step = resumed["samples"], resumed["step"]
        distributed.print0(f"resumed from {resumed['path']} at {samples} samples (step {step})")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
    logger = StatsLogger(out_dir, cfg, cfg.log, f"{cfg.run.name}-ae", resume_samples=samples) if info.is_main else None

    ddp_model = DistributedDataParallel(model) if info.world_size > 1 else model
    ddp_disc = DistributedDataParallel(disc) if info.world_size > 1 and disc is not None else disc
    per_step = cfg.data.batch_size * info.world_size
    logs, t_log, samples_log = defaultdict(list), time.time(), samples

    def crossed(every: int) -> bool:  # did this step pass a multiple of `every` samples?
        return every > 0 and samples // every != (samples - per_step) // every

    stop = False
    while samples < tc.total_samples and not (tc.max_steps and step >= tc.max_steps):
        x = next(loader)["image"].to(device)  # (B, 3, H, W) in [-1, 1]
        for opt, mult in ((opt_g, 1.0), (opt_d, lc.disc_lr_mult)):
            for group in opt.param_groups if opt else ():
                group["lr"] = lr_at(cfg.optim, samples, tc.total_samples) * mult
        gan_on = disc is not None and samples >= lc.disc_start_samples
        # A decoder trained only on sampled bits reconstructs the deterministic code worse than the
        # sampled one (measured on emoji64: 22.3 against 23.8 dB held-out); training on the
        # deterministic code after the switch adapts it to what encode() gives.
        deterministic = 0 < lc.deterministic_start_samples <= samples

        # generator step; the discriminator is frozen and called without DDP so no sync waits on it
        if disc is not None:
            disc.requires_grad_(False)
        with autocast(device, tc.precision):
            generator = None if deterministic else step_generator(cfg.run.seed, info.rank, samples, device)
            out = ddp_model(x, generator=generator, deterministic=deterministic)
            loss, stats = generator_loss(lc, x, out, model.last_layer, disc if gan_on else None, lpips)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt_g.step()

        if gan_on:  # discriminator step, hinge loss on real vs detached reconstructions
            disc.requires_grad_(True)
            with autocast(device, tc.precision):
                d_loss = hinge_d_loss(ddp_disc(x), ddp_disc(out.recon.detach().float()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            stats["d_loss"] = d_loss.item()
        update_ema(ema, model, tc.ema_decay)

        with torch.no_grad():
            stats["psnr"] = psnr(x, out.recon).mean().item()
            stats["ssim"] = ssim(x, out.recon).mean().item()
            stats["deterministic_codes"] = float(deterministic)
            stats.update(bit_stats((out.probs > 0.5).permute(0, 2, 3, 1)))
        for k, v in stats.items():
            logs[k].append(v)
        samples += per_step
        step += 1

        if crossed(tc.log_every_samples) or samples >= tc.total_samples:
            record = reduce_logs(logs, samples, step, samples_log, t_log)
            logs, t_log, samples_log = defaultdict(list), time.time(), samples
            if info.is_main:
                log_stats(logger, record)
        stop = distributed.stop_requested(device)
        if crossed(tc.ckpt_every_samples) or stop:
            checkpoint(cfg, ckpt_dir, model, ema, disc, opt_g, opt_d, loader, samples, step)
        if stop:
            distributed.print0(f"preempted by signal {distributed.stop_signal() or 'on another rank'} "
                               f"at {samples} samples (step {step}); checkpoint saved")
            break
        if crossed(tc.sample_every_samples) and info.is_main and cfg.data.eval_shards:
            metrics, xs, x_hats = evaluate(cfg, ema, device)
            grid = save_grid(out_dir / "recon" / f"recon-{samples:012d}.png", xs, x_hats)
            log_stats(logger, {"samples": samples, "step": step, **metrics})
            logger.log_image("recon", grid, samples)

    if stop:
        if logger is not None:
            logger.close()
        distributed.teardown()
        return None
    if not crossed(tc.ckpt_every_samples):  # the loop's last step may have saved this one already
        checkpoint(cfg, ckpt_dir, model, ema, disc, opt_g, opt_d, loader, samples, step)
    export = out_dir / EXPORT_DIR
    if info.is_main:
        if cfg.data.eval_shards:
            metrics, xs, x_hats = evaluate(cfg, ema, device)
            log_stats(logger, {"samples": samples, "step": step, **metrics})
            atomic_write_text(out_dir / "eval.json", json.dumps(metrics, indent=2))
        else:  # no held-out images: show the last training batch
            xs = next(loader)["image"][: lc.grid_images].to(device)
            x_hats = ema.decode(ema.encode(xs))
        logger.log_image("recon", save_grid(out_dir / "recon" / "recon-final.png", xs, x_hats), samples)
        fingerprint = ema.save_pretrained(export)
        distributed.print0(f"exported the EMA autoencoder to {export} (fingerprint {fingerprint[:16]}...)")
        logger.close()
    distributed.barrier()
    distributed.teardown()
    return export


def checkpoint(cfg, ckpt_dir, model, ema, disc, opt_g, opt_d, loader, samples, step) -> None:
    """Every rank's data position is gathered; rank 0 writes one file."""
    data = distributed.all_gather_objects(loader.state_dict())
    if distributed.dist_info().is_main:
        state = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt_g": opt_g.state_dict(),
            "disc": disc.state_dict() if disc is not None else None,
            "opt_d": opt_d.state_dict() if opt_d is not None else None,
            "samples": samples, "step": step, "data": data, "config": to_dict(cfg),
        }
        path = save_checkpoint(ckpt_dir, state, cfg.train.keep_checkpoints)
        distributed.print0(f"saved {path}")
    distributed.barrier()


def reduce_logs(logs: dict, samples: int, step: int, samples_log: int, t_log: float) -> dict:
    """Means over the steps since the last record and over the ranks, plus throughput."""
    keys = sorted(logs)  # the same on every rank: which terms are on depends only on `samples`
    sums = distributed.all_reduce_sum(torch.tensor([[sum(logs[k]), len(logs[k])] for k in keys], dtype=torch.float64))
    record = {"samples": samples, "step": step}
    record.update({f"train/{k}": (sums[i, 0] / sums[i, 1]).item() for i, k in enumerate(keys)})
    record["samples_per_s"] = (samples - samples_log) / max(1e-9, time.time() - t_log)
    return record


def log_stats(logger: StatsLogger, record: dict) -> None:
    """One stats.jsonl line (and wandb), and the same on the console."""
    logger.log(record, step=record["samples"])
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in record.items() if k not in ("samples", "step"))
    print(f"[{record['samples']} samples] {shown}", flush=True)


def main(argv=None) -> None:
    cfg = config_from_cli("Train the binary autoencoder (SPEC section 1).", argv)
    if cfg is not None:
        train(cfg)


if __name__ == "__main__":
    main()
