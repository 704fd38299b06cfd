"""The fault catalogue: image and latent shards damaged the ways shards get damaged (header
fields, names, sizes, compression, each member type, whole-file garbage) and a seeded
header-corruption fuzz. One shard of four is damaged per case; every read must end by itself,
deliver every sample of the three undamaged shards (each once, nothing invented) and count
the damage. The reads run in subprocesses under a memory limit (RLIMIT_AS) and a time limit,
many cases per subprocess; each reports its time and the process's peak memory.

Run a catalogue by hand: python tests/test_shard_damage.py image|latent|fuzz-image|fuzz-latent FOLDER
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter

import numpy as np

SHARDS, PER_SHARD, DAMAGED = 4, 6, 1  # shard 1 of 0..3 is the damaged one
MAX_MEMBER = 16 << 20  # the readers' max_member_bytes in these cases
MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of a case process: ~3.2 GiB of address space is torch's import
TIME_LIMIT_S = 240
FUZZ_CASES = 200  # per shard kind
# name, size, typeflag, magic and version, the first bytes of the ustar prefix
FIELD_BYTES = np.r_[0:100, 124:136, 156, 257:265, 345:360]
LATENT_SHAPE = (2, 2, 8)
EMB_WIDTH = 8
FINGERPRINT = "damage"


# ----------------------------------------------------------------------------- intact shards


def png(size: int = 8, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def image_sample(s: int, i: int) -> dict:
    key = f"s{s}-{i:04d}"
    return {"__key__": key, "png": png(seed=s * 100 + i), "txt": f"caption {key}".encode(),
            "json": json.dumps({"label": i % 3}).encode()}


def latent_sample(s: int, i: int) -> dict:
    from bld_t2i.data.latents import pack_bits

    key = f"s{s}-{i:04d}"
    rng = np.random.default_rng(s * 100 + i)
    bits = pack_bits(rng.random((1, *LATENT_SHAPE)) > 0.5)[0]
    return {"__key__": key, "bits": bits.tobytes(), "grid": b"[2, 2]", "txt": f"caption {key}".encode(),
            "json": json.dumps({"label": i % 3}).encode(),
            "emb.npy": npy(rng.standard_normal((3, EMB_WIDTH)).astype(np.float16))}


def tar_bytes(samples: list[dict], fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A WebDataset tar as Python's tarfile writes it (names may hold surrogate-escaped bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime = len(data), 0
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_samples(kind: str, s: int) -> list[dict]:
    make = image_sample if kind == "image" else latent_sample
    return [make(s, i) for i in range(PER_SHARD)]


def write_data_set(kind: str, folder: str) -> None:
    """The undamaged shards 0, 2, 3 (shard 1 is each case's), and a latent data set's manifest
    and null embedding."""
    from bld_t2i.data.latents import BIT_ORDER, FORMAT, MANIFEST, NULL_EMBEDDING, VERSION

    os.makedirs(folder, exist_ok=True)
    for s in range(SHARDS):
        if s != DAMAGED:
            with open(os.path.join(folder, f"{kind}-{s:06d}.tar"), "wb") as f:
                f.write(tar_bytes(shard_samples(kind, s)))
    if kind == "latent":
        manifest = {"format": FORMAT, "version": VERSION, "latent_shape": list(LATENT_SHAPE), "bit_order": BIT_ORDER,
                    "autoencoder_fingerprint": FINGERPRINT, "grids": {"2x2": SHARDS * PER_SHARD}}
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(manifest, f)
        with open(os.path.join(folder, NULL_EMBEDDING), "wb") as f:
            f.write(npy(np.zeros((1, EMB_WIDTH), np.float16)))


# ----------------------------------------------------------------------------- damage


def headers(data: bytes) -> list[tuple[int, str]]:
    """(offset, name) of every member header of an intact tar."""
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as t:
        return [(m.offset, m.name) for m in t.getmembers()]


def fix_checksum(data: bytearray, at: int) -> bytearray:
    header = data[at : at + 512]
    header[148:156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(header)
    return data


def set_field(data: bytes, at: int, start: int, value: bytes, checksum: bool = True) -> bytes:
    out = bytearray(data)
    out[at + start : at + start + len(value)] = value
    return bytes(fix_checksum(out, at) if checksum else out)


def member(data: bytes, ext: str, sample: int = 2) -> int:
    """The header offset of the member `ext` of the shard's `sample`-th sample."""
    return next(o for o, n in headers(data) if n == f"s{DAMAGED}-{sample:04d}.{ext}")


def with_member(kind: str, ext: str, value: bytes | None, sample: int = 2) -> bytes:
    """The damaged shard with one member of one sample replaced (None: left out)."""
    samples = shard_samples(kind, DAMAGED)
    if value is None:
        del samples[sample][ext]
    else:
        samples[sample][ext] = value
    return tar_bytes(samples)


def base256(n: int) -> bytes:
    return b"\x80" + n.to_bytes(11, "big")


def gzip_member_bomb(declared: int) -> bytes:
    """A .tar.gz of one member that declares `declared` bytes and holds that many zeros:
    a few KiB on disk."""
    info = tarfile.TarInfo("s1-0000.png")
    info.size = declared
    header = info.tobuf(tarfile.USTAR_FORMAT)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    parts, zeros = [z.compress(header)], bytes(1 << 20)
    for _ in range(declared >> 20):
        parts.append(z.compress(zeros))
    return b"".join(parts) + z.flush()


def png_bomb() -> bytes:
    """A PNG header declaring 100000 x 100000 pixels (PIL's decompression-bomb check)."""
    ihdr = (100000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def common_cases(kind: str) -> dict[str, tuple]:
    """name -> (shard file name, damaged bytes (a function of the intact ones), accepted skip reasons).
    The damage every shard can have: headers, names, sizes, cuts, compression, garbage."""
    tar = f"{kind}-{DAMAGED:06d}.tar"
    first = lambda d, ext="txt": member(d, ext)  # noqa: E731 - a header of the third sample
    long = "s1-0002" + "x" * 120  # a GNU long name (over ustar's 100 bytes)
    return {
        "checksum_wrong": (tar, lambda d: set_field(d, first(d), 136, b"77777777777", checksum=False),
                           ("corrupt_tar",)),
        "magic_garbled": (tar, lambda d: set_field(d, first(d), 257, b"xxxxx"), ("corrupt_tar",)),
        "size_not_octal": (tar, lambda d: set_field(d, first(d), 124, b"9z9z9z9z9z9\0"), ("corrupt_tar",)),
        "size_negative_base256": (tar, lambda d: set_field(d, first(d), 124, b"\xff" * 12), ("corrupt_tar",)),
        "size_negative_octal": (tar, lambda d: set_field(d, first(d), 124, b"-0000000001\0"), ("corrupt_tar",)),
        "size_8_gib_base256": (tar, lambda d: set_field(d, first(d), 124, base256(8 << 30)), ("oversized_member",)),
        "size_2_pow_88_base256": (tar, lambda d: set_field(d, first(d), 124, b"\x80" + b"\xff" * 11),
                                  ("oversized_member",)),
        "size_past_end_of_file": (tar, lambda d: set_field(d, first(d), 124, b"%011o\0" % (MAX_MEMBER - 1)),
                                  ("truncated_tar",)),
        "size_a_bit_too_large": (tar, lambda d: set_field(d, first(d), 124, b"%011o\0" % 4000),
                                 ("corrupt_tar", "truncated_tar")),
        "size_zero_before_data": (tar, lambda d: set_field(d, first(d), 124, b"%011o\0" % 0), ("corrupt_tar",)),
        "name_not_utf8": (tar, lambda d: set_field(d, first(d), 0, b"s1-0002\xff\xfe.txt\0"), ("undecodable_name",)),
        "long_name_not_utf8": (tar, lambda _: tar_bytes([{**s, "__key__": long + "\udcff"} if i == 2 else s
                                                         for i, s in enumerate(shard_samples(kind, DAMAGED))],
                                                        tarfile.GNU_FORMAT), ("undecodable_name",)),
        "long_name_header_huge": (tar, lambda d: _long_name_huge(d), ("oversized_member",)),
        "pax_header_huge": (tar, lambda d: _pax_huge(d), ("oversized_member",)),
        "typeflag_unknown": (tar, lambda d: set_field(d, first(d, _first_ext(kind)), 156, b"Z"),
                             ("corrupt_bits", "missing_image")),
        "name_path_traversal": (tar, lambda d: set_field(d, first(d), 0, b"../../../etc/passwd.txt\0"),
                                ("missing_image", "missing_caption", "corrupt_bits")),
        "cut_in_member_data": (tar, lambda d: d[: first(d) + 512 + 5], ("truncated_tar",)),
        "cut_in_header": (tar, lambda d: d[: first(d) + 100], ("truncated_tar",)),
        "empty_file": (tar, lambda _: b"", ("empty_shard",)),
        "garbage_file": (tar, lambda _: np.random.default_rng(1).bytes(20_000), ("corrupt_tar",)),
        "garbage_after_two_samples": (tar, lambda d: d[: member(d, _first_ext(kind))] + b"\x01" * 4096,
                                      ("corrupt_tar",)),
        "gzip_cut": (f"{kind}-{DAMAGED:06d}.tar.gz", lambda d: gzip.compress(d)[:700], ("truncated_gzip",)),
        "gzip_garbled": (f"{kind}-{DAMAGED:06d}.tar.gz", lambda d: _garble_gzip(gzip.compress(d)),
                         ("corrupt_gzip", "corrupt_tar")),
        "gzip_not_gzip": (f"{kind}-{DAMAGED:06d}.tgz", lambda d: b"not gzip " * 100, ("corrupt_gzip",)),
        "gzip_member_inflates_to_64_mib": (f"{kind}-{DAMAGED:06d}.tar.gz", lambda _: gzip_member_bomb(64 << 20),
                                           ("oversized_member",)),
    }


def _first_ext(kind: str) -> str:
    return "png" if kind == "image" else "bits"


def _long_name_huge(data: bytes) -> bytes:
    """A GNU long-name header ("L") that declares 1 GiB of name before the third sample."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 30
    at = member(data, _first_ext_of(data))
    return data[:at] + info.tobuf(tarfile.GNU_FORMAT) + data[at:]


def _pax_huge(data: bytes) -> bytes:
    info = tarfile.TarInfo("pax")
    info.type, info.size = tarfile.XHDTYPE, 10 << 20
    at = member(data, _first_ext_of(data))
    return data[:at] + info.tobuf(tarfile.USTAR_FORMAT) + data[at:]


def _first_ext_of(data: bytes) -> str:
    return headers(data)[0][1].split(".", 1)[1]


def _garble_gzip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2 : len(out) // 2 + 64] = bytes(64)
    return bytes(out)


def image_cases() -> dict:
    cases = common_cases("image")
    tar = f"image-{DAMAGED:06d}.tar"
    for name, value, reasons in [
        ("png_garbage", b"\x89PNG garbage" * 10, ("corrupt_image",)),
        ("png_cut", png(64)[:200], ("truncated_image", "corrupt_image")),
        ("png_zero_bytes", b"", ("zero_byte",)),
        ("png_bomb_dimensions", png_bomb(), ("corrupt_image",)),
        ("eps_under_png_name", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", ("corrupt_image",)),
        ("png_missing", None, ("missing_image",)),
        ("txt_missing", ("txt", None), ("missing_caption",)),
        ("json_a_list", ("json", b"[1, 2]"), ("corrupt_json",)),
        ("json_not_utf8", ("json", b'{"label": "\xff"}'), ("corrupt_json",)),
        ("json_nested_100k", ("json", deep_json()), ("corrupt_json",)),
        ("json_truncated", ("json", b'{"label": '), ("corrupt_json",)),
    ]:
        ext, value = value if isinstance(value, tuple) else ("png", value)
        cases[name] = (tar, lambda _, ext=ext, value=value: with_member("image", ext, value), reasons)
    return cases


def latent_cases() -> dict:
    cases = common_cases("latent")
    tar = f"latent-{DAMAGED:06d}.tar"
    wrong_width = npy(np.zeros((3, EMB_WIDTH + 1), np.float16))
    for name, ext, value, reasons in [
        ("json_a_list", "json", b"[1, 2]", ("corrupt_json",)),
        ("json_a_string", "json", b'"label"', ("corrupt_json",)),
        ("json_nested_100k", "json", deep_json(), ("corrupt_json",)),
        ("emb_not_npy", "emb.npy", b"not an array", ("corrupt_embedding",)),
        ("emb_wrong_width", "emb.npy", wrong_width, ("corrupt_embedding",)),
        ("emb_one_dimensional", "emb.npy", npy(np.zeros(EMB_WIDTH, np.float16)), ("corrupt_embedding",)),
        ("emb_float64", "emb.npy", npy(np.zeros((3, EMB_WIDTH))), ("corrupt_embedding",)),
        ("emb_no_rows", "emb.npy", npy(np.zeros((0, EMB_WIDTH), np.float16)), ("corrupt_embedding",)),
        ("emb_pickled_object", "emb.npy", npy(np.array([{"a": 1}], dtype=object)), ("corrupt_embedding",)),
        ("emb_header_cut", "emb.npy", npy(np.zeros((3, EMB_WIDTH), np.float16))[:20], ("corrupt_embedding",)),
        ("emb_missing", "emb.npy", None, ("missing_embedding",)),
        ("bits_short", "bits", b"\x01", ("corrupt_bits",)),
        ("bits_missing", "bits", None, ("corrupt_bits",)),
        ("grid_booleans", "grid", b"[true, true]", ("corrupt_grid",)),
        ("grid_not_in_manifest", "grid", b"[1, 4]", ("unknown_grid",)),
        ("grid_three_numbers", "grid", b"[2, 2, 2]", ("corrupt_grid",)),
        ("grid_an_object", "grid", b'{"h": 2, "w": 2}', ("corrupt_grid",)),
        ("grid_huge", "grid", b"[100000000, 100000000]", ("unknown_grid",)),
    ]:
        cases[name] = (tar, lambda _, ext=ext, value=value: with_member("latent", ext, value), reasons)
    return cases


def fuzz_cases(kind: str, seed: int) -> dict:
    """Seeded random header corruption: 1 to 4 random bytes of one random member header set to
    random values; in half of the cases bytes of the interpreted fields, with the checksum made
    right again (so that the parsing behind the checksum is reached)."""
    tar = f"{kind}-{DAMAGED:06d}.tar"
    intact = tar_bytes(shard_samples(kind, DAMAGED))
    offsets = [o for o, _ in headers(intact)]
    rng = np.random.default_rng(seed)
    cases = {}
    for n in range(FUZZ_CASES):
        at = int(rng.choice(offsets))
        out = bytearray(intact)
        # checksum made right: bytes of the fields a reader interprets; else any byte of the header
        where = FIELD_BYTES if n % 2 else np.arange(512)
        for _ in range(int(rng.integers(1, 5))):
            out[at + int(rng.choice(where))] = int(rng.integers(0, 256))
        if n % 2:
            out = fix_checksum(out, at)
        cases[f"fuzz_{n:03d}"] = (tar, lambda _, data=bytes(out): data, None)  # None: any reason, or none
    return cases


# ----------------------------------------------------------------------------- one case process


def read_all(kind: str, folder: str) -> tuple[list[str], dict]:
    """Every key the finite loader delivers, and its skip counts."""
    if kind == "image":
        from bld_t2i.config import DataConfig
        from bld_t2i.data.images import image_loader

        cfg = DataConfig(shards=f"{folder}/image-*", image_size=8, batch_size=4, num_workers=0, shuffle_window=4,
                         read_retries=0, max_member_bytes=MAX_MEMBER, max_skip_fraction=1.0)
        loader = image_loader(cfg, seed=0, finite=True)
    else:
        from bld_t2i.config import LatentsConfig
        from bld_t2i.data.latents import latent_loader

        cfg = LatentsConfig(shards=f"{folder}/latent-*", batch_size=4, num_workers=0, shuffle_window=4,
                            read_retries=0, max_member_bytes=MAX_MEMBER, max_skip_fraction=1.0, use_embeddings=True)
        loader = latent_loader(cfg, 0, FINGERPRINT, LATENT_SHAPE, finite=True)
    keys = [key for batch in loader for key in batch["key"]]
    return keys, loader.skipped()


def run_cases(which: str, folder: str) -> None:
    """Writes one JSON line per case to stdout: its name, keys, skips, seconds and peak RSS."""
    kind = which.split("-")[-1]
    cases = {"image": image_cases, "latent": latent_cases}[which]() if "fuzz" not in which else \
        fuzz_cases(kind, seed=29 if kind == "image" else 30)
    write_data_set(kind, folder)
    intact = tar_bytes(shard_samples(kind, DAMAGED))
    for name, (file, damage, reasons) in cases.items():
        for stale in os.listdir(folder):
            if stale.startswith(f"{kind}-{DAMAGED:06d}"):
                os.remove(os.path.join(folder, stale))
        with open(os.path.join(folder, file), "wb") as f:
            f.write(damage(intact))
        start = time.monotonic()
        keys, skipped = read_all(kind, folder)
        print(json.dumps({"case": name, "keys": keys, "skipped": skipped, "reasons": reasons,
                          "seconds": time.monotonic() - start,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_catalogue(which: str, folder) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), which, str(folder)], capture_output=True,
                          text=True, timeout=TIME_LIMIT_S, preexec_fn=limited, env=env)
    assert proc.returncode == 0, f"the {which} catalogue's process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def check(results: list[dict], kind: str, expected_cases: int) -> None:
    everything = {f"s{s}-{i:04d}" for s in range(SHARDS) for i in range(PER_SHARD)}
    undamaged = {k for k in everything if not k.startswith(f"s{DAMAGED}-")}
    assert len(results) == expected_cases
    for r in results:
        keys, skipped, case = Counter(r["keys"]), r["skipped"], f"{kind} case {r['case']}"
        assert undamaged <= set(keys), f"{case} lost undamaged samples: {sorted(undamaged - set(keys))}"
        assert set(keys) <= everything and max(keys.values()) == 1, f"{case} delivered {keys}"
        if r["reasons"] is None:  # the fuzz: damage that no reader can see leaves every sample whole
            assert skipped or set(keys) == everything, f"{case}: samples lost without a count"
        else:
            assert set(skipped) & set(r["reasons"]), f"{case}: skipped {skipped}, expected one of {r['reasons']}"
            assert set(keys) != everything, f"{case}: nothing was lost"
    worst = max(results, key=lambda r: r["seconds"])
    print(f"{kind}: {len(results)} cases, worst {worst['case']} {worst['seconds']:.2f} s, "
          f"peak RSS {max(r['peak_rss_mib'] for r in results):.0f} MiB under RLIMIT_AS {MEMORY_LIMIT >> 20} MiB")


def test_image_shard_catalogue(tmp_path):
    check(run_catalogue("image", tmp_path), "image", len(image_cases()))


def test_latent_shard_catalogue(tmp_path):
    check(run_catalogue("latent", tmp_path), "latent", len(latent_cases()))


def test_header_fuzz_of_image_and_latent_shards(tmp_path):
    for kind in ("image", "latent"):
        check(run_catalogue(f"fuzz-{kind}", tmp_path / kind), f"fuzz {kind}", FUZZ_CASES)


def test_a_run_stops_when_more_than_max_skip_fraction_is_skipped(tmp_path):
    """One shard of four with no usable image: 25% of the samples are skipped. Under the
    default max_skip_fraction 0.1 the loader worker stops the run, naming the reasons; with 0.5
    it reads on and delivers the rest."""
    import pytest

    from bld_t2i.config import DataConfig
    from bld_t2i.data.images import image_loader

    write_data_set("image", str(tmp_path))
    (tmp_path / f"image-{DAMAGED:06d}.tar").write_bytes(
        tar_bytes([{**s, "png": b"\x89PNG not an image"} for s in shard_samples("image", DAMAGED)]))
    cfg = dict(shards=f"{tmp_path}/image-*", image_size=8, batch_size=2, shuffle_window=4, skip_check_after=12)
    with pytest.raises(RuntimeError, match=r"were skipped \(\d+\.\d%, more than max_skip_fraction 0.1\); "
                                           r"reasons: corrupt_image: \d"):
        list(image_loader(DataConfig(**cfg, num_workers=1), seed=0, finite=True))  # raised in the worker process
    loader = image_loader(DataConfig(**cfg, num_workers=0, max_skip_fraction=0.5), seed=0, finite=True)
    assert len([k for batch in loader for k in batch["key"]]) == (SHARDS - 1) * PER_SHARD
    assert loader.skipped() == {"corrupt_image": PER_SHARD}


if __name__ == "__main__":
    run_cases(sys.argv[1], sys.argv[2])
