"""The "model parallel unit" (mpu) that DeepSpeed asks for: our process groups under the getter names it calls.

DeepSpeed partitions ZeRO state and averages gradients over `get_data_parallel_group()`, and it sums gradient
norms (and agrees on overflows) over `get_model_parallel_group()`. For this codebase:

    model parallel  = the tensor-parallel group: its ranks hold different shards of one model replica
    data parallel   = DP x CP: every rank holding the same shard. Context-parallel ranks hold identical weights
                      and their gradients are averaged with the data-parallel ones (the built-in path does the
                      same, parallel/grads.py), so to DeepSpeed they are data-parallel ranks.

There is no pipeline parallelism, so the pipeline getters report one stage. DeepSpeed counts a gradient in the
global norm on every TP rank only when the parameter carries `tensor_model_parallel = True` (its convention,
from Megatron); `mark_tensor_parallel_parameters` sets it from the sharding table, so replicated weights are
counted once (TP rank 0) and sharded ones on every rank, the rule of parallel/grads.global_grad_norm.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch.distributed import ProcessGroup

from .sharding import rule_for
from .state import ParallelGroups


class ModelParallelUnit:
    """DeepSpeed's `mpu` argument, backed by one process's ParallelGroups."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    # Tensor (model) parallelism: the ranks that hold different shards of one replica.
    def get_tensor_model_parallel_group(self) -> ProcessGroup | None:
        return self.groups.tensor_model_parallel_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tensor_model_parallel_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tensor_model_parallel_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of TP rank 0 in this rank's TP group."""
        return dist.get_rank() - self.groups.tensor_model_parallel_rank

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    # Data parallelism as DeepSpeed sees it: DP x CP, the ranks holding the same shard.
    def get_data_parallel_group(self) -> ProcessGroup | None:
        return self.groups.data_context_parallel_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.groups.data_context_parallel_group)

    def get_data_parallel_world_size(self) -> int:
        return self.groups.data_parallel_size * self.groups.context_parallel_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.groups.data_context_parallel_group)

    # No pipeline parallelism: one stage.
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def mark_tensor_parallel_parameters(model: nn.Module) -> None:
    """Set DeepSpeed's `tensor_model_parallel` attribute on every parameter from its sharding rule, so that
    DeepSpeed's global gradient norm counts sharded gradients on every TP rank and replicated ones once."""
    for name, param in model.named_parameters():
        param.tensor_model_parallel = rule_for(name).is_sharded
