"""torch.distributed as the trainers use it: who am I, which device, gather each rank's share.

Every helper works without torch.distributed initialized (one process: rank 0 of 1), so the same
training code runs alone, under torchrun with gloo on CPUs, or with NCCL on GPUs.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["dist_info", "default_device", "barrier", "broadcast_buffers", "all_reduce_sum", "all_gather_shares",
           "shares"]


def dist_info() -> tuple[bool, int, int]:
    """(initialized, rank, world size): (False, 0, 1) when torch.distributed is not initialized."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_rank() if on else 0), (dist.get_world_size() if on else 1)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or when None: cuda:LOCAL_RANK (torchrun's local rank, 0 without it) when CUDA is
    available, else the CPU."""
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def barrier() -> None:
    """Wait for every rank (nothing when torch.distributed is not initialized)."""
    on, _, _ = dist_info()
    if on:
        import torch.distributed as dist

        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers to every rank (DDP broadcasts them at each forward, so the last step's updates
    are local until then)."""
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf, 0)


def all_reduce_sum(values: Tensor, device: torch.device) -> Tensor:
    """The sum over ranks of a CPU tensor (reduced on ``device``, returned on the CPU)."""
    import torch.distributed as dist

    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def shares(n: int, world: int) -> tuple[Tensor, ...]:
    """The indices 0..n-1 split into ``world`` contiguous shares (rank r embeds share r)."""
    return torch.tensor_split(torch.arange(n), world)


def all_gather_shares(mine: Tensor, sizes: list[int], fill: float | int = 0) -> Tensor:
    """Every rank's rows in rank order: rank r holds ``sizes[r]`` rows (``mine``, all ranks with the same
    trailing shape and dtype); each share is padded with ``fill`` to the largest, gathered, and cut back."""
    import torch.distributed as dist

    size = max(sizes)
    padded = torch.full((size, *mine.shape[1:]), fill, dtype=mine.dtype, device=mine.device)
    padded[:mine.shape[0]] = mine
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)])
