"""The trainer through a storage outage: latents on a real moto S3 server on 127.0.0.1 that the
test stops mid-epoch and starts again within the loader's retry budget. Training finishes, and
every sample of the epoch is delivered exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from test_stream_faults import RestartableS3

from t2i_fixtures import N_IMAGES, train_command, train_env

pytestmark = pytest.mark.slow


def test_training_rides_out_a_storage_outage_without_losing_a_sample(tmp_path, tiny_latents, tiny_ae):
    import s3fs

    server = RestartableS3()
    server.start()
    env = {**train_env(), "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: the outage reaches the loader's at once
    try:
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir("outage")
        folder = Path(tiny_latents.split("/latents-")[0])
        for f in folder.iterdir():
            if f.is_file():
                fs.put_file(str(f), f"outage/latents/{f.name}")
        out = tmp_path / "run"
        # batch 2: a loader worker reaches its second shard only ~30 steps in, well after the outage starts
        cmd = train_command(2, out, "s3://outage/latents/latents-{000000..000003}.tar", tiny_ae,
                            f"train.total_samples={N_IMAGES}", "latents.batch_size=2", "train.log_every_samples=4",
                            "log.sample_keys=true", "latents.read_retries=8", "latents.retry_backoff_s=0.5",
                            "latents.retry_max_backoff_s=2")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stats = out / "stats.jsonl"
        deadline = time.time() + 300
        while not (stats.exists() and stats.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.05)
        server.stop()  # mid-epoch: the first step is logged
        time.sleep(4.0)  # inside 0.5 + 1 + 2 x 6 s of retries
        server.start()
        log = proc.communicate(timeout=300)[0]
    finally:
        if server._server is not None:
            server.stop()
    assert proc.returncode == 0, log[-5000:]
    assert "read error in s3://outage/latents/latents-0000" in log, log[-3000:]  # the outage was met and retried
    last = json.loads(stats.read_text().splitlines()[-1])
    assert last["samples"] == N_IMAGES and not [k for k in last if k.startswith("data/skipped_")], last
    keys = Counter(k for p in (out / "sample_keys").glob("rank*.txt") for line in p.read_text().splitlines()
                   for k in line.split()[1:])
    assert len(keys) == N_IMAGES and set(keys.values()) == {1}, keys.most_common(3)
    assert os.path.isfile(out / "export" / "denoiser" / "model.safetensors")
