"""Autograd communication primitives of tensor and sequence parallelism (Megatron's mappings.py).

Each is a pair: what the forward does to activations and what the backward does to their gradients.

    function                                        forward                      backward
    copy_to_tensor_model_parallel_region            identity                     all-reduce
    reduce_from_tensor_model_parallel_region        all-reduce                   identity
    scatter_to_tensor_model_parallel_region         keep own chunk of last dim   all-gather last dim
    gather_from_tensor_model_parallel_region        all-gather last dim          keep own chunk
    scatter_to_sequence_parallel_region             keep own chunk of sequence   all-gather sequence
    gather_from_sequence_parallel_region            all-gather sequence          reduce-scatter sequence
    reduce_scatter_to_sequence_parallel_region      reduce-scatter sequence      all-gather sequence

Activations in this project are [batch, sequence, hidden] (the layout of the model), so the sequence
dimension is 1 (Megatron's is 0: it runs [s, b, h]). On a group of one every primitive is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .state import group_rank, group_size

SEQUENCE_DIM = 1
# torch 2.13 renamed the single-tensor collectives (same arguments); older versions only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _identity(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # A fresh buffer: reducing in place would change a tensor autograd may still hold elsewhere.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _check_divisible(x: torch.Tensor, dim: int, world: int) -> None:
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dimension {dim} of a {tuple(x.shape)} tensor evenly across {world} ranks "
                         f"(under sequence parallelism the sequence length must divide by the TP size)")


def _split(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world)
    return x.chunk(world, dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    # The single-tensor all-gather stacks along dimension 0: gather there, then move the dimension back.
    local = x.movedim(dim, 0).contiguous()
    out = local.new_empty((world * local.shape[0], *local.shape[1:]))
    _all_gather_single(out, local, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world)
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
    _reduce_scatter_single(out, full, group=group)
    return out.movedim(0, dim)


Op = Callable[[torch.Tensor, "ProcessGroup | None", int], torch.Tensor]


class _Communicate(torch.autograd.Function):
    """forward_op on the activations, backward_op on their gradient, along dimension dim of group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None, dim: int, forward_op: Op,
                backward_op: Op) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.backward_op = group, dim, backward_op
        return forward_op(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_op(grad, ctx.group, ctx.dim), None, None, None, None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region with a replicated input: each rank's gradient is partial, so sum it."""
    return _Communicate.apply(x, group, -1, _identity, _all_reduce)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region: sum the partial outputs of the ranks (after a row-parallel matmul)."""
    return _Communicate.apply(x, group, -1, _all_reduce, _identity)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return _Communicate.apply(x, group, -1, _split, _all_gather)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return _Communicate.apply(x, group, -1, _all_gather, _split)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None,
                                        dim: int = SEQUENCE_DIM) -> torch.Tensor:
    return _Communicate.apply(x, group, dim, _split, _all_gather)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None, dim: int = SEQUENCE_DIM,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence shards. Backward: reduce-scatter when the consumer is a TP region (every
    rank's gradient for the full sequence is partial), a plain split when it is replicated."""
    return _Communicate.apply(x, group, dim, _all_gather, _reduce_scatter if tensor_parallel_output_grad else _split)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup | None,
                                               dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Leave a TP region under sequence parallelism: sum the partial outputs and keep own sequence shard."""
    return _Communicate.apply(x, group, dim, _reduce_scatter, _all_gather)
