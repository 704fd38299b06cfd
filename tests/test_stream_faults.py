"""Storage faults against a real moto S3 server that the tests stop and start, and the
shard formats and specs beyond brace-expanded .tar: .tar.gz/.tgz and globs."""

from __future__ import annotations

import gzip
import re
import threading
import time
from collections import Counter

import pytest

from bld_t2i.checkpoint import atomic_write_bytes
from bld_t2i.config import DataConfig
from bld_t2i.data.images import image_loader
from bld_t2i.data.plan import epoch_shards
from bld_t2i.data.shards import expand_urls

from t2i_fixtures import free_port

KEYS = [f"s{s}-{i:04d}" for s in range(6) for i in range(10)]


class RestartableS3:
    """moto's S3 on a fixed 127.0.0.1 port. `stop` closes the port (connections are refused, as
    from a storage endpoint that went down); `start` opens it again with every object kept
    (moto's backend lives in this process)."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        class OneRequestPerConnection(MotoRequestHandler):
            # Kept-alive connections would let a stopped server go on answering.
            protocol_version = "HTTP/1.0"

        self.handler = OneRequestPerConnection
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self._server = None

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        port = int(self.endpoint.rsplit(":", 1)[1])
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", port, app, threaded=True, request_handler=self.handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def s3():
    """(server, bucket URL), the AWS_* environment pointing at it with botocore's own retries
    off, so an outage reaches the loader's retries at once."""
    import s3fs

    server = RestartableS3()
    server.start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another endpoint must not be reused
        s3fs.S3FileSystem().mkdir("faults")
        yield server, "s3://faults"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def shards(s3, write_image_shards, request):
    """Six image shards of ten samples in a folder of their own on the server."""
    _, bucket = s3
    return write_image_shards(f"{bucket}/{request.node.name}", num_shards=6, per_shard=10, size=8)


def config(spec: str, **retry) -> DataConfig:
    return DataConfig(shards=spec, image_size=8, batch_size=4, num_workers=0, shuffle_window=5, **retry)


def test_outage_within_the_retry_budget_loses_no_sample(s3, write_image_shards, caplog):
    server, bucket = s3
    # 2.4 MB shards: s3fs has read ahead 2 MiB when the outage starts, so a read fails mid-shard
    # and the reader must reopen it at the end of the last whole sample.
    spec = write_image_shards(f"{bucket}/big", num_shards=2, per_shard=12, size=256)
    loader = image_loader(config(spec, read_retries=8, retry_backoff_s=0.1, retry_max_backoff_s=0.4), seed=0,
                          finite=True)
    keys = next(loader)["key"]
    server.stop()
    restart = threading.Timer(1.0, server.start)  # well inside 0.1 + 0.2 + 0.4 x 6 s of retries
    restart.start()
    with caplog.at_level("WARNING", logger="bld_t2i.data"):
        keys += [key for batch in loader for key in batch["key"]]
    restart.join()
    assert re.search(r"read error in s3://faults/big/img-00000\d.tar at byte [1-9]\d*.*retry 1 of 8", caplog.text)
    assert Counter(keys) == Counter(f"s{s}-{i:04d}" for s in range(2) for i in range(12))
    assert loader.skipped() == {} and loader.failed_shards() == []


def test_outage_for_good_skips_counts_and_errors_when_nothing_is_left(s3, shards):
    server, _ = s3
    retry = dict(read_retries=2, retry_backoff_s=0.01, retry_max_backoff_s=0.02)
    finite = image_loader(config(shards, **retry), seed=0, finite=True)
    endless = image_loader(config(shards, **retry), seed=0)
    keys = next(finite)["key"] + next(endless)["key"]  # both have opened (and buffered) their first shard
    server.stop()
    try:
        keys += [key for batch in finite for key in batch["key"]]
        first, *rest = epoch_shards(expand_urls(shards), 0, 0, 0, 1, False)
        assert set(keys) == {f"s{expand_urls(shards).index(first)}-{i:04d}" for i in range(10)}
        assert finite.skipped() == {"read_error": 5}
        assert finite.failed_shards() == [(url, "read_error") for url in rest]
        # The endless loader gives what it buffered of its first shard, then meets an epoch with
        # nothing to read: only then an error, naming the failed shards.
        next(endless)
        with pytest.raises(RuntimeError, match=r"no usable sample \(skipped: \{'read_error': 11\}\).*read_error"):
            next(endless)
    finally:
        server.start()


