"""Write WebDataset image-caption shards plus a manifest.

    python data_tools/make_shards.py --source emoji --size 64 --out data/emoji64
    python data_tools/make_shards.py --source fashion-mnist --size 32 --out s3://bucket/fmnist32
    python data_tools/make_shards.py --source folder --input DIR --out OUT
    python data_tools/make_shards.py --source csv --input pairs.tsv --image-col path --caption-col text --out OUT

Every flag sets a field of the `shards` config section (`--recipe R`, `shards.key=value`
and `--dry-run` work too); the resolved section is saved as `<out>/make_shards.json`.
"""

from __future__ import annotations

import json

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import Flag, entry_config, to_sections
from bld_t2i.data.make_shards import make_shards
from bld_t2i.data.shards import join

FLAGS = [Flag("--source", "shards.source"), Flag("--input", "shards.input", "folder (folder) or table file (csv)"),
         Flag("--image-col", "shards.image_col"), Flag("--caption-col", "shards.caption_col"),
         Flag("--out", "shards.out", "local folder or s3:// URL"), Flag("--prefix", "shards.prefix"),
         Flag("--shard-size", "shards.shard_size"), Flag("--size", "shards.size", "square size; 0 keeps the source's"),
         Flag("--resize", "shards.resize"), Flag("--format", "shards.format"), Flag("--min-size", "shards.min_size"),
         Flag("--limit", "shards.limit"), Flag("--skip-caption", "shards.skip_caption", "caption regex to skip"),
         Flag("--contact-sheet", "shards.contact_sheet", "PNG of the first 256 images")]


def main(argv=None) -> None:
    cfg = entry_config(__doc__.split("\n")[0], ("shards",), FLAGS, argv, required=("shards.out",))
    if cfg is None:
        return
    manifest = make_shards(cfg.shards)
    resolved = json.dumps(to_sections(cfg, ("shards",)), indent=2).encode()
    atomic_write_bytes(join(cfg.shards.out, "make_shards.json"), resolved)
    print(f"{manifest['total']} samples in {len(manifest['shards'])} shard(s), skipped: {manifest['skipped']}")


if __name__ == "__main__":
    main()
