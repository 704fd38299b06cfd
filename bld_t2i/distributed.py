"""Every distributed concern in one module.

Rank, world size and local rank come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), from
SLURM's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) or default to a single process.
Preemption signals become a stop request that all ranks agree on (`stop_requested`).
Model and diffusion code never import torch.distributed; they ask this module.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from bld_t2i.config import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def dist_info() -> DistInfo:
    """This process's place in the job, from the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0))
    return DistInfo(
        rank=_env_int("RANK", "SLURM_PROCID", default=0),
        world_size=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
    )


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if preference not in ("auto", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {preference!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    # TF32 for the float32 matmuls left (a float32 recipe, the sampler's float32 path): tensor
    # cores at a 10-bit mantissa instead of full float32 on CUDA cores (cuDNN's convolutions
    # use TF32 by default already)
    torch.set_float32_matmul_precision("high")
    return torch.device("cuda", dist_info().local_rank % torch.cuda.device_count())


def _slurm_rendezvous() -> None:
    """Under srun without torchrun, derive the torch rendezvous from SLURM's variables.

    slurm/*.sh normally exports MASTER_ADDR/MASTER_PORT; this is the fallback for a bare
    `srun python -m ...`.
    """
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        first = nodelist.split(",")[0]
        if "[" in first:  # n[1-4] -> n1
            prefix, rest = first.split("[", 1)
            first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init(device: torch.device | None = None, timeout_s: float = 1800) -> DistInfo:
    """Initialise the default process group when the job has more than one process.

    `timeout_s` bounds every collective (train.collective_timeout_s): a rank whose peer died
    mid-collective fails after it instead of waiting for good. Under a launcher a watchdog
    ends this rank when the launcher dies (`watch_launcher`).
    """
    _slurm_rendezvous()
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        use_nccl = device is not None and device.type == "cuda"
        if use_nccl:
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if use_nccl else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_nccl else None,
        )
    if "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ:
        watch_launcher()
    return dist_info()


LAUNCHER_POLL_S = 1.0  # a rank outlives its launcher by at most about this long


def watch_launcher(poll_s: float = LAUNCHER_POLL_S) -> None:
    """End this process soon after its launcher (torchrun's agent, srun's step daemon) dies.

    torchrun starts each rank in a session of its own, so a SIGKILL to torchrun reaches no
    rank: without this, ranks train on beside a rerun or wait in a collective for good. A
    daemon thread sees the parent change (the orphan is re-parented) even while the main
    thread is blocked inside a collective, and exits with a message naming what was lost.
    """
    parent = os.getppid()
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"[rank {rank}] the launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="bld-launcher-watchdog", daemon=True).start()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


MAIN_WORK_POLL_S = 0.5  # how often waiting ranks look whether rank 0's long work is done
_main_work_calls = 0  # every rank calls main_work in the same order: the n-th call has key n


def main_work(work: Callable[[], None], what: str) -> None:
    """Rank 0 runs `work` (a conversion, a cold cache) while the other ranks wait for it
    without a collective: a barrier would time out after train.collective_timeout_s and kill
    the job before the work is written, so that every retry starts it over. The waiting ranks
    poll the process group's key-value store (no timeout; a rank 0 that dies ends the job
    through the launcher). An error in `work` reaches every rank."""
    global _main_work_calls
    _main_work_calls += 1
    info = dist_info()
    if not (dist.is_available() and dist.is_initialized()) or info.world_size == 1:
        if info.is_main:  # no process group: the other ranks have nothing to wait on
            work()
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"bld_t2i/main_work/{_main_work_calls}"
    if info.is_main:
        try:
            work()
        except BaseException as e:
            store.set(key, f"failed: {type(e).__name__}: {e}")
            # the store may live in this process (env:// rendezvous): wait (a while) until every
            # rank has read the failure before raising ends it
            deadline = time.monotonic() + 60
            while store.add(f"{key}/read", 0) < info.world_size - 1 and time.monotonic() < deadline:
                time.sleep(MAIN_WORK_POLL_S)
            raise
        store.set(key, "done")
        return
    while not store.check([key]):
        time.sleep(MAIN_WORK_POLL_S)
    outcome = store.get(key).decode()
    store.add(f"{key}/read", 1)
    if outcome != "done":
        raise RuntimeError(f"rank 0 failed while the other ranks waited for it ({what}): {outcome[8:]}")


def print0(*args, **kwargs) -> None:
    if dist_info().is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (a no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ----------------------------------------------------------------------------- preemption
# SLURM signals every task of a job it preempts or times out (SIGUSR1 with --signal, SIGTERM
# on scancel/requeue). The handler only records the signal; the training loop asks
# `stop_requested()` between steps, so all ranks agree on the same step to checkpoint at.

_stop_signal: int | None = None


def _record_stop(signum, frame) -> None:
    global _stop_signal
    _stop_signal = signum


def install_stop_handlers() -> None:
    """Turn SIGUSR1 and SIGTERM into a stop request instead of killing the process."""
    global _stop_signal
    _stop_signal = None
    signal.signal(signal.SIGUSR1, _record_stop)
    signal.signal(signal.SIGTERM, _record_stop)


def stop_signal() -> int | None:
    """The signal this rank received, or None."""
    return _stop_signal


def agree(device: torch.device | str = "cpu", bad: torch.Tensor | None = None) -> tuple[bool, bool]:
    """(any rank got a stop signal, any rank's `bad` flag is set), now: one small collective
    and a host read (call it on all ranks). For a guard that must decide before the optimizer
    steps; otherwise use `StopFlag`, which never waits."""
    flags = torch.zeros(2, device=device)
    flags[0] = float(_stop_signal is not None)
    if bad is not None:
        flags[1] = bad.float()
    stop, any_bad = all_reduce_sum(flags).tolist()
    return stop > 0, any_bad > 0


class StopFlag:
    """The stop request agreed by all ranks one check late, without a host sync.

    `poll()` starts this check's all-reduce and copies its result to the host asynchronously,
    then returns the previous check's result, which has long arrived: every rank stops at the
    same step and the device never waits for the host.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def poll(self) -> bool:
        # a fill kernel: torch.tensor([...], device=cuda) would copy a pageable host list, and wait
        flag = torch.full((1,), float(_stop_signal is not None), device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        cuda = self.device.type == "cuda"
        host = torch.empty(1, pin_memory=cuda)
        host.copy_(flag, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        previous, self.pending = self.pending, (host, event)
        if previous is None:
            return False
        host, event = previous
        if event is not None:
            event.synchronize()  # recorded a step ago: already complete
        return bool(host[0] > 0)


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ----------------------------------------------------------------------------- DeepSpeed
# The t2i trainer's engine, and the views of ZeRO-3-partitioned parameters it needs for
# a sharded EMA and for consolidated exports. Kept here so no other module imports deepspeed.


class ZeroSizes(NamedTuple):
    """ZeRO's communication sizes, in elements (`zero_sizes`)."""

    bucket: int  # reduce buckets (ZeRO 1-3) and the all-gather buckets of ZeRO 1/2
    prefetch: int  # ZeRO-3: parameters gathered ahead of the block that needs them
    persistence: int  # ZeRO-3: parameters this small stay whole on every rank


def zero_sizes(n_params: int) -> ZeroSizes:
    """The defaults for a model of `n_params` parameters.

    DeepSpeed's bucket default, 5e8 elements, is larger than every denoiser preset: one bucket,
    reduced after the whole backward, overlaps nothing. An eighth of the model lets the last
    blocks' gradients travel while the first blocks' backward still runs; at least 5M elements
    (10 MB in bf16) keeps NCCL near its bus bandwidth. ZeRO-3 prefetches as much (about three
    of the 24 blocks of `authors` or `large`) and keeps parameters under a thousandth of the
    model (biases, norms: gathering them costs latency, keeping them costs almost no memory)
    whole on every rank.
    """
    bucket = min(500_000_000, max(5_000_000, n_params // 8))
    return ZeroSizes(bucket=bucket, prefetch=bucket, persistence=min(1_000_000, max(10_000, n_params // 1000)))


def deepspeed_config(train: TrainConfig, micro_batch: int, grad_accum: int, grad_clip: float, n_params: int,
                     load_universal: bool = False) -> dict:
    """The engine's config from the `train` section, for a model of `n_params` parameters.

    `load_universal`: the checkpoint to resume was written by another number of ranks and
    is loaded from its universal form (`to_universal`)."""
    bf16 = train.precision == "bf16"
    if bf16 and train.zero_stage == 0 and train.grad_accum_dtype == "fp32":
        raise ValueError("train.grad_accum_dtype 'fp32' with train.precision 'bf16' needs train.zero_stage >= 1: "
                         "DeepSpeed without ZeRO sums bf16 gradients in bf16; set train.zero_stage 1 (the optimizer "
                         "states partitioned, nothing else changes) or train.grad_accum_dtype 'bf16'")
    sizes = zero_sizes(n_params)
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage > 0:
        zero.update(overlap_comm=train.overlap_comm, contiguous_gradients=True,
                    reduce_bucket_size=train.zero_bucket_size or sizes.bucket)
    if train.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = train.zero_bucket_size or sizes.bucket
    if train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=train.zero3_prefetch_size or sizes.prefetch,
                    stage3_param_persistence_threshold=train.zero3_persistence_threshold or sizes.persistence)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        # ZeRO 1-3 skip an optimizer step whose gradient norm is not finite (fp32: always, with
        # clipping on; bf16: with check_grad_overflow, DeepSpeed >= 0.17.1); the trainer counts the skips.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        # Gradients reduced across ranks and summed over micro-steps in these dtypes; DeepSpeed's
        # defaults are the weights' (bf16: 8 bits of mantissa for a sum over ranks and steps).
        "communication_data_type": train.communication_dtype,
        "data_types": {"grad_accum_dtype": train.grad_accum_dtype},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**12,  # our own logging; DeepSpeed's would flood the log
        "wall_clock_breakdown": False,
        # AdamW from torch is a ZeRO-supported optimizer, but be explicit for other ones
        "zero_allow_untested_optimizer": True,
    }


def to_universal(folder: str, out: str) -> None:
    """Convert a DeepSpeed checkpoint folder into DeepSpeed's universal checkpoint, which any
    number of ranks can load: the ZeRO partitions of the fp32 weights and optimizer moments
    merged per parameter (rank 0 only; the others wait at a barrier)."""
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(SimpleNamespace(input_folder=folder, output_folder=out, num_extract_workers=1,
                                         num_merge_workers=1, keep_temp_folder=False, strict=True,
                                         inject_missing_state=False))


def checkpoint_fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 training weights of a DeepSpeed checkpoint folder, whole: ZeRO 1-3 partitions
    merged from any world size (DeepSpeed's zero_to_fp32), ZeRO-0's module state as saved."""
    folder = Path(folder)
    if any(folder.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a DeepSpeed checkpoint (no *_optim_states.pt or {path.name})")
    return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=False)["module"].items()}


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def master_fragment(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of the part of `param` this rank's optimizer updates.

    Under bf16 the module's parameters are rounded copies; an EMA must average the fp32
    master weights instead. ZeRO-3: the local partition (`safe_get_local_fp32_param`);
    ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's fragment of the flat fp32
    partition (`_hp_mapping`, empty when another rank owns the whole parameter); without
    DeepSpeed: the parameter itself.
    """
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param)
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else param.new_empty(0, dtype=torch.float32)
    return param.data


def full_from_fragment(fragment: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Reassemble the full tensor of `param`'s shape from every rank's `master_fragment`-shaped
    piece (a collective under ZeRO: every rank must call it for every parameter in order).

    ZeRO-3 gives rank r the elements [r * n, (r + 1) * n) of the flattened parameter,
    n = ceil(numel / world), the last one zero-padded; ZeRO 1/2 fragments are disjoint
    ranges of the flattened parameter, so a sum of zero-filled buffers assembles them.
    """
    if hasattr(param, "ds_id"):
        parts = [torch.empty_like(fragment) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, fragment.contiguous())
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
    if hasattr(param, "_hp_mapping"):
        full = torch.zeros(param.numel(), dtype=fragment.dtype, device=fragment.device)
        if param._hp_mapping is not None:
            address = param._hp_mapping.lp_fragment_address
            full.narrow(0, address.start, address.numel).copy_(fragment.reshape(-1))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(full)
        return full.view(param.shape)
    return fragment


def fragment_from_full(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's `master_fragment`-shaped piece of a full tensor (the inverse of `full_from_fragment`)."""
    if hasattr(param, "ds_id"):
        n = param.ds_tensor.numel()
        flat = torch.zeros(n * dist.get_world_size(), dtype=full.dtype, device=full.device)
        flat[: full.numel()] = full.reshape(-1)
        rank = dist.get_rank()
        return flat[rank * n : (rank + 1) * n].clone()
    if hasattr(param, "_hp_mapping"):
        if param._hp_mapping is None:
            return full.new_empty(0)
        address = param._hp_mapping.lp_fragment_address
        return full.reshape(-1).narrow(0, address.start, address.numel).clone()
    return full.reshape(param.shape).clone()
