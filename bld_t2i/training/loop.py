"""The training loop both trainers run: `fit(cfg, task)`.

Progress is counted in samples seen. One optimizer step is `grad_accum` micro-steps of
`micro_batch` samples on each of the world's ranks; every micro-step draws from
`step_generator(seed, rank, samples seen)`. Log, checkpoint and sample cadences fire when
a step crosses a multiple of their `*_every_samples`. Rerunning the same command resumes
from the newest checkpoint, also on another number of ranks: the global batch is kept by
changing `grad_accum`, and the data loader deals the epoch's remaining samples to the new
ranks. Per optimizer step the loop issues at most one small collective of its own: the
stop flag (`D.StopFlag`, read one check late so it never stalls the device), or the NaN
guard's, which carries the stop flag too, where the task decides itself whether to step;
loss statistics stay on the device and are reduced once per log line.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from bld_t2i import checkpoint as files
from bld_t2i import distributed as D
from bld_t2i.config import Config, config_from_cli, save_config, to_dict
from bld_t2i.data.plan import describe_resume
from bld_t2i.progress import progress
from bld_t2i.tracking import StatsLogger
from bld_t2i.training.checkpointer import Checkpointer
from bld_t2i.training.ema import EMA
from bld_t2i.training.lock import RunLock, RunLocked
from bld_t2i.training.schedule import ema_decay_at, lr_at, step_generator

EXPORT_DIR = "export"  # <out_dir>/export: the finished model, outside the rotating checkpoints
EMA_WEIGHTS = "model.safetensors"  # in a checkpoint's export folder: the EMA weights a resume reads back
PROGRESS_FIELDS = ("loss", "l1", "psnr")  # a log line's numbers the progress bar shows


@dataclass
class Parts:
    """What a task's `build` hands the loop."""

    loader: Any  # state_dict() / load_state_dict(list of every saved rank's state), infinite
    ema: EMA
    checkpointer: Checkpointer
    optimizers: list[tuple[torch.optim.Optimizer, float]]  # (optimizer, learning-rate multiplier)
    export: Callable[[dict, Path], None]  # (consolidated EMA state, folder): rank 0 writes the model files
    export_subdir: str = "."  # where in a checkpoint folder `export` writes them (published as <out>/export)
    export_files: tuple[str, ...] = ()  # the files of that folder to publish; empty: all
    # (the newest checkpoint's export folder, <out>/export): rank 0 writes the published model
    # itself (the t2i pipeline folder); None: the export files are copied there
    publish: Callable[[Path, Path], None] | None = None
    on_sample: Callable[[Path, StatsLogger, dict], None] | None = None  # (checkpoint, logger, record), rank 0
    on_finish: Callable[[Path, StatsLogger, dict], None] | None = None  # after the export, rank 0
    log_extra: Callable[[float], dict] | None = None  # (samples/s) -> extra fields of a log line
    # () -> the held-out metrics of the EMA weights (`val.shards`, training/validation.py), a
    # collective; at the start of a fresh run, every `val.every_samples` and at the end
    validate: Callable[[], dict] | None = None


class Task(Protocol):
    name: str  # the log prefix, e.g. "train"
    sections: tuple[str, ...]  # the config sections it uses: what its saved config.json holds
    accumulates: bool  # steps over grad_accum micro-batches (else: one batch a step, whatever the world)

    def micro_batch(self, cfg: Config) -> int: ...

    def build(self, cfg: Config, device: torch.device, grad_accum: int, resume_world: int | None) -> Parts:
        """`resume_world`: the world size of the checkpoint to resume, None for a fresh start."""

    def train_step(self, parts: Parts, batch: dict, g: torch.Generator, samples: int, boundary: bool,
                   guard: Callable[[torch.Tensor], bool]) -> tuple[dict[str, torch.Tensor], bool]:
        """One micro-step after `samples` samples seen: stats {name: 0-d value or [sum, count]} on
        the device, and whether the optimizer step was applied (read at the boundary). `guard(bad)`
        is the NaN guard's collective for a task that decides itself whether to step: True when
        every rank is finite."""


