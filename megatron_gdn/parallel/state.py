"""Process groups: the one registry of global mutable state in the project (../DESIGN.md section 8).

Ranks are laid out in Megatron's order tp-cp-dp, tensor parallel fastest, so that the ranks of a TP
group are neighbours (the GPUs of one node under torchrun):

    global rank = tp_rank + TP * (cp_rank + CP * dp_rank)        world size = TP * CP * DP

`initialize_model_parallel(tp, cp)` builds every group once per process; the getters read them back.
A single process (no torch.distributed) is the special case TP = CP = DP = 1 with no groups at all:
every communication primitive in this package is the identity on a group of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


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


def group_size(group: ProcessGroup | None) -> int:
    """Size of a group (None: all processes, as in torch.distributed); 1 without torch.distributed."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_reduce_scalar(value: float, group: ProcessGroup | None = None, op: str = "sum") -> float:
    """Sum (op="sum") or maximum (op="max") of a Python number over a group (None: all processes)."""
    if group_size(group) == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t.item()


# ----------------------------------------------------------------------------------------------------
# Launch: torch.distributed from torchrun's environment

def launched_world_size() -> int:
    """The number of processes: torch.distributed's world once joined, before that what the launcher
    announced (torchrun sets WORLD_SIZE), so a layout can be checked before any communication."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_distributed(device_type: str, timeout_minutes: float = 10.0, single_process: bool = False) -> int:
    """Join the process group that the launcher describes in RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    (torchrun, or parallel/launch.py for srun and mpirun); NCCL on GPUs, gloo on CPUs. Returns the local rank
    (the GPU to use).

    A collective that waits longer than timeout_minutes for another rank (one that died or hangs) raises
    instead of blocking forever. A single process stays without torch.distributed unless single_process=True
    (DeepSpeed needs a process group even alone; it then gets a group of one). Safe to call twice.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized() or (launched_world_size() == 1 and not single_process):
        return local_rank
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    kwargs = dict(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes),
                  device_id=torch.device("cuda", local_rank) if device_type == "cuda" else None)
    if launched_world_size() == 1:  # no launcher, no rendezvous: an in-process store
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    return local_rank


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Forget the model-parallel groups and leave torch.distributed (the end of a launched run).

    wait_for_peers: every rank got here together (the run's end, or a stop they all agreed on). A barrier on each
    group then lets the collectives still in flight finish (gloo's barrier waits for all earlier work of its group)
    before any group is torn down: without it, now and then one rank of a ZeRO-1 run on gloo that stopped on NaNs
    aborted in the teardown ("terminate called without an active exception"; tests/test_faults.py). A rank that
    stops alone (bad input on that rank) passes False: its peers would never join the barrier.
    """
    if wait_for_peers and dist.is_available() and dist.is_initialized():
        for group in [None, *_model_parallel_groups()]:  # None: the world
            dist.barrier(group=group)
    destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class ParallelGroups:
    """This process's groups and its coordinates in the tp-cp-dp grid."""

    tensor_model_parallel_size: int
    context_parallel_size: int
    data_parallel_size: int
    tensor_model_parallel_rank: int
    context_parallel_rank: int
    data_parallel_rank: int
    tensor_model_parallel_group: ProcessGroup | None
    context_parallel_group: ProcessGroup | None
    data_parallel_group: ProcessGroup | None
    # DP x CP: the ranks that hold the same model shard; gradients are averaged over it.
    data_context_parallel_group: ProcessGroup | None
    # Every rank, over gloo (None alone): the training loop agrees on host values through it (whether to exit
    # after this iteration) without a GPU tensor, whose .item() would wait for the GPU's whole queue.
    host_group: ProcessGroup | None = None


_GROUPS: ParallelGroups | None = None


def rank_grid(world_size: int, tensor_model_parallel_size: int,
              context_parallel_size: int) -> dict[str, list[list[int]]]:
    """The global ranks of every TP, CP, DP and DP x CP group, in Megatron's tp-cp-dp order.

    Pure arithmetic (no communication), so tests and docs can show the layout for any world size.
    """
    tp, cp = tensor_model_parallel_size, context_parallel_size
    if tp < 1 or cp < 1:
        raise ValueError(f"parallel sizes must be positive, got TP={tp}, CP={cp}")
    if world_size % (tp * cp):
        raise ValueError(
            f"the world size ({world_size} processes) must be divisible by tensor-model-parallel-size x "
            f"context-parallel-size ({tp} x {cp} = {tp * cp}); launch a multiple of {tp * cp} processes "
            f"(torchrun --nproc-per-node N) or change the parallel sizes")
    dp = world_size // (tp * cp)

    def rank(t: int, c: int, d: int) -> int:
        return t + tp * (c + cp * d)

    return {
        "tp": [[rank(t, c, d) for t in range(tp)] for d in range(dp) for c in range(cp)],
        "cp": [[rank(t, c, d) for c in range(cp)] for d in range(dp) for t in range(tp)],
        "dp": [[rank(t, c, d) for d in range(dp)] for c in range(cp) for t in range(tp)],
        "dp_cp": [[rank(t, c, d) for d in range(dp) for c in range(cp)] for t in range(tp)],
    }


def initialize_model_parallel(tensor_model_parallel_size: int = 1, context_parallel_size: int = 1,
                              timeout_minutes: float | None = None) -> ParallelGroups:
    """Build the TP, CP, DP and DP x CP groups (every process must call this, in the same order). A collective
    on them that waits longer than timeout_minutes raises (None: torch's default, 30 min for gloo, 10 for NCCL).

    Raises ValueError when the world size is not divisible by TP x CP, and RuntimeError when the
    groups already exist with other sizes (call destroy_model_parallel first).
    """
    global _GROUPS
    if _GROUPS is not None and dist.is_initialized() and _GROUPS.data_context_parallel_group is None:
        _GROUPS = None  # built by a single process before it joined torch.distributed (a group of one since)
    if _GROUPS is not None:
        if (_GROUPS.tensor_model_parallel_size, _GROUPS.context_parallel_size) == (
                tensor_model_parallel_size, context_parallel_size):
            return _GROUPS
        raise RuntimeError("model parallel groups already exist with other sizes; call destroy_model_parallel first")
    world_size, rank = get_world_size(), get_rank()
    timeout = timedelta(minutes=timeout_minutes) if timeout_minutes is not None else None
    grid = rank_grid(world_size, tensor_model_parallel_size, context_parallel_size)
    mine: dict[str, ProcessGroup | None] = {}
    for kind, groups in grid.items():
        mine[kind] = None
        for ranks in groups:
            # new_group is collective: every process creates every group, keeping the one it belongs to.
            group = dist.new_group(ranks, timeout=timeout) if dist.is_initialized() else None
            if rank in ranks:
                mine[kind] = group
    host_group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
    tp, cp = tensor_model_parallel_size, context_parallel_size
    _GROUPS = ParallelGroups(
        tensor_model_parallel_size=tp, context_parallel_size=cp, data_parallel_size=world_size // (tp * cp),
        tensor_model_parallel_rank=rank % tp, context_parallel_rank=(rank // tp) % cp,
        data_parallel_rank=rank // (tp * cp),
        tensor_model_parallel_group=mine["tp"], context_parallel_group=mine["cp"],
        data_parallel_group=mine["dp"], data_context_parallel_group=mine["dp_cp"], host_group=host_group)
    return _GROUPS


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Forget the groups (tests, or a second run in one process). torch.distributed itself stays up."""
    global _GROUPS
    if dist.is_initialized():
        for group in _model_parallel_groups():
            dist.destroy_process_group(group)
    _GROUPS = None


def _model_parallel_groups() -> list:
    """This process's distinct model-parallel groups (none before initialize_model_parallel)."""
    if _GROUPS is None:
        return []
    groups = (_GROUPS.tensor_model_parallel_group, _GROUPS.context_parallel_group, _GROUPS.data_parallel_group,
              _GROUPS.data_context_parallel_group, _GROUPS.host_group)
    return [g for i, g in enumerate(groups) if g is not None and g not in groups[:i]]


def get_parallel_groups() -> ParallelGroups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialised: call initialize_model_parallel first")
    return _GROUPS


def get_tensor_model_parallel_group() -> ProcessGroup | None:
    return get_parallel_groups().tensor_model_parallel_group


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_groups().tensor_model_parallel_rank


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_groups().tensor_model_parallel_size


def get_context_parallel_group() -> ProcessGroup | None:
    return get_parallel_groups().context_parallel_group


def get_context_parallel_rank() -> int:
    return get_parallel_groups().context_parallel_rank


def get_context_parallel_world_size() -> int:
    return get_parallel_groups().context_parallel_size


def get_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup | None:
    """The ranks holding the same model shard; with_context_parallel=True includes the CP ranks
    (the group over which gradients are averaged once context parallelism exists)."""
    groups = get_parallel_groups()
    return groups.data_context_parallel_group if with_context_parallel else groups.data_parallel_group


def get_data_parallel_rank() -> int:
    return get_parallel_groups().data_parallel_rank


def get_data_parallel_world_size() -> int:
    return get_parallel_groups().data_parallel_size
