"""The denoising transformer T_theta(z_t, t, c) -> flip logits (docs/math.md (D)).

Bits {0,1} -> +-1 -> a bias-free linear map C -> D, plus a trainable 2-D sin-cos position
embedding, learned for the training grid `latent_shape[:2]` and resized bicubically for any
other (h, w) grid (aspect-ratio buckets, docs/math.md (D1)). The condition enters in one of
four ways, `cfg.conditioning`:

  cross_attn    every block cross-attends to the projected text tokens (the default: one
                pooled token is weak for text-to-image at scale, docs/math.md (D))
  pooled_token  a linear projection of the pooled text vector (the authors')
  class         a class embedding; label `num_classes` is the null class
  none          unconditional

and the time t/T (sinusoid -> MLP) in one of two, `cfg.time_cond`:

  token         one extra token, and pooled_token / class one more (the authors')
  adaln_zero    adaLN-Zero (DiT, docs/math.md (D2)): c = time embedding [+ the class or
                pooled-text embedding] sets a shift, scale and gate of every block's attention
                and MLP branch, zero-initialised so each block starts as the identity, and a
                final shift and scale before the head; no extra tokens. cross_attn: c is the
                time alone, the text comes in by cross-attention (PixArt-alpha)

Pre-LN blocks with bidirectional multi-head attention (`scaled_dot_product_attention`) and a
4x GELU MLP; a final LayerNorm and a linear D -> C head give one flip logit per bit, the
logit of z_0 xor z_t (docs/math.md (5)).

The condition's share of the work that no sampling step changes (every block's keys and
values of the text tokens, the condition token or vector) is `prepare_condition`; `denoise`
takes it, so a sampler computes it once per call instead of at each of the S steps. The
adaLN modulation depends on t, so `denoise` computes it.

Every parameter takes part in every forward pass, in every mode, so ZeRO and DDP never meet
an unused parameter (docs/math.md, where we differ, 5). Constructors make no CUDA calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bld_t2i.config import DenoiserConfig
from bld_t2i.models.denoiser_blocks import (
    Block,
    adaln_modulation,
    modulate,
    resize_pos_embed,
    sincos_2d,
    timestep_embedding,
)

# name: (depth, width D, heads). The grid (16x16 at 256px, 32x32 at 1024px) and the bits C
# come from the latent shape, not from the preset.
DENOISER_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),  # CPU tests
    "mini": (4, 128, 4),  # the CPU demo (make demo)
    "small": (12, 384, 6),
    "base": (12, 768, 12),
    "authors": (24, 768, 12),  # the authors' 256px text-to-image model: ~172M parameters
    "large": (24, 1024, 16),
    "xl": (28, 1152, 16),
}

CONDITIONING_MODES = ("cross_attn", "pooled_token", "class", "none")
TEXT_MODES = ("cross_attn", "pooled_token")
NULL_CONDS = ("empty_caption", "learned")
TIME_CONDS = ("token", "adaln_zero")


def denoiser_arch(cfg: DenoiserConfig) -> tuple[int, int, int]:
    """(depth, width D, heads): the row of `cfg.preset` with the config's non-zero overrides."""
    if cfg.preset not in DENOISER_PRESETS:
        raise ValueError(f"denoiser.preset: unknown preset '{cfg.preset}'; one of {sorted(DENOISER_PRESETS)}")
    names = ("depth", "width", "heads")
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"denoiser.{name}: must be >= 0 (0: the preset's), got {getattr(cfg, name)}")
    depth, width, heads = (getattr(cfg, k) or v for k, v in zip(names, DENOISER_PRESETS[cfg.preset]))
    if width % heads or width % 4:
        # 4: the 2-D sin-cos position embedding gives a quarter of the channels to each of
        # sin and cos of the row and of the column.
        raise ValueError(f"denoiser.width: {width} (preset '{cfg.preset}' or denoiser.width) must be divisible "
                         f"by 4 and by the {heads} heads (denoiser.heads)")
    return depth, width, heads


