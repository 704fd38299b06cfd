"""The binary autoencoder's task for the training loop: reconstruction, perceptual and
adversarial losses, data parallel with torch DDP.

Not DeepSpeed: the GAN needs two optimisers stepping two networks in one iteration, and the
adaptive weight takes `autograd.grad` at the decoder's last layer in the middle of the
generator step; a DeepSpeed engine owns exactly one model and one optimiser and (under
ZeRO) hooks and partitions the gradients that this needs whole. The autoencoder fits one
device, so ZeRO would save nothing. The code bits are sampled with the micro-step's
generator, so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from bld_t2i import distributed as D
from bld_t2i.checkpoint import atomic_write_text
from bld_t2i.config import Config
from bld_t2i.data.images import image_loader
from bld_t2i.models.ae_losses import LPIPS, PatchDiscriminator, bit_stats, generator_loss, hinge_d_loss, psnr, ssim
from bld_t2i.models.binary_ae import BinaryAutoencoder, code_fingerprint
from bld_t2i.training.checkpointer import Checkpointer
from bld_t2i.training.ema import EMA
from bld_t2i.training.init_from import load_source, read_source
from bld_t2i.training.loop import Parts
from bld_t2i.training.validation import autoencoder_val_metrics, read_heldout_images
from bld_t2i.utils import make_grid, save_png, to_pil

SECTIONS = ("run", "data", "autoencoder", "ae_loss", "optim", "train", "init", "val", "log")
EXPORT_SUBDIR = "autoencoder"  # inside each checkpoint folder: the EMA autoencoder's export


def save_recon_grid(path: Path, x: torch.Tensor, x_hat: torch.Tensor) -> Path:
    """Originals on the top row, reconstructions below, written atomically."""
    return save_png(make_grid(to_pil(torch.cat([x, x_hat.clamp(-1, 1)]).float().cpu()), columns=len(x)), path)


class AutoencoderTask:
    """build() and train_step() of the binary autoencoder and its patch discriminator."""

    name = "train_ae"
    sections = SECTIONS
    # Two optimisers step on every batch (no accumulation): a resume on another number of
    # ranks keeps the per-rank batch, so the global batch and the samples per step change.
    accumulates = False

    def micro_batch(self, cfg: Config) -> int:
        return cfg.data.batch_size

    def build(self, cfg: Config, device: torch.device, grad_accum: int, resume_world: int | None) -> Parts:
        if cfg.train.grad_accum != 1:
            raise ValueError(f"train.grad_accum={cfg.train.grad_accum}: the autoencoder trainer steps its two "
                             "optimisers on every batch (no accumulation)")
        lc, info = cfg.ae_loss, D.dist_info()
        self.cfg, self.device = cfg, device
        self.model = BinaryAutoencoder.from_config(cfg.autoencoder)
        if cfg.data.image_size % self.model.arch.downsample:
            raise ValueError(f"data.image_size={cfg.data.image_size} is not divisible by the autoencoder's "
                             f"f={self.model.arch.downsample}")
        decoder_only = cfg.autoencoder.train_parts == "decoder"
        if decoder_only and not cfg.init.from_:
            raise ValueError("autoencoder.train_parts=decoder fine-tunes an autoencoder's decoder: name it with init.from")
        source = None
        if cfg.init.from_ and (resume_world is None or decoder_only):
            source = read_source(cfg.init.from_, "autoencoder", cfg.init.use_ema)
        if source is not None and resume_world is None:  # a fresh start from another run's weights
            load_source(self.model, source, cfg.init)
        self.fingerprint = None  # what the encoder must stay: decoder-only runs check it at the end
        if decoder_only:  # frozen: no gradient, no optimizer state, no weight decay, bit for bit
            self.model.encoder.requires_grad_(False)
            self.model.to_logits.requires_grad_(False)
            # the encoder is the source's: latent manifests that name the source's weights stay valid
            self.model.encoder_of = source.encoder_of
            self.fingerprint = code_fingerprint(source.state)
            D.print0(f"[train_ae] training the decoder only; encoder fingerprint {self.fingerprint[:16]}...")
        self.model.to(device)
        self.disc = PatchDiscriminator(lc.disc_layers, lc.disc_width).to(device) if lc.disc_weight > 0 else None
        self.lpips = LPIPS.from_folder(lc.lpips_path).to(device) if lc.lpips_path else None
        if self.lpips is None:
            D.print0("perceptual loss off: ae_loss.lpips_path is empty")
        o = cfg.optim
        trained = [q for q in self.model.parameters() if q.requires_grad]
        self.opt_g = torch.optim.AdamW(trained, o.lr, tuple(o.betas), o.eps, o.weight_decay)
        states = {"model": self.model, "opt_g": self.opt_g}
        optimizers = [(self.opt_g, 1.0)]
        if self.disc is not None:
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), o.lr, tuple(o.betas), o.eps, o.weight_decay)
            states.update(disc=self.disc, opt_d=self.opt_d)
            optimizers.append((self.opt_d, lc.disc_lr_mult))
        many = info.world_size > 1
        self.ddp_model = DistributedDataParallel(self.model) if many else self.model
        self.ddp_disc = DistributedDataParallel(self.disc) if many and self.disc is not None else self.disc
        self.samples_per_step = cfg.data.batch_size * info.world_size
        self.ema = EMA(self.model)
        self.heldout = read_heldout_images(cfg) if cfg.val.shards else None
        self.last_val: dict = {}
        return Parts(loader=image_loader(cfg.data, cfg.run.seed), ema=self.ema, optimizers=optimizers,
                     checkpointer=Checkpointer(cfg.run.out_dir, cfg.train.keep_checkpoints, states=states),
                     export=self.export, export_subdir=EXPORT_SUBDIR,
                     on_sample=self.show_recon if cfg.val.shards else None, on_finish=self.final_eval,
                     validate=self.validate if cfg.val.shards else None)

    def autocast(self):
        bf16 = self.cfg.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def train_step(self, parts: Parts, batch: dict, g: torch.Generator, samples: int, boundary: bool, guard):
        lc, model, disc = self.cfg.ae_loss, self.model, self.disc
        x = batch["image"].to(self.device)  # (B, 3, H, W) in [-1, 1]
        gan_on = disc is not None and samples >= lc.disc_start_samples
        # A decoder trained only on sampled bits reconstructs the deterministic code worse than the
        # sampled one (measured on emoji64: 22.3 against 23.8 dB held-out); training on the
        # deterministic code after the switch adapts it to what encode() gives.
        deterministic = 0 < lc.deterministic_start_samples <= samples
        if disc is not None:  # frozen and called without DDP, so no gradient sync waits on it
            disc.requires_grad_(False)
        with self.autocast():
            out = self.ddp_model(x, generator=None if deterministic else g, deterministic=deterministic)
            loss, stats = generator_loss(lc, x, out, model.last_layer, disc if gan_on else None, self.lpips)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        # NaN guard: every rank skips the same step (the one collective of the step, with the stop flag)
        finite = guard(~torch.isfinite(grad_norm)) if self.cfg.train.nan_guard else True
        if finite:
            self.opt_g.step()
        if gan_on and finite:  # discriminator step, hinge loss on real vs detached reconstructions
            disc.requires_grad_(True)
            with self.autocast():
                d_loss = hinge_d_loss(self.ddp_disc(x), self.ddp_disc(out.recon.detach().float()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            stats["d_loss"] = d_loss.detach()
        with torch.no_grad():
            stats.update(psnr=psnr(x, out.recon).mean(), ssim=ssim(x, out.recon).mean(),
                         deterministic_codes=torch.tensor(float(deterministic), device=self.device),
                         **bit_stats((out.probs > 0.5).permute(0, 2, 3, 1)))
        return {f"train/{k}": v for k, v in stats.items()}, finite

    def export(self, ema_state: dict, folder: Path) -> None:
        self.ema_model(ema_state).save_pretrained(folder)

    def ema_model(self, ema_state: dict) -> BinaryAutoencoder:
        ema = BinaryAutoencoder(self.model.arch, self.model.encoder_of).to(self.device)
        ema.load_state_dict(ema_state)
        return ema.eval().requires_grad_(False)

    def validate(self) -> dict:
        """The EMA autoencoder's held-out metrics (training/validation.py), a collective; the
        per-channel rates go to eval.json only."""
        ae = self.ema_model(self.ema.full_state())
        metrics, _ = autoencoder_val_metrics(ae, self.heldout, self.code_shape, self.cfg.data.batch_size, self.device)
        self.last_val = metrics
        return {k: v for k, v in metrics.items() if k != "val/bit_rates"}

    @property
    def code_shape(self) -> tuple[int, int, int]:
        g = self.cfg.data.image_size // self.model.arch.downsample
        return g, g, self.model.arch.bits

    def held_out_images(self, n: int) -> torch.Tensor:
        return torch.stack([s["image"] for s in self.heldout.samples[:n]]).to(self.device)

    def show_recon(self, folder: Path, logger, record: dict) -> None:
        """Held-out reconstructions by a checkpoint's EMA autoencoder (rank 0)."""
        ae = BinaryAutoencoder.from_pretrained(folder / EXPORT_SUBDIR, device=self.device)
        xs = self.held_out_images(self.cfg.ae_loss.grid_images)
        path = Path(self.cfg.run.out_dir) / "recon" / f"recon-{record['samples']:012d}.png"
        logger.log_image("recon", save_recon_grid(path, xs, ae.decode(ae.encode(xs))), record["step"])

    def final_eval(self, export: Path, logger, record: dict) -> None:
        """eval.json (the last validation) and the last reconstruction grid (the last training
        batch without held-out shards)."""
        cfg, out = self.cfg, Path(self.cfg.run.out_dir)
        ae = BinaryAutoencoder.from_pretrained(export, device=self.device)
        if self.fingerprint is not None and ae.fingerprint != self.fingerprint:
            raise RuntimeError(f"the decoder-only run changed the encoder: fingerprint {ae.fingerprint} != "
                               f"{self.fingerprint} at the start")
        if self.heldout is not None:
            atomic_write_text(out / "eval.json", json.dumps(self.last_val, indent=2))
            xs = self.held_out_images(cfg.ae_loss.grid_images)
        else:
            xs = next(iter(image_loader(cfg.data, cfg.run.seed, rank=0, world_size=1)))["image"][: cfg.ae_loss.grid_images]
            xs = xs.to(self.device)
        x_hats = ae.decode(ae.encode(xs))
        logger.log_image("recon", save_recon_grid(out / "recon" / "recon-final.png", xs, x_hats), record["step"])
        D.print0(f"exported the EMA autoencoder to {export} (fingerprint {ae.fingerprint[:16]}...)")
