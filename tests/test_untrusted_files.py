"""Files from elsewhere (a shared or copied run folder, a model folder, the data) are read as
data, never run: no unpickling, sample keys made safe as file names, the report escaped, a
model folder's config checked against its weights before anything large is allocated."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import build_tiny_model, one_torch_thread, shared_root  # noqa: F401 (autouse fixture)

from bld_t2i.eval.generate import Setting
from bld_t2i.eval.neighbours import Neighbour, file_name
from bld_t2i.eval.report import render_report
from bld_t2i.eval.sheets import PromptRow
from bld_t2i.training.checkpointer import CLIENT, Checkpointer

SCRIPT = "<script>alert(1)</script>"


class Payload:
    """What a hostile client.pt holds: unpickling it runs `touch`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_unpickled(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step_000000001"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"trainer": {"step": 1}, "payload": Payload(str(marker))}, folder / CLIENT)
    (folder.parent / "latest").write_text(folder.name)
    with pytest.raises(RuntimeError, match=r"client.pt is unreadable or holds more than tensors and plain data"):
        Checkpointer(tmp_path / "run", keep=2).peek()
    assert not marker.exists()
    with open(folder / CLIENT, "wb") as f:  # a plain pickle (not torch.save) too
        pickle.dump({"payload": Payload(str(marker))}, f)
    with pytest.raises(RuntimeError, match="client.pt is unreadable"):
        Checkpointer(tmp_path / "run", keep=2).peek()
    assert not marker.exists()


@pytest.mark.parametrize("key", ["../../../escaped", "/etc/passwd", "a/b", "..", ".hidden", "x" * 300, "ok\x00nul",
                                 "\udcff\udcfe", "plain-key_01"])
def test_sample_keys_become_safe_file_names_inside_the_folder(tmp_path, key):
    n = Neighbour(key=key, caption="c", label=-1, shard="../../" + key + ".tar", distance=3, packed=b"")
    path = (tmp_path / n.thumbnail).resolve()
    assert path.is_relative_to(tmp_path / "neighbours") and len(path.name) < 120 and "\x00" not in str(path)
    assert not path.name.startswith(".") and path.parent.parent == tmp_path / "neighbours"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"png")  # a real file name on this filesystem
    assert file_name(key) == (key if key == "plain-key_01" else file_name(key))
    assert file_name("a/b") != file_name("a_b")  # made-safe names of distinct keys stay distinct


def test_every_field_of_the_report_is_escaped():
    setting = Setting(steps=4, guidance=3.0, temperature=1.0)
    row = PromptRow(id=SCRIPT, prompt=SCRIPT, category=SCRIPT, seed=None, line=1)
    report = {
        "model": SCRIPT, "sheet": SCRIPT, "seed": SCRIPT, "latent_bits": SCRIPT, "conditioning": SCRIPT,
        "skipped": {SCRIPT: SCRIPT},
        "settings": [{"setting": setting.name, "steps": SCRIPT, "guidance": SCRIPT, "temperature": SCRIPT,
                      "images": SCRIPT, "guidance_interval": [SCRIPT, SCRIPT], "diversity": SCRIPT,
                      "seen_prompts": SCRIPT, "bit_rate_diff_mean": SCRIPT}],
        "classifier": {"path": SCRIPT, "images": SCRIPT, "shards": SCRIPT, "accuracy": SCRIPT,
                       "reconstructed_accuracy": SCRIPT},  # a classifier folder's config.json, as read
        "reuse": {"fid": {"text": SCRIPT}},
        "timing_by_steps": {"4": {"generation_s_per_sample": SCRIPT, "decode_s_per_sample": SCRIPT,
                                  "samples_timed": SCRIPT}},
        "prompts": [{"id": SCRIPT, "diversity": {setting.name: SCRIPT}, "clip_score": {setting.name: SCRIPT},
                     "class_accuracy": {setting.name: SCRIPT}}],
        "inpainting": {"image": SCRIPT, "mask": SCRIPT, "kept_cells": SCRIPT, "cells": SCRIPT,
                       "settings": {setting.name: {"known_bits_kept": SCRIPT}}},
    }
    neighbour = {"key": SCRIPT, "caption": SCRIPT, "label": 1, "shard": SCRIPT, "distance": SCRIPT,
                 "image": SCRIPT}
    page = render_report(report, [row], [setting], 1, {"hamming": {setting.name: {SCRIPT: [[neighbour]]}}})
    assert "<script" not in page.lower() and page.count("&lt;script&gt;") >= 30


HUGE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from bld_t2i.pipeline import BLDPipeline
try:
    BLDPipeline.from_pretrained(sys.argv[1], device="cpu")
except ValueError as e:
    print("refused:", e)
print("peak rss MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_config_asking_for_a_huge_model_is_refused_before_it_allocates(tmp_path, tmp_path_factory):
    """denoiser/config.json edited to 8 x 4096 (1.6G parameters, 6 GiB) over the tiny model's weights:
    refused naming the weights, under a memory limit far below what the model would take."""
    from bld_t2i.pipeline import BLDPipeline

    folder = BLDPipeline.from_pretrained(build_tiny_model(shared_root(tmp_path_factory)), device="cpu") \
        .save_pretrained(tmp_path / "export")
    config = folder / "denoiser" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "depth": 8, "width": 4096, "heads": 8}))
    limit = 5 << 30  # torch's import alone reserves about 3.3 GiB of address space
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", HUGE.format(limit=limit), str(folder)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"refused: {folder / 'denoiser' / 'model.safetensors'} does not fit the architecture" in proc.stdout
