"""Parallelism: process groups (the project's one registry of global state), tensor- and sequence-parallel
layers and communication, vocab-parallel cross entropy, the RNG tracker, and the sharding rule of every
parameter. See docs/PARALLELISM.md."""

from .cross_entropy import fused_linear_cross_entropy, lm_head_cross_entropy, vocab_parallel_cross_entropy
from .grads import all_reduce_found_inf, clip_grad_norm, finalize_model_grads
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .mappings import (copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
                       gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                       reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
                       scatter_to_tensor_model_parallel_region)
from .parallelize import parallelize_model, parallelize_region
from .random import RNGStatesTracker, model_parallel_rng_tracker
from .sharding import PARAMETER_RULES, ShardRule, check_tensor_parallel_config, rule_for
from .state import (ParallelGroups, all_reduce_scalar, barrier, destroy_model_parallel, get_context_parallel_group,
                    get_context_parallel_rank, get_context_parallel_world_size, get_data_parallel_group,
                    get_data_parallel_rank, get_data_parallel_world_size, get_parallel_groups, get_rank,
                    get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                    get_tensor_model_parallel_world_size, get_world_size, initialize_distributed,
                    initialize_model_parallel, is_rank_zero, launched_world_size, model_parallel_is_initialized,
                    print_rank_0, rank_grid, shutdown_distributed)

__all__ = [
    "ParallelGroups", "vocab_parallel_cross_entropy", "fused_linear_cross_entropy", "lm_head_cross_entropy",
    "all_reduce_found_inf", "clip_grad_norm", "finalize_model_grads",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "copy_to_tensor_model_parallel_region", "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region", "parallelize_model", "parallelize_region",
    "RNGStatesTracker", "model_parallel_rng_tracker", "PARAMETER_RULES", "ShardRule",
    "check_tensor_parallel_config", "rule_for", "all_reduce_scalar", "barrier", "destroy_model_parallel",
    "get_context_parallel_group", "get_context_parallel_rank", "get_context_parallel_world_size",
    "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size", "get_parallel_groups",
    "get_rank", "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size", "get_world_size", "initialize_distributed",
    "initialize_model_parallel", "is_rank_zero", "launched_world_size", "model_parallel_is_initialized",
    "print_rank_0", "rank_grid", "shutdown_distributed",
]
