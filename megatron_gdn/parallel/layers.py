"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

They are drop-in replacements for the nn.Linear / nn.Embedding of the model (same parameter name,
`weight`, holding this rank's shard; a tensor in, a tensor out), so that `parallelize_model` can swap
them in from outside and state dicts keep their names. Like every projection of the GDN model they
have no bias. Which rows or columns a rank holds is decided by parallel/sharding.py, not here:
these layers only know that their shard is one contiguous 1/TP slice.

Sequence parallelism (Megatron's --sequence-parallel): outside the TP regions the activations are
split along the sequence (dimension 1 of [batch, sequence, hidden]); a column-parallel layer all-gathers
its input, a row-parallel layer and the embedding reduce-scatter their output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from .mappings import (copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
                       gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                       reduce_scatter_to_sequence_parallel_region, scatter_to_tensor_model_parallel_region)
from .state import group_rank, group_size


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def enter_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """The input of a TP region: the full activation on every rank (all-gathered from sequence shards
    under sequence parallelism); backward sums the ranks' partial gradients (reduce-scatters them)."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group)
    return copy_to_tensor_model_parallel_region(x, group)


def leave_tensor_parallel_region(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """The output of a TP region: sum the ranks' partial results (and keep own sequence shard under SP)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(x, group)
    return reduce_from_tensor_model_parallel_region(x, group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across the group: weight [output_size / TP, input_size].

    communicate_input=False when the caller already brought x into the TP region (a module whose
    several projections share one input enters the region once, see parallelize.py).
    gather_output=True all-gathers the output features (otherwise each rank keeps its slice).
    """

    def __init__(self, input_size: int, output_size: int, group: ProcessGroup | None, *,
                 communicate_input: bool = True, gather_output: bool = False, sequence_parallel: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.group = group
        self.communicate_input = communicate_input
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        local = divide(output_size, group_size(group), "output size")
        self.weight = nn.Parameter(torch.empty(local, input_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.communicate_input:
            x = enter_tensor_parallel_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight)
        return gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (local {self.weight.shape[0]}), "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across the group: weight [output_size, input_size / TP].

    input_is_parallel=True: x already holds this rank's slice of the features (the output of a
    column-parallel layer); otherwise it is split here. The partial products are summed across the
    group (reduce-scattered along the sequence under sequence parallelism).
    """

    def __init__(self, input_size: int, output_size: int, group: ProcessGroup | None, *,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a row-parallel layer under sequence parallelism needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        local = divide(input_size, group_size(group), "input size")
        self.weight = nn.Parameter(torch.empty(output_size, local, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        return leave_tensor_parallel_region(F.linear(x, self.weight), self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (local {self.weight.shape[1]}), out={self.output_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split into contiguous ranges: weight [V / TP, hidden].

    Each rank looks up the ids in its range, zeros the rest, and the ranks sum their outputs
    (reduce-scatter along the sequence under sequence parallelism). V must be divisible by TP: the
    training loop pads the vocabulary to a multiple of 128 x TP.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group = group
        self.sequence_parallel = sequence_parallel
        local = divide(num_embeddings, group_size(group), "vocabulary size")
        self.vocab_start = group_rank(group) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local_ids = input_ids - self.vocab_start
            outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
            out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tensor_parallel_region(out, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (local rows {self.vocab_start}..{self.vocab_start + self.weight.shape[0]}), "
                f"{self.embedding_dim}, sequence_parallel={self.sequence_parallel}")