def grad_accum_for(cfg: Config, micro: int, world: int, saved: dict | None, accumulates: bool = True) -> int:
    """The recipe's `train.grad_accum`, or on resume the one that keeps the checkpoint's global
    batch; a task that does not accumulate keeps its micro-batch and the global batch changes."""
    if not accumulates:
        return 1
    if saved is None or saved["trainer"]["world_size"] == world:
        return saved["trainer"]["grad_accum"] if saved else cfg.train.grad_accum
    global_batch = saved["trainer"]["global_batch"]
    if global_batch % (micro * world):
        raise ValueError(f"checkpoint {saved['folder']} trained with a global batch of {global_batch}, which "
                         f"{world} rank(s) x micro-batch {micro} cannot keep: choose a world size (or micro-batch) "
                         f"that divides it")
    return global_batch // (micro * world)


class _Stats:
    """Sums of each stat over the steps since the last log line, on the device."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            v = v.detach().float().reshape(-1)
            pair = v if v.numel() == 2 else torch.stack([v[0], torch.ones((), device=v.device)])
            self.sums[k] = self.sums[k] + pair if k in self.sums else pair

    def reduce(self) -> dict[str, float]:
        """Means over steps and ranks: one all-reduce and one host read per log line. A stat
        with no count (a time bucket no sample drew since the last line) is left out, not 0."""
        keys = sorted(self.sums)  # the same on every rank: which stats exist depends only on samples
        if not keys:
            return {}
        total = D.all_reduce_sum(torch.stack([self.sums[k] for k in keys])).tolist()
        self.sums = {}
        return {k: s / n for k, (s, n) in zip(keys, total) if n > 0}


def _resume(parts: Parts, name: str, info) -> dict:
    client = parts.checkpointer.load()
    if client is None:
        return {"step": 0, "samples": 0, "skipped_steps": 0, "run_id": uuid.uuid4().hex[:12]}
    state = dict(client["trainer"])
    parts.loader.load_state_dict(client["loader"])
    folder = Path(client["folder"])
    parts.ema.load_full_state(load_file(str(folder / parts.export_subdir / EMA_WEIGHTS)))
    if len(client["rng"]) == info.world_size:
        torch.set_rng_state(client["rng"][info.rank])
    else:
        D.print0(f"[{name}] world size changed: checkpoint written by {state['world_size']} rank(s), "
                 f"resuming on {info.world_size}")
    layout = describe_resume(client["loader"], info.world_size, parts.loader.state_dict()["num_workers"])
    if layout:
        D.print0(f"[{name}] {layout}")
    D.print0(f"[{name}] resumed from step {state['step']}: {folder} at {state['samples']} samples")
    return state


def _crossed(every: int, samples: int, per_step: int) -> bool:
    return every > 0 and samples // every != (samples - per_step) // every


def fit(cfg: Config, task: Task) -> Path | None:
    """Train, checkpoint, resume; returns the export folder, or None when preempted."""
    out, tc = Path(cfg.run.out_dir), cfg.train
    device = D.pick_device(tc.device)
    info = D.init(device, tc.collective_timeout_s)
    lock = _lock(out, info)
    try:
        return _train(cfg, task, out, device, info, lock)
    except BaseException:
        if lock is not None:  # a failed run lets a rerun in at once (and stops the heartbeat thread)
            lock.release()
        raise


def _train(cfg: Config, task: Task, out: Path, device: torch.device, info, lock: RunLock | None) -> Path | None:
    tc = cfg.train
    D.install_stop_handlers()
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    micro = task.micro_batch(cfg)
    saved = Checkpointer(out, tc.keep_checkpoints).peek()
    accum = grad_accum_for(cfg, micro, info.world_size, saved, task.accumulates)
    if task.accumulates and accum != tc.grad_accum:
        D.print0(f"[{task.name}] train.grad_accum {tc.grad_accum} -> {accum}: the checkpoint's global batch is kept")
    parts = task.build(cfg, device, accum, saved["trainer"]["world_size"] if saved else None)
    state = _resume(parts, task.name, info)
    per_step = micro * info.world_size * accum
    if state.get("global_batch", per_step) != per_step:
        D.print0(f"[{task.name}] global batch {state['global_batch']} -> {per_step} samples a step "
                 f"({micro} a rank, {info.world_size} rank(s)); the schedule goes on in samples")
    state.update(world_size=info.world_size, grad_accum=accum, global_batch=per_step)
    state["run_id"] = D.broadcast_object(state["run_id"])
    logger = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json", task.sections)
        logger = StatsLogger(out, cfg, cfg.log, state["run_id"], resume_samples=state["samples"])
    stats, clock = _Stats(), _Clock(state["samples"])
    audit = _KeyAudit(out, info.rank) if cfg.log.sample_keys else None
    loader = iter(parts.loader)
    sync = {"stop": False, "done": False}
    stop_flag = D.StopFlag(device)
    stop = False
    # rank 0's bar (samples/s, loss, ETA) on a terminal; a plain line every 30 s in a log
    bar = progress(total=tc.total_samples, initial=state["samples"], desc=task.name, unit="samples")
    if state["samples"] == 0:  # the starting point: random or `init.from`'s weights
        _validate(task, parts, logger, state, bar, clock)

    def guard(bad: torch.Tensor) -> bool:  # the step's one collective: stop flag and NaN flag together
        sync["stop"], any_bad = D.agree(device, bad)
        sync["done"] = True
        return not any_bad

    while state["samples"] < tc.total_samples and not (tc.max_steps and state["step"] >= tc.max_steps):
        lr = lr_at(cfg.optim, state["samples"], tc.total_samples)
        for opt, mult in parts.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * mult
        sync["done"] = False
        for m in range(accum):
            batch = clock.wait(loader)
            seen = state["samples"] + m * micro * info.world_size
            if audit is not None:
                audit.write(seen, batch["key"])
            g = step_generator(cfg.run.seed, info.rank, seen, device)
            step_stats, applied = task.train_step(parts, batch, g, seen, m == accum - 1, guard)
            stats.add(step_stats)
        if applied:
            parts.ema.update(ema_decay_at(tc.ema_decay, tc.ema_warmup, state["step"] - state["skipped_steps"]))
        else:
            state["skipped_steps"] += 1
        state["step"] += 1
        state["samples"] += per_step
        bar.update(per_step)
        if not sync["done"] and state["step"] % tc.stop_check_every_steps == 0:
            sync["stop"] = stop_flag.poll()
        stop = sync["stop"]
        if lock is not None:
            lock.raise_if_lost()  # the heartbeat found another run in our folder: write nothing more
        done = state["samples"] >= tc.total_samples or bool(tc.max_steps and state["step"] >= tc.max_steps)
        if _crossed(tc.log_every_samples, state["samples"], per_step) or done:
            _log(task, parts, logger, state, stats, clock, lr, bar)
        if not stop and (done or _crossed(cfg.val.every_samples, state["samples"], per_step)):
            _validate(task, parts, logger, state, bar, clock)
        sample = parts.on_sample is not None and _crossed(tc.sample_every_samples, state["samples"], per_step)
        if stop or done or sample or _crossed(tc.ckpt_every_samples, state["samples"], per_step):
            folder = _save(parts, cfg, state, lock)
            bar.write(f"[{task.name}] checkpoint {folder}")
            if sample and logger:
                parts.on_sample(folder, logger, {"samples": state["samples"], "step": state["step"]})
        if stop:
            D.print0(f"[{task.name}] preempted by signal {D.stop_signal() or 'on another rank'} at step "
                     f"{state['step']}; checkpoint saved ({state['samples']} samples)")
            break
    bar.close()
    return _finish(task, parts, logger, state, stop, out, lock)


def fit_from_cli(task: Task, description: str, argv=None) -> Path | None:
    """A trainer's command line: `--recipe R [--dry-run] [k=v ...]`, then `fit`."""
    cfg = config_from_cli(description, argv, task.sections)
    return None if cfg is None else fit(cfg, task)


