"""The denoiser trainer's switches on 2 real CPU ranks: bf16 (EMA of the fp32 masters, ZeRO-2
and ZeRO-3), activation checkpointing and torch.compile against the plain fp32 run; and the
collectives and host syncs the loop itself issues per optimizer step."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bld_t2i.pipeline import BLDPipeline

from t2i_fixtures import ROOT, train_command, train_env

pytestmark = pytest.mark.slow
STEPS = 4
COUNTER = '''
import atexit, json, os, sys, traceback
import torch
import torch.distributed as dist
counts = {"collectives": 0, "item": 0}

def ours():  # called from bld_t2i's code, not from DeepSpeed's or torch's own
    files = [f.filename for f in traceback.extract_stack()[:-2]]
    return any("/bld_t2i/" in f for f in files) and not any("/deepspeed/" in f for f in files)

def wrap(owner, name, key):
    inner = getattr(owner, name)
    def counted(*args, **kwargs):
        if ours():
            counts[key] += 1
        return inner(*args, **kwargs)
    setattr(owner, name, counted)

for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object", "broadcast_object_list",
             "reduce_scatter", "all_to_all"):
    wrap(dist, name, "collectives")
wrap(torch.Tensor, "item", "item")
wrap(torch.Tensor, "tolist", "item")
if "LOCAL_RANK" in os.environ:  # a rank, not torchrun's agent
    atexit.register(lambda: open(os.environ["BLD_COUNT_FILE"] + os.environ.get("RANK", "0"), "w").write(json.dumps(counts)))
'''


def _train(out: Path, lat: str, ae: Path, *overrides: str, env: dict | None = None) -> dict[int, float]:
    proc = subprocess.run(train_command(2, out, lat, ae, f"train.max_steps={STEPS}", "train.total_samples=100000",
                                        "train.log_every_samples=16", "train.ckpt_every_samples=1000000", *overrides),
                          env=env or train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "stats.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_trains_and_its_ema_averages_the_fp32_masters(tmp_path, tiny_latents, tiny_ae, zero):
    # ema_decay 0: the EMA is the last master weights themselves; had it been fed from the
    # engine's bf16 module copies, every weight would be exactly representable in bf16
    losses = _train(tmp_path / "bf16", tiny_latents, tiny_ae, "train.precision=bf16", f"train.zero_stage={zero}",
                    "train.ema_decay=0.0")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    ema = load_file(str(tmp_path / "bf16" / "export" / "denoiser" / "model.safetensors"))
    weights = torch.cat([v.reshape(-1) for v in ema.values()])
    assert weights.dtype == torch.float32
    assert (weights.bfloat16().float() != weights).float().mean() > 0.5  # fp32 values, not rounded copies
    pipe = BLDPipeline.from_pretrained(tmp_path / "bf16" / "export", device="cpu")
    out = pipe(["a shirt"], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()


def test_activation_checkpointing_and_compile_give_the_same_losses(tmp_path, tiny_latents, tiny_ae):
    plain = _train(tmp_path / "plain", tiny_latents, tiny_ae)
    ckpt = _train(tmp_path / "ckpt", tiny_latents, tiny_ae, "denoiser.grad_checkpointing=true")
    compiled = _train(tmp_path / "compiled", tiny_latents, tiny_ae, "train.compile=true")
    for step in plain:
        assert abs(ckpt[step] - plain[step]) <= 1e-6, ("checkpointing", step, ckpt[step], plain[step])
        # inductor fuses and reorders float operations: equal to float32 rounding, not bit for bit
        assert abs(compiled[step] - plain[step]) <= 1e-4, ("compile", step, compiled[step], plain[step])


def test_the_loop_issues_at_most_one_collective_and_no_host_read_per_step(tmp_path, tiny_latents, tiny_ae):
    """Counted by wrapping torch.distributed and Tensor.item/tolist in both ranks: the difference
    between a 4-step and a 12-step run is what the extra 8 steps cost."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTER)

    def counts(name: str, steps: int, *overrides: str) -> dict:
        path = os.pathsep.join([str(site), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        env = {**train_env(), "PYTHONPATH": path,
               "BLD_COUNT_FILE": str(tmp_path / f"{name}.")}
        global STEPS
        STEPS = steps
        _train(tmp_path / name, tiny_latents, tiny_ae, "train.log_every_samples=1000000", *overrides, env=env)
        return json.loads((tmp_path / f"{name}.0").read_text())

    short, long = counts("short", 4), counts("long", 12)
    assert short["collectives"] > 0 and short["item"] > 0, short  # the wrappers see the loop's calls
    assert long["collectives"] - short["collectives"] <= 8, (short, long)  # the stop flag, once a step
    assert long["item"] == short["item"], (short, long)  # nothing read back to the host per step
    every4 = "train.stop_check_every_steps=4"
    short, long = counts("short4", 4, every4), counts("long4", 12, every4)
    assert long["collectives"] - short["collectives"] <= 2, (short, long)
