"""Multi-process training under ``torchrun`` (gloo on CPU, NCCL on CUDA).

``torchrun --nproc_per_node N -m celluscan train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init_distributed` reads them. Every rank trains on a disjoint shard of each epoch's
indices; gradients are averaged by DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "all_reduce_sum", "gather_rows", "barrier", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str | None = None) -> DistContext:
    """Join the process group torchrun describes; a single process gets a trivial context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(rank=int(os.environ["RANK"]), world_size=world,
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if not dist.is_initialized():
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate each rank's contiguous chunk of rows (rank order), trimmed to ``total`` rows.

    Ranks may hold different row counts (the last chunk is shorter); chunks are padded to the
    largest before ``all_gather``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return local
    world = dist.get_world_size()
    chunk = -(-total // world)
    padded = local.new_zeros((chunk,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [max(0, min(chunk, total - r * chunk)) for r in range(world)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
