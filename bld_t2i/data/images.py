"""Image-caption shards: decoding to tensors, and the resumable image loader.

Batches (docs/INTERFACES.md): ``image`` float (B, 3, H, W) in [-1, 1], ``caption``
list[str], ``key`` list[str], ``label`` LongTensor (B,) (-1 when the sample has none),
``json`` list[dict].
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from bld_t2i.config import DataConfig
from bld_t2i.data.shards import RawSample
from bld_t2i.data.stream import Decoder, ShardDataset, ShardLoader, SkipSample, json_member, label_of, rank_and_world

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
# The decoders PIL may try on a member's bytes: the formats of IMAGE_EXTS. Without the list PIL
# tries every plugin it has (EPS hands the bytes to Ghostscript, others parse rarely used formats).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
RESIZE_MODES = ("center_crop", "pad", "stretch")
WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, 16/32-bit scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode == "I":  # 32-bit ints: 16-bit PNGs usually open in this mode
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def fit(img: Image.Image, size: int | tuple[int, int], mode: str) -> Image.Image:
    """Resize to `size`, (size, size) or (H, W): `center_crop` (cover the size, then crop the
    centre), `pad` (fit inside the size, centred on white) or `stretch`."""
    w, h = img.size
    H, W = (size, size) if isinstance(size, int) else size
    if mode == "stretch":
        return img.resize((W, H), Image.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        scale = max(W / w, H / h)
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        left, top = (nw - W) // 2, (nh - H) // 2
        return img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0).crop((left, top, left + W, top + H))
    if mode == "pad":
        scale = min(W / w, H / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (W, H), WHITE)
        canvas.paste(img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0), ((W - nw) // 2, (H - nh) // 2))
        return canvas
    raise ValueError(f"data.resize must be one of {RESIZE_MODES}, got {mode!r}")


def parse_buckets(buckets: list[str], factor: int) -> list[tuple[int, int]]:
    """`encode.buckets` ["256x256", "192x320", ...] ("HxW" pixels) -> [(H, W), ...]; each side a
    positive multiple of the autoencoder's downsampling `factor`, no bucket twice."""
    out = []
    for text in buckets:
        try:
            H, W = (int(n) for n in str(text).lower().split("x"))
        except ValueError:
            raise ValueError(f"encode.buckets: {text!r} is not 'HxW' (pixels, e.g. '192x320')") from None
        if H <= 0 or W <= 0 or H % factor or W % factor:
            raise ValueError(f"encode.buckets: {text!r} must have sides that are positive multiples of the "
                             f"autoencoder's downsampling factor {factor}")
        if (H, W) in out:
            raise ValueError(f"encode.buckets: {text!r} is given twice")
        out.append((H, W))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is nearest the image's, in log ratio; ties go to the
    first listed."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def open_image(data: bytes, size: int, min_size: int) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, EXIF orientation applied; a JPEG much larger than
    `size` is decoded at a reduced scale that stays >= size.

    Raises SkipSample with reason zero_byte, corrupt_image, truncated_image or tiny.
    """
    if not data:
        raise SkipSample("zero_byte")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.format == "JPEG" and min(img.size) > 2 * size:
                img.draft("RGB", (size, size))  # DCT-domain downscale: decode at >= size only
            img.load()
            img = ImageOps.exif_transpose(img)
            if min(img.size) < min_size:
                raise SkipSample("tiny")
            return to_rgb(img)
    except OSError as e:
        raise SkipSample("truncated_image" if "truncated" in str(e).lower() else "corrupt_image") from None
    except SkipSample:
        raise
    except Exception:  # noqa: BLE001 - PIL's plugins raise what their parsers meet (struct.error, ZeroDivisionError, ...)
        raise SkipSample("corrupt_image") from None


def decode_image(data: bytes, size: int, resize: str, min_size: int) -> Image.Image:
    """Encoded image bytes -> RGB PIL image of (size, size), EXIF orientation applied.

    Raises SkipSample with reason zero_byte, corrupt_image, truncated_image or tiny.
    """
    return fit(open_image(data, size, min_size), size, resize)


def image_member(members: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    raise SkipSample("missing_image")


def caption_and_meta(members: dict[str, bytes]) -> tuple[str, dict]:
    """The caption (.txt) and metadata (.json) of a sample; an empty caption is missing."""
    caption = members.get("txt", b"").decode("utf-8", "replace").strip()
    if not caption:
        raise SkipSample("missing_caption")
    return caption, json_member(members.get("json"))


def images_to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))).float()  # (B, 3, H, W)
    return x.div_(127.5).sub_(1.0)


class ImageDecoder(Decoder):
    """Images of (image_size, image_size), or with `buckets` [(H, W), ...] of the bucket nearest
    each image's aspect ratio (`nearest_bucket`), fitted to it by `resize`."""

    def __init__(self, image_size: int, resize: str, min_image_size: int, buckets: list[tuple[int, int]] | None = None):
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.image_size, self.resize, self.min_image_size = image_size, resize, min_image_size
        self.buckets = [tuple(b) for b in buckets] if buckets else None

    def decode(self, data: bytes) -> Image.Image:
        if self.buckets is None:
            return decode_image(data, self.image_size, self.resize, self.min_image_size)
        # a JPEG is decoded no smaller than the longest bucket side: every bucket's fit then shrinks
        img = open_image(data, max(max(b) for b in self.buckets), self.min_image_size)
        return fit(img, nearest_bucket(*img.size, self.buckets), self.resize)

    def sample(self, raw: RawSample):
        caption, meta = caption_and_meta(raw.members)
        img = self.decode(image_member(raw.members))
        return np.asarray(img, dtype=np.uint8), caption, raw.key, label_of(meta), meta

    def collate(self, items: list) -> dict:
        """Images of one size (the loader's batches: no buckets); encoding batches by bucket itself."""
        arrays, captions, keys, labels, metas = zip(*items)
        return {"image": images_to_tensor(list(arrays)), "caption": list(captions), "key": list(keys),
                "label": torch.tensor(labels, dtype=torch.long), "json": list(metas)}


def image_loader(cfg: DataConfig, seed: int, rank: int | None = None, world_size: int | None = None,
                 finite: bool = False, shards: str | None = None) -> ShardLoader:
    """The resumable image-caption loader of this rank (`shards` overrides cfg.shards,
    e.g. with the held-out val.shards)."""
    rank, world_size = rank_and_world(rank, world_size)
    spec = cfg.shards if shards is None else shards
    if not spec:
        raise ValueError("data.shards is empty: set it to the image shards' URL(s)")
    dataset = ShardDataset(spec, ImageDecoder(cfg.image_size, cfg.resize, cfg.min_image_size), cfg, seed, rank,
                           world_size, finite)
    return ShardLoader(dataset, cfg.num_workers)
