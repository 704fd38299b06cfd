"""GPU memory per rank of the denoiser recipes under each ZeRO stage: the estimate the
1024 px recipe's stage and activation checkpointing are chosen by.

    python bench/bench_memory.py [--world 8] [--gpu-gb 80]

Per rank, bf16 weights with DeepSpeed's float32 masters, AdamW and float32 gradient
accumulation (train.grad_accum_dtype), the trainer's EMA of the masters and ZeRO's buckets
(distributed.zero_sizes), counted from the parameter count; activations per micro-batch
*measured*: the bytes autograd saves for the backward in a real bf16 forward of the recipe's
denoiser on this CPU (saved-tensor hooks; blocks of 1 and 2 at batches of 1 and 2 give the
per-sample cost of the stem and of one block, exactly linear in both), with and without
`denoiser.grad_checkpointing`. The frozen text encoder's weights (float32, bf16 autocast) are
added where the recipe encodes captions on the fly.

Writes bench/results/memory_<cpu|gpu>.md (run_all.py's naming; the numbers do not depend on
the machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bld_t2i import distributed as D
from bld_t2i.config import load_config
from bld_t2i.models.denoiser import Denoiser, denoiser_arch

from common import device_suffix, machine_stamp, write_result

REPO_ROOT = Path(__file__).resolve().parents[1]

# recipe: (latent shape of its autoencoder, text width and parameters of its encoder, the encoder)
RECIPES = {
    "t2i_256": ((16, 16, 64), 768, 123e6, "OpenCLIP ViT-L/14 text tower"),
    "t2i_1024": ((32, 32, 64), 2048, 1.22e9, "T5-v1.1-XL encoder"),
}
GB = 2**30


def saved_bytes(model: Denoiser, batch: int, latent_shape, text_dim: int, text_len: int) -> int:
    """Bytes of the distinct tensors autograd saves in one training forward of `batch` samples."""
    h, w, C = latent_shape
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    z = (torch.rand(batch, h * w, C) < 0.5).bfloat16()
    cond = {"tokens": torch.randn(batch, text_len, text_dim).bfloat16(),
            "mask": torch.ones(batch, text_len, dtype=torch.bool), "pooled": torch.randn(batch, text_dim).bfloat16()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(z, torch.rand(batch), cond)
    del out
    return sum(seen.values())


def activations_per_sample(cfg, latent_shape, text_dim: int, checkpointing: bool) -> tuple[float, float]:
    """(stem bytes, bytes per block) per sample, from depths 1, 2 and batches 1, 2."""
    text_len = cfg.text_encoder.max_length
    cfg.denoiser.grad_checkpointing = checkpointing
    per_sample = {}
    for depth in (1, 2):
        cfg.denoiser.depth = depth
        torch.manual_seed(0)
        model = Denoiser(cfg.denoiser, latent_shape, text_dim).bfloat16().train()
        b1, b2 = (saved_bytes(model, b, latent_shape, text_dim, text_len) for b in (1, 2))
        per_sample[depth] = b2 - b1
    block = per_sample[2] - per_sample[1]
    return per_sample[1] - block, block


def rank_states(n: float, stage: int, world: int, sizes: D.ZeroSizes) -> dict[str, float]:
    """Bytes per rank of the model states under ZeRO `stage` (bf16 weights, fp32 everything else)."""
    shard = n / world
    return {
        "bf16 weights": 2 * (shard if stage == 3 else n),
        # stage 0/1: every gradient, in float32 (ZeRO-1's bf16 optimizer accumulates all of them);
        # stage 2/3: this rank's partition, plus the bf16 gradients of the reduce bucket in flight
        "fp32 gradients": 4 * n if stage < 2 else 4 * shard + 2 * sizes.bucket,
        "fp32 master + AdamW + EMA": (4 + 8 + 4) * (n if stage == 0 else shard),
        # reduce and all-gather buckets in float32 communication; ZeRO-3: the prefetched bf16 parameters
        "buckets": 0 if stage == 0 else 4 * sizes.bucket * 2 if stage < 3 else 4 * sizes.bucket + 2 * sizes.prefetch,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=8, help="ranks (GPUs) the states are sharded over; default 8, one node")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB the totals are compared with")
    p.add_argument("--quick", action="store_true", help="the same (the measurement is small already)")
    args = p.parse_args()
    stamp = machine_stamp()
    rows = []
    for name, (latent_shape, text_dim, encoder_params, _) in RECIPES.items():
        cfg = load_config(REPO_ROOT / "recipes" / f"{name}.yaml")
        micro = cfg.latents.batch_size
        with torch.device("meta"):
            n = sum(p.numel() for p in Denoiser(cfg.denoiser, latent_shape, text_dim).parameters())
        depth = denoiser_arch(cfg.denoiser)[0]
        sizes = D.zero_sizes(n)
        text = 0.0 if cfg.latents.use_embeddings else 4 * encoder_params
        for ckpt in (False, True):
            stem, block = activations_per_sample(load_config(REPO_ROOT / "recipes" / f"{name}.yaml"), latent_shape,
                                                 text_dim, ckpt)
            act = micro * (stem + depth * block)
            for stage in (0, 1, 2, 3):
                states = rank_states(n, stage, args.world, sizes)
                total = sum(states.values()) + act + text
                rows.append({
                    "recipe": f"{name} ({n / 1e6:.0f}M, micro-batch {micro})", "ZeRO": stage,
                    "checkpointing": "yes" if ckpt else "no",
                    **{f"{k} GiB": v / GB for k, v in states.items()},
                    "activations GiB": act / GB, "text encoder GiB": text / GB, "total GiB": total / GB,
                    f"fits {args.gpu_gb:g} GiB": "yes" if total < 0.9 * args.gpu_gb * GB else "no",
                })
    notes = f"""Per rank, {args.world} ranks. Activations are measured per sample on this CPU and multiplied by the
recipe's micro-batch (latents.batch_size); CPU attention with a text mask keeps the cross-attention's
probabilities (B, heads, L, N) that CUDA's memory-efficient kernel does not, so they are a little high. Not
counted: the CUDA context and NCCL (~1-2 GiB), allocator fragmentation, the step's temporaries (the float32
logits and loss, the optimizer step's). "fits" leaves 10% for those. Text encoder: {RECIPES['t2i_256'][3]}
(256 px) and {RECIPES['t2i_1024'][3]} (1024 px) weights in float32 on every rank, run under bf16 autocast;
0 with latents.use_embeddings."""
    path = write_result(f"memory_{device_suffix()}", "Denoiser memory per rank by ZeRO stage (estimate)", rows, notes, stamp)
    print(path.read_text())


if __name__ == "__main__":
    main()
