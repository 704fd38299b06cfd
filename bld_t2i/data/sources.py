"""Sources of image-caption pairs for data_tools/make_shards.py.

Each source yields `Item`s: an image (PIL, or the original encoded bytes), a caption and
JSON metadata; an input that cannot become a sample is a `Skip` with its reason.

- `folder`: images with a same-named ``.txt`` caption beside them.
- `table`: a CSV, TSV or parquet file with an image-path column and a caption column.
- `emoji`: Debian's fonts-noto-color-emoji rendered at 109 px (the only size of its
  bitmap strikes) on white, named by the PyPI `emoji` package, grouped by the Unicode
  emoji-test.txt groups (Debian's unicode-data).
- `fashion_mnist`: Debian's dataset-fashion-mnist, 60,000 + 10,000 images of 28x28,
  the class name as caption and the class index as label.
"""

from __future__ import annotations

import gzip
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bld_t2i.data.images import IMAGE_EXTS

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_FONT_SIZE = 109  # CBDT strikes exist at this size only
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_DATA = "/usr/share/unicode/emoji/emoji-data.txt"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Item:
    image: Image.Image | bytes  # bytes: an already-encoded file, stored unchanged
    caption: str
    meta: dict = field(default_factory=dict)
    ext: str = ""  # the file extension of `image` when it is bytes


@dataclass
class Skip:
    reason: str
    what: str


def folder(root: str) -> Iterator[Item | Skip]:
    """Images under `root` (recursively, sorted) with a same-named .txt caption."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"--input folder not found: {root}")
    for path in sorted(p for p in base.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        if not caption:
            yield Skip("missing_caption", str(path))
            continue
        yield Item(path.read_bytes(), caption, {"source": str(path.relative_to(base))}, path.suffix.lower().lstrip("."))


def table(file: str, image_col: str, caption_col: str) -> Iterator[Item | Skip]:
    """Rows of a CSV/TSV/parquet file; image paths are relative to the file's folder."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("the csv source reads tables with pandas: pip install 'bld_t2i[tables]'") from e

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--input table not found: {file}")
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, sep="\t" if path.suffix.lower() in (".tsv", ".tab") else ",", dtype=str,
                         keep_default_na=False)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in df.columns:
            raise KeyError(f"{file} has no column {col!r} ({flag}); its columns: {list(df.columns)}")
    for row in df.itertuples(index=False):
        rel, caption = str(getattr(row, image_col)), str(getattr(row, caption_col)).strip()
        image = path.parent / rel
        if not caption:
            yield Skip("missing_caption", rel)
        elif not image.is_file():
            yield Skip("missing_image", rel)
        else:
            yield Item(image.read_bytes(), caption, {"source": rel}, image.suffix.lower().lstrip("."))


# ----------------------------------------------------------------------------- emoji


def _emoji_groups() -> dict[str, tuple[str, str]]:
    """emoji-test.txt: code sequence -> (group, subgroup)."""
    if not os.path.isfile(EMOJI_TEST):
        raise FileNotFoundError(f"{EMOJI_TEST} not found: install Debian's unicode-data (make setup)")
    groups, group, subgroup = {}, "", ""
    for line in Path(EMOJI_TEST).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            seq = "".join(chr(int(cp, 16)) for cp in line.split(";")[0].split())
            groups[seq] = (group, subgroup)
    return groups


def _emoji_characters() -> list[str]:
    """Single code points shown as emoji by default: the Unicode `Emoji_Presentation`
    property (emoji-data.txt); plain `Emoji` would add text-style digits, # and *."""
    chars = []
    for line in Path(EMOJI_DATA).read_text(encoding="utf-8").splitlines():
        fields = line.split("#")[0].split(";")
        if len(fields) == 2 and fields[1].strip() == "Emoji_Presentation":
            lo, _, hi = fields[0].strip().partition("..")
            chars += [chr(c) for c in range(int(lo, 16), int(hi or lo, 16) + 1)]
    return chars


def _group_of(seq: str, groups: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """The emoji's group; for a sequence newer than the table, its longest listed prefix's."""
    for n in range(len(seq), 0, -1):
        if seq[:n] in groups:
            return groups[seq[:n]]
        if seq[:n] + "\ufe0f" in groups:
            return groups[seq[:n] + "\ufe0f"]
    first = seq[0]  # regional indicator letters: the parts of flags
    return next((g for s, g in groups.items() if s.startswith(first)), ("Symbols", "other-symbol"))


def emoji_names() -> list[tuple[str, str]]:
    """(emoji, caption): every fully-qualified emoji and component of the `emoji` package,
    and every emoji-presentation character it does not list (the regional indicator
    letters that flags are made of), named by Unicode."""
    try:
        import emoji
    except ImportError as e:
        raise ImportError("the emoji source needs the PyPI package emoji: pip install 'bld_t2i[demo]'") from e

    names = [(e, v["en"].strip(":").replace("_", " ")) for e, v in emoji.EMOJI_DATA.items()
             if v["status"] in (emoji.STATUS["fully_qualified"], emoji.STATUS["component"])]
    listed = {e.replace("\ufe0f", "") for e, _ in names} | {e.replace("\ufe0f", "") for e in emoji.EMOJI_DATA}
    for ch in _emoji_characters():
        if ch not in listed and unicodedata.name(ch, ""):
            names.append((ch, unicodedata.name(ch).lower()))
    return names


def emoji_images() -> Iterator[Item | Skip]:
    """Real emoji pictures: 136x136 on white, the font's own 136x128 glyph box centred."""
    from PIL import ImageDraw, ImageFont

    if not os.path.isfile(EMOJI_FONT):
        raise FileNotFoundError(f"{EMOJI_FONT} not found: install Debian's fonts-noto-color-emoji (make setup)")
    font = ImageFont.truetype(EMOJI_FONT, EMOJI_FONT_SIZE)
    groups = _emoji_groups()
    categories = sorted({g for g, _ in groups.values()})
    for seq, caption in emoji_names():
        glyph = Image.new("RGBA", (136, 136), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((0, 4), seq, font=font, embedded_color=True)
        # A sequence the font lacks draws nothing (.notdef is empty) or several glyphs.
        if glyph.getbbox() is None or font.getbbox(seq)[2] > 140:
            yield Skip("not_in_font", caption)
            continue
        image = Image.new("RGB", glyph.size, (255, 255, 255))
        image.paste(glyph, mask=glyph.getchannel("A"))
        group, subgroup = _group_of(seq, groups)
        meta = {"emoji": seq, "codepoints": " ".join(f"U+{ord(c):04X}" for c in seq),
                "category": group, "subcategory": subgroup, "label": categories.index(group)}
        yield Item(image, caption, meta)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a 4-byte magic."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> Iterator[Item | Skip]:
    root = Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install Debian's dataset-fashion-mnist (make setup)")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        for i, (pixels, label) in enumerate(zip(images, labels)):
            yield Item(Image.fromarray(pixels, "L"), FASHION_MNIST_CLASSES[label],
                       {"label": int(label), "split": split, "index": i})
