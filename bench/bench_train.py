"""Training throughput of the denoiser: the DeepSpeed trainer's step against a plain torch loop.

    python bench/bench_train.py [--quick] [--presets tiny authors] [--batch 32 4] [--steps 10 3]
                                [--warmup 2 1] [--procs 2] [--threads N] [--device auto|cpu|cuda]
                                [--precision fp32|bf16]

For each preset (tiny: 8x8x16-bit latents; the others: 16x16x64, the authors' 256px latent),
cross-attention to a random text condition of 16 tokens x 384:

  (a) the trainer's own step (`T2ITask.train_step`, bld_t2i/training/t2i.py) on a DeepSpeed
      ZeRO-2 engine from `distributed.build_engine`: pre-computed text embeddings, caption
      dropout, `diffusion_loss`, `engine.backward` / `engine.step` (clipping and the non-finite
      check inside), then the EMA update; one process under torchrun, and `--procs` processes
      (gloo on the CPU) for the tiny preset;
  (b) the same step around a plain single-process torch loop (`PlainEngine`: AdamW,
      clip_grad_norm_, the same EMA; bf16 through autocast): the difference is DeepSpeed's overhead.

The batch is fixed and already in memory: data loading is bench_data.py's subject. Each run
is a fresh subprocess; only the steps after the warm-up are timed. GFLOP/s counts
3 x `Denoiser.flops_per_sample(text_len=16)` per sample; MFU is given only where the peak
is known (CUDA bf16, `bld_t2i.training.t2i.PEAK_BF16_FLOPS`), never guessed for a CPU.
Writes bench/results/train_<cpu|gpu>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine_stamp, write_result

TEXT_LEN, TEXT_DIM = 16, 384  # the random text condition: (B, 16, 384) tokens
DEFAULT_BATCH = {"cpu": {"tiny": 32, "other": 4}, "cuda": {"tiny": 256, "other": 64}}


def latent_shape(preset: str) -> tuple[int, int, int]:
    return (8, 8, 16) if preset == "tiny" else (16, 16, 64)


# ----------------------------------------------------------------------------- one run (a subprocess)


class PlainEngine:
    """The baseline: the same model and AdamW as a plain single-process torch loop, with the
    face of the DeepSpeed engine that `T2ITask.train_step` uses (bf16 through autocast)."""

    def __init__(self, model, optimizer, grad_clip: float, bf16: bool):
        self.module, self.optimizer, self.grad_clip, self.bf16 = model, optimizer, grad_clip, bf16

    def __call__(self, *args):
        with torch.autocast(args[0].device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*args)

    def train(self):
        self.module.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return True


def measure(args) -> dict:
    """Warm up, then time `args.steps` training steps of one path; returns rank 0's numbers."""
    from bld_t2i import distributed as D
    from bld_t2i.config import Config
    from bld_t2i.models.denoiser import Denoiser
    from bld_t2i.training.ema import EMA
    from bld_t2i.training.schedule import step_generator
    from bld_t2i.training.t2i import T2ITask, null_condition_text, optimizer_for, peak_flops, peak_memory_gb

    cfg = Config()
    cfg.denoiser.preset, cfg.denoiser.conditioning = args.preset, "cross_attn"
    cfg.train.precision, cfg.latents.use_embeddings, cfg.text_encoder.max_length = args.precision, True, TEXT_LEN
    device = D.pick_device(args.device)
    info = D.init(device) if args.path == "deepspeed" else D.dist_info()
    torch.manual_seed(cfg.run.seed)
    h, w, C = latent_shape(args.preset)
    B = args.batch_size
    model = Denoiser(cfg.denoiser, (h, w, C), TEXT_DIM).to(device)
    optimizer = optimizer_for(model, cfg)
    bits = (torch.rand(B, h * w * C) < 0.5).numpy()
    batch = {"packed": torch.from_numpy(np.packbits(bits, axis=1)),  # as the latent loader gives them
             "emb": torch.randn(B, TEXT_LEN, TEXT_DIM).half(), "emb_mask": torch.ones(B, TEXT_LEN, dtype=torch.bool)}
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    null_text = null_condition_text(None, torch.zeros(1, TEXT_DIM), device)
    if args.path == "deepspeed":
        engine = D.build_engine(model, optimizer, D.deepspeed_config(
            cfg.train, B, cfg.train.grad_accum, cfg.optim.grad_clip, sum(p.numel() for p in model.parameters())))
        dtype = None
    else:
        engine, dtype = PlainEngine(model, optimizer, cfg.optim.grad_clip, args.precision == "bf16"), torch.float32
    task = T2ITask()
    task.attach(cfg, device, engine, null_text, dtype=dtype)  # the trainer's own step
    module = engine.module
    ema = EMA(module)

    def step(i: int) -> None:
        g = step_generator(cfg.run.seed, info.rank, i * B * info.world_size, device)
        task.train_step(None, batch, g, i * B * info.world_size, True, None)
        ema.update(cfg.train.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    D.teardown()

    step_s = statistics.mean(times)
    samples_s = B * info.world_size / step_s
    flops = 3 * model.flops_per_sample(text_len=TEXT_LEN)
    peak = peak_flops(device, args.precision)
    return {
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "tokens_per_sample": h * w, "world_size": info.world_size, "device": device.type,
        "step_s": step_s, "step_s_min": min(times), "samples_s": samples_s,
        "gflop_s": flops * samples_s / 1e9, "mfu": flops * samples_s / (peak * info.world_size) if peak else None,
        "peak_mem_gib": peak_memory_gb(device),
    }


# ----------------------------------------------------------------------------- the suite


def threads_per_process(procs: int, args) -> int:
    """--threads, else $OMP_NUM_THREADS, else the cores shared out between the processes."""
    return args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // procs)


def run(path: str, procs: int, preset: str, batch: int, steps: int, warmup: int, args) -> dict:
    """One measurement in a fresh process (under torchrun for DeepSpeed); rank 0's numbers."""
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        result = Path(tmp) / "result.json"
        worker = [__file__, "--measure", path, "--preset", preset, "--batch-size", str(batch), "--steps", str(steps),
                  "--warmup", str(warmup), "--device", args.device, "--precision", args.precision, "--result", str(result)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
            if path == "deepspeed" else [sys.executable]
        env = dict(os.environ)
        # DeepSpeed JIT-compiles its CPU communication op once; share the Makefile's cache.
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        env["OMP_NUM_THREADS"] = str(threads_per_process(procs, args))
        print(f"[bench_train] {path} x{procs} {preset} batch {batch}: {warmup} warm-up + {steps} timed steps", flush=True)
        proc = subprocess.run(launcher + worker, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{path} x{procs} {preset} batch {batch} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, small authors' batch (run_all.py)")
    p.add_argument("--presets", nargs="+", default=["tiny", "authors"])
    p.add_argument("--batch", type=int, nargs="+", help="per process, one per preset or one for all")
    p.add_argument("--steps", type=int, nargs="+", help="timed steps, one per preset or one for all")
    p.add_argument("--warmup", type=int, nargs="+", help="untimed steps, one per preset or one for all")
    p.add_argument("--procs", type=int, default=2, help="DeepSpeed processes of the extra run per preset (<= 1: none)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (default: $OMP_NUM_THREADS, else cores / processes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="", choices=["", "fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--measure", choices=["deepspeed", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.precision = args.precision or ("bf16" if cuda else "fp32")

    if args.measure:  # a worker: one measurement, rank 0 writes it
        args.path, args.steps, args.warmup = args.measure, args.steps[0], args.warmup[0]
        out = measure(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(out))
        return

    n = len(args.presets)
    defaults = DEFAULT_BATCH["cuda" if cuda else "cpu"]
    batch = args.batch or [defaults["tiny"] if name == "tiny" else defaults["other"] // (2 if args.quick else 1)
                           for name in args.presets]
    steps = args.steps or [(3 if args.quick else 10) if name == "tiny" or cuda else (2 if args.quick else 3)
                           for name in args.presets]
    warmup = args.warmup or [2 if name == "tiny" or cuda else 1 for name in args.presets]
    for flag, values in (("--batch", batch), ("--steps", steps), ("--warmup", warmup)):
        if len(values) not in (1, n):
            p.error(f"{flag} takes one value or one per preset ({n}), got {len(values)}")
    batch, steps, warmup = (v * n if len(v) == 1 else v for v in (batch, steps, warmup))

    stamp = machine_stamp()  # before the runs: the load average others put on the machine
    rows, skipped, failed = [], [], []
    for name, b, s, wu in zip(args.presets, batch, steps, warmup):
        runs = [("torch", 1), ("deepspeed", 1)]
        if args.procs > 1:
            if cuda and torch.cuda.device_count() < args.procs:
                skipped.append(f"DeepSpeed x{args.procs} needs {args.procs} GPUs; {torch.cuda.device_count()} visible")
            else:
                runs.append(("deepspeed", args.procs))
        base = None
        for path, procs in runs:
            label = "plain torch loop" if path == "torch" else f"DeepSpeed ZeRO-2, {procs} proc" + "s" * (procs > 1)
            try:
                r = run(path, procs, name, b, s, wu, args)
            except RuntimeError as e:  # an out-of-memory, say: a row that says so, and the other rows still run
                print(f"[bench_train]   {e}", flush=True)
                failed.append(f"{name} {label} batch {b}: {str(e).strip().splitlines()[-1][:300]}")
                rows.append({"preset": name, "path": label, "device": f"{args.device} {args.precision}",
                             "batch/proc": b, "step s": None, "samples/s": None, "vs plain torch": "failed (notes)"})
                continue
            if path == "torch":
                base = r
            rows.append({
                "preset": f"{name} ({r['params_m']:.1f}M)",
                "path": label,
                "device": f"{r['device']} {args.precision}",
                "batch/proc": b, "threads/proc": threads_per_process(procs, args), "timed steps": s,
                "step s": r["step_s"], "samples/s": r["samples_s"], "tokens/s": r["samples_s"] * r["tokens_per_sample"],
                "GFLOP/s": r["gflop_s"], "MFU": f"{100 * r['mfu']:.1f}%" if r["mfu"] else None,
                "vs plain torch": "" if path == "torch" or base is None
                else f"{100 * (r['samples_s'] / base['samples_s'] - 1):+.0f}% samples/s",
                "peak RSS/mem GiB": r["peak_mem_gib"],
            })
            print(f"[bench_train]   {r['step_s']:.3f} s/step, {r['samples_s']:.3g} samples/s", flush=True)

    notes = [
        f"Condition: cross-attention to random text tokens ({TEXT_LEN} x {TEXT_DIM}); latents 8x8x16 bits (tiny), "
        "16x16x64 (others); tokens/s counts latent positions. Step time is the mean over the timed steps.",
        "Parameters include the cross-attention layers (authors: ~172M without them, as with a pooled token).",
        "GFLOP/s = 3 x flops_per_sample x samples/s (matmuls only). MFU only where the peak is known (CUDA bf16).",
        f"The {args.procs}-process run's batch is per process. threads/proc is OMP_NUM_THREADS: on a loaded shared "
        "CPU, OpenMP threads that wait for each other at every op can be many times slower than one thread.",
        "Peak memory: GPU max allocated on CUDA, process peak RSS on the CPU.",
        "Load average (1/5/15 min) at the end: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        *skipped,
        *(f"Failed: {x}" for x in failed),
    ]
    path = write_result(f"train_{'gpu' if cuda else 'cpu'}", "Training throughput (denoiser)", rows,
                        "\n".join(f"- {x}" for x in notes), stamp)
    print(path.read_text())
    sys.exit(1 if failed else 0)  # the table is written either way


if __name__ == "__main__":
    main()
