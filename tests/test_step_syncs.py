"""The denoiser's training step without host syncs: on a CUDA device the step runs under
torch.cuda.set_sync_debug_mode("error"), which raises at any call that waits for the device
(a blocking copy, .item(), a bincount's range read, a tensor built from a host list). GPU
only; the CPU tests count the loop's collectives and host reads instead
(test_train_precision.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from t2i_fixtures import ROOT, free_port, train_env

STEP = r'''
import json
import numpy as np
import torch
from bld_t2i import distributed as D
from bld_t2i.config import Config
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.training.loop import _Stats
from bld_t2i.training.schedule import step_generator
from bld_t2i.training.t2i import T2ITask, null_condition_text, optimizer_for

device = torch.device("cuda", 0)
cfg = Config()
cfg.denoiser.preset, cfg.denoiser.conditioning = "tiny", "cross_attn"
cfg.latents.use_embeddings, cfg.text_encoder.max_length = True, 8
cfg.train.precision, cfg.train.zero_stage, cfg.train.grad_accum = "bf16", 2, 2
torch.manual_seed(0)
model = Denoiser(cfg.denoiser, (8, 8, 16), 32).to(device)
n = sum(p.numel() for p in model.parameters())
engine = D.build_engine(model, optimizer_for(model, cfg), D.deepspeed_config(cfg.train, 4, 2, 1.0, n))
task = T2ITask()
task.attach(cfg, device, engine, null_condition_text(None, torch.zeros(8, 32, dtype=torch.float16), device))
bits = np.random.default_rng(0).random((4, 8 * 8 * 16)) < 0.5
batch = {"packed": torch.from_numpy(np.packbits(bits, axis=1)).pin_memory(), "grid": (8, 8),
         "emb": torch.randn(4, 8, 32).half().pin_memory(), "emb_mask": torch.ones(4, 8, dtype=torch.bool).pin_memory()}


def unchecked(fn):  # DeepSpeed's own backward and step read the host by design (overflow check, norm)
    def run(*args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return run


engine.backward, engine.step, engine.was_step_applied = map(unchecked, (engine.backward, engine.step,
                                                                       engine.was_step_applied))
stats, flag = _Stats(), D.StopFlag(device)
for samples in range(0, 24, 4):  # the first two micro-steps warm up (allocations, kernels)
    checked = samples >= 8
    torch.cuda.set_sync_debug_mode("error" if checked else 0)
    g = step_generator(0, 0, samples, device)
    step_stats, applied = task.train_step(None, batch, g, samples, samples % 8 == 4, None)
    stats.add(step_stats)
    flag.poll()
torch.cuda.set_sync_debug_mode(0)
print("RESULT " + json.dumps(stats.reduce()))
'''


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_step_makes_no_host_sync_outside_deepspeed():
    env = {**train_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", STEP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert 0 < stats["loss"] < 10 and any(k.startswith("loss_t") for k in stats)
