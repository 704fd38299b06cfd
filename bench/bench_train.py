"""Training throughput of the denoiser: the DeepSpeed trainer's step against a plain torch loop.

    python bench/bench_train.py [--quick] [--presets tiny authors] [--batch 32 4] [--steps 10 3]
                                [--warmup 2 1] [--procs 2] [--threads N] [--device auto|cpu|cuda]
                                [--precision fp32|bf16]

For each preset (tiny: 8x8x16-bit latents; the others: 16x16x64, the authors' 256px latent),
cross-attention to a random text condition of 16 tokens x 384:

  (a) the trainer's step (bld_t2i/train.py): a DeepSpeed ZeRO-2 engine from
      `distributed.build_engine`, caption dropout, `diffusion_loss`, the NaN all-reduce,
      `engine.backward` / `engine.step` (gradient clipping inside), the sharded EMA update;
      one process under torchrun, and `--procs` processes (gloo on the CPU) for the tiny preset;
  (b) the same step as a plain single-process torch loop (AdamW, clip_grad_norm_, the same
      EMA; bf16 through autocast): the difference is DeepSpeed's overhead.

The batch is fixed and already in memory: data loading is bench_data.py's subject. Each run
is a fresh subprocess; only the steps after the warm-up are timed. GFLOP/s counts
3 x `Denoiser.flops_per_sample(text_len=16)` per sample; MFU is given only where the peak
is known (CUDA bf16, `bld_t2i.train.PEAK_BF16_FLOPS`), never guessed for a CPU.
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

import torch

from common import machine_stamp, write_result

TEXT_LEN, TEXT_DIM = 16, 384  # the random text condition: (B, 16, 384) tokens
DEFAULT_BATCH = {"cpu": {"tiny": 32, "other": 4}, "cuda": {"tiny": 256, "other": 64}}


def latent_shape(preset: str) -> tuple[int, int, int]:
    return (8, 8, 16) if preset == "tiny" else (16, 16, 64)


# ----------------------------------------------------------------------------- one run (a subprocess)


def measure(args) -> dict:
    """Warm up, then time `args.steps` training steps of one path; returns rank 0's numbers."""
    from bld_t2i import distributed as D
    from bld_t2i.config import Config
    from bld_t2i.diffusion import diffusion_loss, keep_factors
    from bld_t2i.models.conditioning import drop_condition
    from bld_t2i.models.denoiser import Denoiser
    from bld_t2i.train import ShardedEMA, peak_flops, peak_memory_gb, step_generator

    cfg = Config()
    cfg.denoiser.preset, cfg.denoiser.conditioning = args.preset, "cross_attn"
    cfg.train.precision = args.precision
    device = D.pick_device(args.device)
    info = D.init(device) if args.path == "deepspeed" else D.dist_info()
    torch.manual_seed(cfg.run.seed + info.rank)
    h, w, C = latent_shape(args.preset)
    B = args.batch_size
    model = Denoiser(cfg.denoiser, (h, w, C), TEXT_DIM).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    z_0 = (torch.rand(B, h * w, C, device=device) < 0.5).float()  # (B, L, C) bits
    cond = {"tokens": torch.randn(B, TEXT_LEN, TEXT_DIM, device=device),
            "mask": torch.ones(B, TEXT_LEN, dtype=torch.bool, device=device),
            "pooled": torch.randn(B, TEXT_DIM, device=device)}
    empty_caption = {k: v[:1].clone() for k, v in cond.items()}  # stands for text_encoder.encode([""])
    a = keep_factors(cfg.diffusion.T, cfg.diffusion.schedule).float().to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    if args.path == "deepspeed":
        engine = D.build_engine(model, optimizer, D.deepspeed_config(
            cfg.train.zero_stage, B, cfg.train.grad_accum, cfg.optim.grad_clip, args.precision))
        module = engine.module

        def model_fn(z_t, t_in, c):  # as in bld_t2i/train.py: the engine holds bf16 weights under bf16
            c = {k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}
            return engine(z_t.to(dtype), t_in.to(dtype), c).float()
    else:
        module = model

        def model_fn(z_t, t_in, c):  # fp32 weights; bf16 matmuls through autocast
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                return model(z_t, t_in, c).float()
    module.train()
    ema = ShardedEMA(module)

    def step(i: int) -> None:
        g = step_generator(cfg.run.seed, info.rank, i, device)
        null = module.null_condition(B, device, empty_caption)
        c, _ = drop_condition(cond, null, cfg.denoiser.cond_drop_prob, g)
        loss, _, _ = diffusion_loss(model_fn, z_0, c, a, cfg.diffusion.loss, cfg.diffusion.aux_weight, g)
        finite = D.all_reduce_sum(torch.tensor([float(torch.isfinite(loss))], device=device)).item() == info.world_size
        if not finite:
            raise RuntimeError(f"non-finite loss at step {i}")
        if args.path == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
    p.add_argument("--procs", type=int, default=2, help="DeepSpeed processes for the extra tiny run (<= 1: none)")
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
    rows, skipped = [], []
    for name, b, s, wu in zip(args.presets, batch, steps, warmup):
        runs = [("torch", 1), ("deepspeed", 1)]
        if name == "tiny" and args.procs > 1:
            if cuda and torch.cuda.device_count() < args.procs:
                skipped.append(f"DeepSpeed x{args.procs} needs {args.procs} GPUs; {torch.cuda.device_count()} visible")
            else:
                runs.append(("deepspeed", args.procs))
        base = None
        for path, procs in runs:
            r = run(path, procs, name, b, s, wu, args)
            base = base or r
            rows.append({
                "preset": f"{name} ({r['params_m']:.1f}M)",
                "path": "plain torch loop" if path == "torch" else f"DeepSpeed ZeRO-2, {procs} proc" + "s" * (procs > 1),
                "device": f"{r['device']} {args.precision}",
                "batch/proc": b, "threads/proc": threads_per_process(procs, args), "timed steps": s,
                "step s": r["step_s"], "samples/s": r["samples_s"], "tokens/s": r["samples_s"] * r["tokens_per_sample"],
                "GFLOP/s": r["gflop_s"], "MFU": f"{100 * r['mfu']:.1f}%" if r["mfu"] else None,
                "vs plain torch": f"{100 * (r['samples_s'] / base['samples_s'] - 1):+.0f}% samples/s" if path != "torch" else "",
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
    ]
    path = write_result(f"train_{'gpu' if cuda else 'cpu'}", "Training throughput (denoiser)", rows,
                        "\n".join(f"- {x}" for x in notes), stamp)
    print(path.read_text())


if __name__ == "__main__":
    main()