def _lock(out: Path, info) -> RunLock | None:
    """Rank 0 takes the output folder's lock; every rank stops with the holder's name if it is live."""
    lock, error = (RunLock(out), None) if info.is_main else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except RunLocked as e:
            error = str(e)
    error = D.broadcast_object(error)
    if error:
        raise SystemExit(f"refusing to train: {error}")
    return lock


class _KeyAudit:
    """log.sample_keys: one line per micro-batch, `<samples seen> <key> <key> ...`."""

    def __init__(self, out: Path, rank: int):
        self.path = out / "sample_keys" / f"rank{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, samples: int, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(" ".join([str(samples), *keys]) + "\n")


class _Clock:
    """Wall time (validation left out) and data-wait time since the last log line."""

    def __init__(self, samples: int):
        self.t, self.samples, self.data_s = time.time(), samples, 0.0

    def wait(self, loader) -> dict:
        t0 = time.time()
        batch = next(loader)
        self.data_s += time.time() - t0
        return batch

    def lap(self, samples: int) -> dict:
        elapsed = max(time.time() - self.t, 1e-9)
        lap = {"samples_per_s": (samples - self.samples) / elapsed, "data_wait_frac": self.data_s / elapsed}
        self.t, self.samples, self.data_s = time.time(), samples, 0.0
        return lap


