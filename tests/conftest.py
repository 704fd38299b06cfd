"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("t2i_fixtures")  # imported here before pytest_plugins loads it

from t2i_fixtures import free_port  # noqa: E402


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 server (moto) on 127.0.0.1; s3fs/boto reach it through the AWS_* env.

    Yields the endpoint URL. The environment is set for the whole session, so DataLoader
    workers and subprocesses started by tests inherit it.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _png(rng, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def write_image_shards():
    """write(folder, num_shards, per_shard, size=16, prefix="img") -> brace spec of new
    image shards; sample keys are "s{shard}-{i}", captions "caption {key}", labels i % 3."""
    import json

    import numpy as np

    from bld_t2i.data.shards import TarShardWriter, join

    def write(folder: str, num_shards: int, per_shard: int, size: int = 16, prefix: str = "img") -> str:
        rng = np.random.default_rng(0)
        for s in range(num_shards):
            with TarShardWriter(join(folder, f"{prefix}-{s:06d}.tar")) as w:
                for i in range(per_shard):
                    key = f"s{s}-{i:04d}"
                    w.write({"__key__": key, "png": _png(rng, size), "txt": f"caption {key}".encode(),
                             "json": json.dumps({"label": i % 3}).encode()})
        return join(folder, f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")

    return write
pytest_plugins = ["t2i_fixtures"]


@pytest.fixture(scope="session")
def load_tool():
    """load_tool(name) -> the module data_tools/{name}.py (scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = os.path.join(os.path.dirname(__file__), "..", "data_tools", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
