"""bf16 that gives float32's answers where it matters: the autoencoder's stored code and its
Bernoulli draw, t/T into the denoiser in training and in sampling, and gradients reduced and
accumulated in float32, read back from real DeepSpeed engines (ZeRO 1, 2, 3) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bld_t2i import distributed as D
from bld_t2i.config import AutoencoderConfig, Config
from bld_t2i.models.binary_ae import BinaryAutoencoder
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.pipeline import BLDPipeline
from bld_t2i.training.t2i import T2ITask

from t2i_fixtures import ROOT, free_port, train_env


def _tiny_ae() -> BinaryAutoencoder:
    torch.manual_seed(0)
    return BinaryAutoencoder.from_config(AutoencoderConfig(preset="ae64-tiny")).eval()


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_bf16_autocast_encoding_gives_the_float32_code_exactly():
    ae, x = _tiny_ae(), _images()
    code = ae.encode(x)  # (8, 8, 8, 16) bool
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ae.encode(x), code)
        before = ae.to_logits(ae.encoder(x))  # what encoding computed before: bf16 logits, then a bf16 sigmoid
    # The comparison above has something to catch: the old bf16 path flips a share of this code.
    assert before.dtype == torch.bfloat16 and 0.3 < code.float().mean() < 0.7
    assert ((torch.sigmoid(before) > 0.5).permute(0, 2, 3, 1) != code).float().mean() > 0.002


def test_bf16_training_pass_draws_float32_uniforms_against_float32_probabilities():
    ae, x = _tiny_ae(), _images(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(x, generator=torch.Generator().manual_seed(3))
        det = ae(x, deterministic=True)
    assert out.probs.dtype == torch.float32
    u = torch.rand(out.probs.shape, generator=torch.Generator().manual_seed(3))  # float32, as the model draws it
    assert torch.equal(out.bits.detach(), (u < out.probs).float())
    assert torch.equal(det.bits.detach(), (det.probs > 0.5).float())


def _class_pipeline(dtype: torch.dtype, compile: bool = False) -> BLDPipeline:
    cfg = Config()
    cfg.autoencoder.preset = "ae64-tiny"
    cfg.denoiser.conditioning, cfg.denoiser.num_classes = "class", 3
    cfg.diffusion.T = 16
    ae = _tiny_ae()
    torch.manual_seed(0)
    denoiser = Denoiser(cfg.denoiser, ae.latent_shape)
    return BLDPipeline(cfg, denoiser, ae, None, torch.device("cpu"), dtype, compile)


def test_t_reaches_the_denoiser_in_float32_when_sampling_in_bf16(monkeypatch):
    seen = []
    denoise = Denoiser.denoise

    def recording(self, z_t, t, prepared, grid=None):
        seen.append(t.dtype)
        return denoise(self, z_t, t, prepared, grid)

    monkeypatch.setattr(Denoiser, "denoise", recording)
    pipe = _class_pipeline(torch.bfloat16)
    pipe.sample_latents(class_labels=[0, 1], steps=4, guidance=2.0)
    assert len(seen) == 4 and set(seen) == {torch.float32}


def test_the_denoiser_refuses_a_half_precision_t():
    model = Denoiser(Config().denoiser.__class__(conditioning="none"), (2, 2, 4))
    with pytest.raises(TypeError, match="t must be float32"):
        model(torch.zeros(1, 4, 4), torch.full((1,), 0.5, dtype=torch.bfloat16))


def test_deepspeed_config_reduces_and_accumulates_in_float32_with_buckets_sized_by_the_model():
    train = Config().train
    train.precision = "bf16"
    ds = D.deepspeed_config(train, 8, 2, 1.0, n_params=172_000_000)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 172_000_000 // 8
    train.zero_stage, train.zero_bucket_size = 3, 1_000_000
    zero = D.deepspeed_config(train, 8, 2, 1.0, n_params=408_000_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1_000_000 and "allgather_bucket_size" not in zero
    assert zero["stage3_prefetch_bucket_size"] == 51_000_000 and zero["stage3_param_persistence_threshold"] == 408_000
    tiny = D.zero_sizes(100_000)  # a CPU test model: the floors
    assert tiny == D.ZeroSizes(bucket=5_000_000, prefetch=5_000_000, persistence=10_000)
    train.zero_stage = 0
    with pytest.raises(ValueError, match="train.grad_accum_dtype 'fp32' .* needs train.zero_stage >= 1"):
        D.deepspeed_config(train, 8, 2, 1.0, n_params=1000)
    train.grad_accum_dtype = "bf16"
    assert D.deepspeed_config(train, 8, 2, 1.0, n_params=1000)["data_types"] == {"grad_accum_dtype": "bf16"}


def test_compile_under_zero3_is_refused_naming_the_fields():
    cfg = Config()
    cfg.train.compile, cfg.train.zero_stage = True, 3
    with pytest.raises(ValueError, match="train.compile needs train.zero_stage 0, 1 or 2"):
        T2ITask().build(cfg, torch.device("cpu"), 1, None)


ENGINES = r'''
import json, sys
import numpy as np
import torch
from bld_t2i import distributed as D
from bld_t2i.config import Config
from bld_t2i.models.denoiser import Denoiser
from bld_t2i.training.t2i import T2ITask, optimizer_for

stage = int(sys.argv[1])
cfg = Config()
cfg.denoiser.conditioning, cfg.denoiser.num_classes = "class", 3
cfg.train.precision, cfg.train.zero_stage, cfg.train.grad_accum = "bf16", stage, 2
cfg.diffusion.T = 1000
torch.manual_seed(0)
model = Denoiser(cfg.denoiser, (4, 4, 8))
n = sum(p.numel() for p in model.parameters())
engine = D.build_engine(model, optimizer_for(model, cfg), D.deepspeed_config(cfg.train, 4, 2, 1.0, n))
times = []
engine.module.register_forward_pre_hook(lambda module, args: times.append(str(args[1].dtype)))
task = T2ITask()
task.attach(cfg, torch.device("cpu"), engine, None)
bits = np.random.default_rng(0).random((4, 4 * 4 * 8)) < 0.5
batch = {"packed": torch.from_numpy(np.packbits(bits, axis=1)), "grid": (4, 4), "label": torch.tensor([0, 1, 2, 0])}
g = torch.Generator().manual_seed(0)
for m in range(2):
    stats, applied = task.train_step(None, batch, g, 0, m == 1, None)
opt = engine.optimizer
print("RESULT " + json.dumps({
    "engine_comm": str(engine.communication_data_type), "engine_accum": str(engine.get_data_types()[1]),
    "optimizer": type(opt).__name__, "opt_comm": str(getattr(opt, "communication_data_type", None)),
    "opt_accum": str(getattr(opt, "gradient_accumulation_dtype", None)),
    "weights": str(next(engine.module.parameters()).dtype), "t": sorted(set(times)),
    "loss": float(stats["loss"]), "applied": bool(applied)}))
'''


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_real_bf16_engines_reduce_and_accumulate_in_float32_and_get_t_in_float32(stage):
    env = {**train_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", ENGINES, str(stage)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert r["engine_comm"] == r["engine_accum"] == "torch.float32", r
    assert r["weights"] == "torch.bfloat16" and r["t"] == ["torch.float32"], r
    # ZeRO-1 with float32 accumulation is DeepSpeed's BF16_Optimizer; ZeRO 2/3 carry both dtypes themselves
    assert r["optimizer"] == {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    if stage > 1:
        assert r["opt_comm"] == r["opt_accum"] == "torch.float32", r
    assert r["applied"] and r["loss"] == r["loss"] and abs(r["loss"]) < 100, r
