"""torchrun support shared by the stages: the rank layout, process-group set-up, ordered gathers, SyncBN.

Every command that computes takes `--device cpu|cuda|cuda:N`, checked by `check_device`. A stage launched by
`torchrun --nproc-per-node N` (WORLD_SIZE > 1 in the environment) calls `init_from_env`, which joins the process group
(gloo on CPU, nccl on CUDA, where rank r uses cuda:LOCAL_RANK). Launched without torchrun, `init_from_env` checks the
device and returns a single-rank `World`.

Every collective waits at most the process group's timeout (`DEFAULT_TIMEOUT_S`, or the environment's
DISTILLBEV_PG_TIMEOUT_S) for the slowest rank; no stage makes ranks wait there for a pass over a whole dataset or
store: such passes are split between the ranks (docs/scaling.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

DEFAULT_TIMEOUT_S = 1800  # torch's NCCL default is 600 s
TIMEOUT_ENV = "DISTILLBEV_PG_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The rank layout torchrun exported (RANK, WORLD_SIZE, LOCAL_RANK), or a single rank."""
    return World(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def check_device(device: str) -> str:
    """`--device` as given (cpu, cuda or cuda:N), checked on this machine: a ConfigError for another spelling, for
    CUDA where none is available, or for an index beyond this machine's devices."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r}: not a torch device; pass cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda}); use --device cpu, or install torch for your CUDA")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 ... cuda:{count - 1})")
    return device


def process_group_timeout() -> float:
    """Seconds a collective waits for the slowest rank: DISTILLBEV_PG_TIMEOUT_S, else `DEFAULT_TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return float(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds (default "
                          f"{DEFAULT_TIMEOUT_S})")
    return seconds


def init_from_env(device: str) -> tuple[World, str]:
    """Join torchrun's process group when there is one; returns (world, this rank's device).

    The device is checked first (`check_device`). gloo for a CPU device, nccl for CUDA, where rank r uses
    cuda:LOCAL_RANK. A `--device cuda:K` under torchrun is refused: the rank picks its own device. Collectives
    time out after `process_group_timeout()`.
    """
    device = check_device(device)
    world = world_from_env()
    if not world.distributed:
        return world, device
    import datetime

    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(f"--device {device}: under torchrun every rank uses cuda:LOCAL_RANK; pass --device cuda")
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise ConfigError(f"--device cuda: rank {world.rank} has LOCAL_RANK {world.local_rank} but this node has "
                              f"{count} CUDA device(s); start at most {count} processes per node "
                              f"(torchrun --nproc-per-node {count})")
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import atexit

        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=process_group_timeout()))
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return world, device


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_ordered(items: list[tuple[int, Any]], length: int, world: World) -> list[Any] | None:
    """Every rank's (index, item) pairs in index order on rank 0 (None on the others).

    Each index in range(length) must come from exactly one rank; a missing or repeated index is a RuntimeError
    (the ranks split the data wrongly), so an evaluation never scores a partial or padded prediction set.
    """
    if world.distributed:
        import torch.distributed as dist

        parts: list[Any] = [None] * world.world_size if world.is_main else None
        dist.gather_object(items, parts, dst=0)
        if not world.is_main:
            return None
        items = [pair for part in parts for pair in part]
    indices = sorted(index for index, _ in items)
    if indices != list(range(length)):
        raise RuntimeError(f"the ranks returned {len(indices)} items for {length} indices (missing or repeated "
                           f"indices); each rank must take a disjoint part of the data")
    return [item for _, item in sorted(items, key=lambda pair: pair[0])]


def rank_indices(length: int, world: World) -> list[int]:
    """The indices rank r evaluates: r, r + W, r + 2W, ... (no padding, so nothing is scored twice)."""
    return list(range(world.rank, length, world.world_size))


def check_sync_bn(world: World, device: str, sync_bn: bool) -> None:
    """ConfigError when --sync-bn cannot work here (a CPU device, or no torchrun ranks); a stage calls it before it
    writes anything, `prepare_model` again before converting."""
    if not sync_bn:
        return
    if not str(device).startswith("cuda"):
        raise ConfigError("--sync-bn: SyncBatchNorm has no CPU implementation (it needs CUDA and nccl); drop "
                          "--sync-bn on CPU, each rank then normalises over its own batch")
    if not world.distributed:
        raise ConfigError("--sync-bn synchronises BatchNorm across torchrun ranks; it needs --nproc-per-node > 1")


def prepare_model(model, world: World, device: str, sync_bn: bool):
    """The model to train on this rank: SyncBN-converted when asked (CUDA only), DDP-wrapped under torchrun."""
    import torch

    if sync_bn:
        check_sync_bn(world, device, sync_bn)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world.distributed:
        device_ids = [torch.device(device).index] if str(device).startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def broadcast_buffers(model, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, before an evaluation.

    DDP broadcasts rank 0's buffers at the start of each forward, and each rank then updates them from its own
    batch, so after training the ranks' statistics differ. Every rank must predict with the checkpoint's (rank 0's)
    statistics, as mmdet3d's DistEvalHook(broadcast_bn_buffer=True) makes them do.
    """
    if world.distributed:
        import torch.distributed as dist

        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)