def test_a_shard_gone_mid_run_is_skipped_without_retries(s3, shards, caplog):
    import s3fs

    loader = image_loader(config(shards, retry_backoff_s=30.0), seed=0, finite=True)  # a retry would time out
    workers = image_loader(DataConfig(shards=shards, image_size=8, batch_size=4, num_workers=2), seed=0, finite=True)
    gone = expand_urls(shards)[3]
    s3fs.S3FileSystem().rm(gone)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="bld_t2i.data"):
        keys = [key for batch in loader for key in batch["key"]]
    assert time.monotonic() - start < 10 and "retry" not in caplog.text and f"skipping shard {gone}" in caplog.text
    assert Counter(keys) == Counter(k for k in KEYS if not k.startswith("s3-"))
    assert loader.skipped() == {"missing_shard": 1} and loader.failed_shards() == [(gone, "missing_shard")]
    # The same from DataLoader worker processes: the failure travels with the batches.
    assert Counter(key for batch in workers for key in batch["key"]) == Counter(keys)
    assert workers.skipped() == {"missing_shard": 1} and workers.failed_shards() == [(gone, "missing_shard")]


def test_tar_gz_shards_and_glob_specs_read_and_resume_through_s3(s3, tmp_path, write_image_shards):
    _, bucket = s3
    local = expand_urls(write_image_shards(str(tmp_path), num_shards=3, per_shard=10, size=8))
    for url, name in zip(local, ["img-000000.tar.gz", "img-000001.tgz", "img-000002.tar"]):
        data = open(url, "rb").read()
        atomic_write_bytes(f"{bucket}/gz/{name}", data if name.endswith(".tar") else gzip.compress(data))
    spec = f"{bucket}/gz/*.t*gz::{bucket}/gz/img-00000[2].tar"
    assert expand_urls(spec) == [f"{bucket}/gz/img-000000.tar.gz", f"{bucket}/gz/img-000001.tgz",
                                 f"{bucket}/gz/img-000002.tar"]
    keys = [key for batch in image_loader(config(spec), seed=0, finite=True) for key in batch["key"]]
    assert Counter(keys) == Counter(KEYS[:30])

    straight = image_loader(config(spec), seed=1)
    expected = [next(straight)["key"] for _ in range(6)]
    first = image_loader(config(spec), seed=1)
    head = [next(first)["key"] for _ in range(2)]
    resumed = image_loader(config(spec), seed=1)
    resumed.load_state_dict([first.state_dict()])  # seeks inside the decompressed tar stream
    assert head + [next(resumed)["key"] for _ in range(4)] == expected
    with pytest.raises(FileNotFoundError, match=r"no shard matches 's3://faults/gz/\*.tar.zst'"):
        expand_urls(f"{bucket}/gz/*.tar.zst::{spec}")


def test_broken_gzip_shards_are_counted_as_format_errors(tmp_path, write_image_shards):
    whole, cut = (open(u, "rb").read() for u in expand_urls(write_image_shards(str(tmp_path / "src"), 2, 10, 8)))
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(whole))
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(cut)[:2000])  # the compressed stream ends early
    (tmp_path / "c.tgz").write_bytes(b"not gzip at all " * 64)
    loader = image_loader(config(str(tmp_path / "*.t*gz"), read_retries=0), seed=0, finite=True)
    keys = [key for batch in loader for key in batch["key"]]
    assert set(KEYS[:10]) <= set(keys) <= set(KEYS[:20])
    assert loader.skipped() == {"truncated_gzip": 1, "corrupt_gzip": 1} and loader.failed_shards() == []