class Denoiser(nn.Module):
    """T_theta(z_t, t, c): (B, h*w, C) bits, (B,) t/T, condition -> (B, h*w, C) flip logits.

    `grid` (h, w) of forward and denoise: the latent grid of z_t, row-major; None is the
    training grid `latent_shape[:2]`.

    `cond` by `cfg.conditioning`:
      cross_attn, pooled_token: {"tokens": (B, N, text_dim), "mask": (B, N) bool, "pooled":
        (B, text_dim)}, plus with `cfg.null_cond == "learned"` an optional "null": (B,) bool
        marking the samples that get the learned null condition (see `null_condition`);
      class: {"label": (B,) long}, label `cfg.num_classes` being the null class;
      none: None.
    """

    def __init__(self, cfg: DenoiserConfig, latent_shape: tuple[int, int, int], text_dim: int = 0):
        super().__init__()
        depth, width, heads = denoiser_arch(cfg)
        if cfg.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"denoiser.conditioning: unknown mode '{cfg.conditioning}'; one of {CONDITIONING_MODES}")
        if cfg.conditioning in TEXT_MODES and text_dim <= 0:
            raise ValueError(f"denoiser.conditioning '{cfg.conditioning}' needs text_dim > 0 (the text encoder's width)")
        if cfg.conditioning in TEXT_MODES and cfg.null_cond not in NULL_CONDS:
            raise ValueError(f"denoiser.null_cond: unknown '{cfg.null_cond}'; one of {NULL_CONDS}")
        if cfg.conditioning == "class" and cfg.num_classes <= 0:
            raise ValueError("denoiser.conditioning 'class' needs denoiser.num_classes > 0")
        if cfg.time_cond not in TIME_CONDS:
            raise ValueError(f"denoiser.time_cond: unknown '{cfg.time_cond}'; one of {TIME_CONDS}")
        self.cfg = cfg
        self.latent_shape = tuple(latent_shape)
        self.text_dim = text_dim
        self.width = width
        h, w, C = self.latent_shape
        mode = cfg.conditioning
        learned_null = mode in TEXT_MODES and cfg.null_cond == "learned"
        self.adaln = cfg.time_cond == "adaln_zero"

        self.x_embed = nn.Linear(C, width, bias=False)  # +-1 bits -> D
        self.pos_embed = nn.Parameter(sincos_2d(h, w, width)[None])  # (1, L, D), trainable
        self.t_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        # Exactly the conditioning layers this mode uses, so none is ever unused.
        self.text_proj = nn.Linear(text_dim, width) if mode == "cross_attn" else None
        self.pooled_proj = nn.Linear(text_dim, width) if mode == "pooled_token" else None
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width) if mode == "class" else None
        # The learned null condition lives in the text space, ahead of the projection: one
        # token for cross-attention, one pooled vector for the pooled token.
        self.null_tokens = nn.Parameter(torch.zeros(1, text_dim)) if learned_null and mode == "cross_attn" else None
        self.null_pooled = nn.Parameter(torch.zeros(text_dim)) if learned_null and mode == "pooled_token" else None
        self.blocks = nn.ModuleList(Block(width, heads, mode == "cross_attn", self.adaln) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6) if self.adaln else nn.LayerNorm(width)
        self.final_modulation = adaln_modulation(width, 2) if self.adaln else None  # shift, scale before the head
        self.head = nn.Linear(width, C)
        # time token [+ condition token]; none with adaLN
        self.n_extra = 0 if self.adaln else 1 + (mode in ("pooled_token", "class"))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in (self.null_tokens, self.null_pooled):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        # Small last layers, of the head and of every residual branch: the untrained model
        # is then close to identity blocks predicting flip probabilities near 1/2, instead of
        # xavier's confident random logits that training must first unlearn (DiT zero-inits
        # the same layers; 0.02 keeps gradients and outputs non-zero at step 0). Toy fit
        # (tests/test_toy_fit.py), 1,200 steps, 4 seeds: 92-96% exact patterns; 58-71% with
        # xavier everywhere, 85-91% with only the head small.
        small = [self.head] + [m for b in self.blocks for m in (b.attn.proj, b.cross and b.cross.proj, b.mlp[2]) if m]
        if self.adaln:
            # adaLN-Zero (DiT): zero modulation, so every gate is 0 and each block the identity at
            # init; the gates, not small weights, keep the attention and MLP branches quiet.
            small = [self.head] + [b.cross.proj for b in self.blocks if b.cross is not None]
            for m in [b.modulation[1] for b in self.blocks] + [self.final_modulation[1]]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for m in small:
            nn.init.normal_(m.weight, std=0.02)

    # ------------------------------------------------------------------ condition

    def _null_flags(self, cond: dict, batch_size: int, device: torch.device) -> torch.Tensor:
        """(B, 1) bool: the samples that take the learned null condition."""
        if "null" in cond:
            return cond["null"].to(device=device, dtype=torch.bool)[:, None]
        return torch.zeros(batch_size, 1, dtype=torch.bool, device=device)

    def _text_context(self, cond: dict, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text tokens (B, N, D) and their mask (B, N) for cross-attention."""
        tokens, mask = cond["tokens"].to(dtype), cond["mask"].to(torch.bool)  # (B, N, text_dim), (B, N)
        if self.null_tokens is not None:
            # torch.where keeps the learned null in every step's graph (zero gradient when no
            # sample is null), and it is read here, inside forward, where ZeRO-3 has gathered it.
            N = tokens.shape[1]
            null = self._null_flags(cond, batch_size, tokens.device)  # (B, 1)
            null_tokens = F.pad(self.null_tokens.to(dtype), (0, 0, 0, N - 1))  # (N, text_dim)
            null_mask = torch.arange(N, device=tokens.device) < 1  # (N,)
            tokens = torch.where(null[:, :, None], null_tokens, tokens)
            mask = torch.where(null, null_mask, mask)
        return self.text_proj(tokens), mask

    def _condition_vector(self, cond: dict | None, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The embedding (B, D) of the pooled_token and class modes: their extra token, or their
        share of the adaLN conditioning vector."""
        if self.cfg.conditioning == "class":
            return self.class_embed(cond["label"])
        pooled = cond["pooled"].to(dtype)  # (B, text_dim)
        if self.null_pooled is not None:
            pooled = torch.where(self._null_flags(cond, batch_size, pooled.device), self.null_pooled.to(dtype), pooled)
        return self.pooled_proj(pooled)

    def null_condition(self, batch_size: int, device: torch.device | str, empty_caption: dict | None = None) -> dict | None:
        """The condition that classifier-free guidance drops to (docs/math.md (9)).

        text, null_cond "empty_caption": `empty_caption` (the text encoder's encoding of [""],
          batch 1) expanded to the batch;
        text, null_cond "learned": placeholder tensors flagged {"null": True}; forward swaps in
          the learned null there (reading the parameter here would see ZeRO-3 partitions);
        class: the null class `num_classes`; none: None.
        """
        mode = self.cfg.conditioning
        if mode == "none":
            return None
        if mode == "class":
            return {"label": torch.full((batch_size,), self.cfg.num_classes, dtype=torch.long, device=device)}
        if self.cfg.null_cond == "learned":
            return {
                "tokens": torch.zeros(batch_size, 1, self.text_dim, device=device),
                "mask": torch.ones(batch_size, 1, dtype=torch.bool, device=device),
                "pooled": torch.zeros(batch_size, self.text_dim, device=device),
                "null": torch.ones(batch_size, dtype=torch.bool, device=device),
            }
        if empty_caption is None:
            raise ValueError("denoiser.null_cond 'empty_caption' needs empty_caption=text_encoder.encode([''])")
        return {k: v.to(device).expand(batch_size, *v.shape[1:]) for k, v in empty_caption.items()}

    # ------------------------------------------------------------------ forward

    def prepare_condition(self, cond: dict | None, batch_size: int) -> dict | None:
        """What the blocks read of the condition, which no step of sampling changes.

        cross_attn: {"kv": [(B, 2, H, N, D/H) per block], "mask": (B, N)}, every block's keys
          and values of the projected text tokens; pooled_token, class: {"token": (B, 1, D)},
          with adaLN {"vec": (B, D)}, the condition's share of the conditioning vector;
          none: None. Every tensor is batched on dim 0. Sampling computes this once per call (for the condition and for the
          null) and passes it to `denoise` at every step; `forward` computes it each pass.
        """
        mode = self.cfg.conditioning
        if (cond is None) != (mode == "none"):
            raise ValueError(f"denoiser.conditioning '{mode}' got cond={'None' if cond is None else 'a dict'}")
        dtype = self.x_embed.weight.dtype
        if mode == "cross_attn":
            ctx, mask = self._text_context(cond, batch_size, dtype)  # (B, N, D), (B, N)
            return {"kv": [block.cross.keys_values(ctx) for block in self.blocks], "mask": mask}
        if mode in ("pooled_token", "class"):
            vec = self._condition_vector(cond, batch_size, dtype)  # (B, D)
            return {"vec": vec} if self.adaln else {"token": vec[:, None]}
        return None

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.denoise(z_t, t, self.prepare_condition(cond, z_t.shape[0]), grid)

    def grid_of(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        """The (h, w) latent grid: `grid`, or the training grid for None."""
        if grid is None:
            return self.latent_shape[0], self.latent_shape[1]
        h, w = (int(n) for n in grid)
        if h < 1 or w < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1; got {tuple(grid)}")
        return h, w

    def position_embedding(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(1, h*w, D): the learned table for the training grid, resized for another (docs/math.md (D1))."""
        return resize_pos_embed(self.pos_embed, self.latent_shape[:2], self.grid_of(grid))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, prepared: dict | None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """T_theta with the condition already prepared (`prepare_condition`) -> (B, h*w, C) flip logits."""
        B, L, C = z_t.shape  # (B, L, C) float 0/1, L = h*w
        if t.dtype in (torch.float16, torch.bfloat16):
            # bf16 keeps ~500 of the 1000 values of t/T at T = 1000: times would merge
            raise TypeError(f"t must be float32 t/T, got {t.dtype}")
        h, w = self.grid_of(grid)
        if (L, C) != (h * w, self.latent_shape[2]):
            raise ValueError(f"z_t has shape {tuple(z_t.shape)}; this denoiser expects (B, {h * w}, "
                             f"{self.latent_shape[2]}) for the grid {(h, w)} (latent shape {self.latent_shape})")
        dtype = self.x_embed.weight.dtype
        x = self.x_embed(z_t.to(dtype) * 2 - 1) + self.position_embedding((h, w)).to(dtype)  # (B, L, D)
        time = self.t_embed(timestep_embedding(t, self.width).to(dtype))  # (B, D)
        c = None  # adaLN's conditioning vector (B, D)
        if self.adaln:
            c = time + prepared["vec"] if prepared is not None and "vec" in prepared else time
        else:
            extra = [time[:, None]]  # time token (B, 1, D)
            if prepared is not None and "token" in prepared:
                extra.append(prepared["token"])  # condition token (B, 1, D)
            x = torch.cat(extra + [x], dim=1)  # (B, n_extra + L, D)
        kvs = prepared["kv"] if prepared is not None and "kv" in prepared else [None] * len(self.blocks)
        ctx_mask = prepared["mask"] if prepared is not None and "mask" in prepared else None
        for block, kv in zip(self.blocks, kvs):
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(block, x, kv, ctx_mask, c, use_reentrant=False)
            else:
                x = block(x, kv, ctx_mask, c)
        x = self.norm(x[:, self.n_extra :])  # (B, L, D)
        if self.adaln:
            shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
            x = modulate(x, shift, scale)
        return self.head(x)  # (B, L, C) flip logits

    def flops_per_sample(self, text_len: int | None = None, grid: tuple[int, int] | None = None) -> int:
        """Forward matmul FLOPs (2 per multiply-add) for one sample on `grid` (None: the training
        grid); training costs ~3x.

        Cross-attention's cost depends on the caption length: pass `text_len` (the N of the
        text tokens, e.g. cfg.text_encoder.max_length) for cross_attn models.
        """
        mode = self.cfg.conditioning
        if mode == "cross_attn" and text_len is None:
            raise ValueError("flops_per_sample: a cross_attn denoiser needs text_len (the text tokens N per caption)")
        depth, D = len(self.blocks), self.width
        h, w = self.grid_of(grid)
        C = self.latent_shape[2]
        L = h * w
        S = L + self.n_extra  # tokens in self-attention
        flops = 2 * L * C * D * 2  # bit embedding and head
        flops += 2 * 2 * D * D  # time MLP on one token
        per_block = 2 * S * D * D * 4 + 2 * 2 * S * S * D  # q, kv, proj; scores and weighted sum
        per_block += 2 * S * D * 4 * D * 2  # MLP
        if self.adaln:
            per_block += 2 * D * 6 * D  # the block's modulation, once per sample
            flops += 2 * D * 2 * D  # the final shift and scale
        if mode == "cross_attn":
            N = text_len
            flops += 2 * N * self.text_dim * D  # text projection
            per_block += 2 * S * D * D * 2 + 2 * N * D * 2 * D + 2 * 2 * S * N * D  # q, proj; kv; attention
        elif mode == "pooled_token":
            flops += 2 * self.text_dim * D
        return flops + depth * per_block
