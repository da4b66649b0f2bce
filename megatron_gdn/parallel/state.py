"""Rank and world size that work with and without torch.distributed initialised."""

from __future__ import annotations

import torch.distributed as dist


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print_rank_0(*args, **kwargs) -> None:
    if is_rank_zero():
        print(*args, **kwargs, flush=True)