def _log(task: Task, parts: Parts, logger: StatsLogger | None, state: dict, stats: _Stats, clock: _Clock,
         lr: float, bar) -> None:
    """One stats.jsonl line (and wandb) with the means since the last one; the same on the console."""
    record = {"step": state["step"], "samples": state["samples"], **stats.reduce(), "lr": lr,
              **clock.lap(state["samples"]), "skipped_steps": state["skipped_steps"]}
    if parts.log_extra is not None:
        record.update(parts.log_extra(record["samples_per_s"]))
    # every rank's data faults, gathered at log time only: skips by reason, shards given up on
    faults = D.all_gather_objects((parts.loader.skipped(), parts.loader.failed_shards()))
    skipped = Counter()
    for counts, _ in faults:
        skipped.update(counts)
    record.update({f"data/skipped_{k}": v for k, v in sorted(skipped.items())})
    failed = [f"{url} ({reason})" for _, shards in faults for url, reason in shards]
    if failed:
        record["data/failed_shards"] = ", ".join(failed)
    if logger is not None:
        logger.log(record, state["step"])
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in record.items()
                         if isinstance(v, float) and k not in ("lr", "data_wait_frac"))
        bar.set_postfix(**{k.split("/")[-1]: v for k, v in record.items()
                           if k.split("/")[-1] in PROGRESS_FIELDS and isinstance(v, float)})
        bar.write(f"[{task.name}] step {state['step']} samples {state['samples']} lr {lr:.2e} {shown}")


def _validate(task: Task, parts: Parts, logger: StatsLogger | None, state: dict, bar, clock: _Clock) -> None:
    """A `val/*` line of stats.jsonl (and wandb), the same on the console; its time is left out
    of the training throughput."""
    if parts.validate is None:
        return
    start = time.time()
    record = parts.validate()
    clock.t += time.time() - start
    if logger is not None:
        logger.log({"step": state["step"], "samples": state["samples"], **record}, state["step"])
        shown = " ".join(f"{k[len('val/'):]}={v:.5g}" for k, v in record.items() if isinstance(v, float))
        bar.write(f"[{task.name}] validation at {state['samples']} samples: {shown}")


def _save(parts: Parts, cfg: Config, state: dict, lock: RunLock | None) -> Path:
    """A checkpoint of everything a resume needs (a collective); published only while rank 0
    still holds the run's lock."""
    ema_state = parts.ema.full_state()  # a collective itself: before rank 0 writes alone
    client = {"trainer": dict(state), "config": to_dict(cfg), "loader": parts.loader.state_dict(),
              "rng": torch.get_rng_state()}
    sub = parts.export_subdir
    return parts.checkpointer.save(state["step"], client, lambda tmp: parts.export(ema_state, tmp / sub),
                                   before_publish=None if lock is None else lock.check)


def _finish(task: Task, parts: Parts, logger, state: dict, stop: bool, out: Path, lock: RunLock | None) -> Path | None:
    export = out / EXPORT_DIR
    if not stop and D.dist_info().is_main:
        if lock is not None:
            lock.check()
        latest = parts.checkpointer.latest()
        src = latest / parts.export_subdir
        names = parts.export_files or [f.name for f in src.iterdir() if f.is_file()]
        if parts.publish is not None:
            parts.publish(src, export)
        else:
            files.save_folder(out, EXPORT_DIR, lambda tmp: [shutil.copy2(src / n, tmp / n) for n in names],
                              point_latest=False)
        print(f"[{task.name}] done: {state['samples']} samples; model exported to {export}", flush=True)
        if parts.on_finish is not None:
            parts.on_finish(export, logger, {"samples": state["samples"], "step": state["step"]})
    if logger:
        logger.close()
    D.barrier()
    if lock is not None:
        lock.release()
    D.teardown()
    return None if stop else export
