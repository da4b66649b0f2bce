"""Apply tensor (and sequence) parallelism to a plain GatedDeltaNetForCausalLM from outside (torchtitan style).

    model = GatedDeltaNetForCausalLM(config)        # the full model, initialised from the shared seed
    parallelize_model(model, tp_group, sequence_parallel=True)
    logits = model(input_ids).logits                 # [B, T, V / TP]: this rank's vocabulary slice
    loss = vocab_parallel_cross_entropy(logits, targets, tp_group).mean()

Every rank builds and initialises the full model with the same seed and keeps its shard
(parallel/sharding.py says which), so a TP run starts from exactly the weights of a single process.
The model file stays a plain model: this module swaps its nn.Linear / nn.Embedding for the parallel
layers (same parameter names, so state dicts keep their keys), replaces per-head parameters by their
shards, and marks the two TP regions of each block, the GDN mixer and the MLP:

    residual x --(enter: copy, or all-gather the sequence under SP)--> q,k,v,g,a,b (column) ... o (row) --(sum)--> x
    residual x --(enter)--> gate, up (column) --> down (row) --(sum, or reduce-scatter under SP)--> x

A region is entered once by a forward pre-hook on the module, not once per projection: the mixer's
six column-parallel projections share one all-gather (SP) or one gradient all-reduce (no SP).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from ..models.gated_deltanet import GatedDeltaNet
from ..models.language_model import GatedDeltaNetForCausalLM, GatedMLP
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, enter_tensor_parallel_region
from .sharding import (KEY_HEADS, MLP_CHANNELS, VALUE_HEADS, VOCABULARY, check_tensor_parallel_config,
                       check_unit_counts, rule_for, shard_tensor)
from .state import group_rank, group_size


def _shard_parameters(module: nn.Module, group: ProcessGroup | None) -> None:
    """Replace each sharded parameter directly owned by `module` or its non-Linear children (the short
    convolutions' weights, A_log, dt_bias) by this rank's shard; replicated ones stay as they are."""
    rank, world = group_rank(group), group_size(group)
    for name, param in list(module.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(owner, nn.Linear):
            continue  # swapped for a parallel layer by the caller
        rule = rule_for(name)
        if rule.is_sharded:
            setattr(owner, attr, nn.Parameter(shard_tensor(param.detach(), rule, rank, world).clone(),
                                              requires_grad=param.requires_grad))


def _parallel_linear(linear: nn.Linear, name: str, group: ProcessGroup | None, sequence_parallel: bool,
                     communicate_input: bool) -> nn.Module:
    """The column- or row-parallel layer for `linear` (by its rule), holding this rank's shard."""
    if linear.bias is not None:
        raise ValueError(f"{name}: parallel linears have no bias (no projection of the GDN model has one)")
    rule = rule_for(name + ".weight")
    kwargs = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    sizes = (linear.in_features, linear.out_features, group)
    if rule.dim == 0:
        layer = ColumnParallelLinear(*sizes, sequence_parallel=sequence_parallel, communicate_input=communicate_input,
                                     **kwargs)
    elif rule.dim == 1:
        layer = RowParallelLinear(*sizes, sequence_parallel=sequence_parallel, **kwargs)
    else:
        raise ValueError(f"{name}: a replicated linear layer inside a tensor-parallel region is not supported")
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(linear.weight, rule, group_rank(group), group_size(group)))
    layer.weight.requires_grad_(linear.weight.requires_grad)
    return layer


def _register_region_entry(module: nn.Module, group: ProcessGroup | None, sequence_parallel: bool) -> None:
    """Bring the module's first input (hidden states) into the TP region once per call."""
    first_arg = next(iter(inspect.signature(module.forward).parameters))

    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (enter_tensor_parallel_region(args[0], group, sequence_parallel), *args[1:]), kwargs
        return args, {**kwargs, first_arg: enter_tensor_parallel_region(kwargs[first_arg], group, sequence_parallel)}

    module.register_forward_pre_hook(enter, with_kwargs=True)


def parallelize_region(module: nn.Module, group: ProcessGroup | None, sequence_parallel: bool = False) -> nn.Module:
    """Make a GDN mixer or a SwiGLU MLP one TP region, in place: its linears become column- or row-parallel
    by their rules, its per-head parameters become shards, and its input enters the region once.

    Under sequence parallelism the module then takes and returns activations split along the sequence.
    """
    world = group_size(group)
    if isinstance(module, GatedDeltaNet):
        check_unit_counts({KEY_HEADS: module.key_dim // module.head_k_dim,
                           VALUE_HEADS: module.value_dim // module.head_v_dim}, world)
    elif isinstance(module, GatedMLP):
        check_unit_counts({MLP_CHANNELS: module.gate_proj.out_features}, world)
    else:
        raise TypeError(f"parallelize_region takes a GatedDeltaNet or GatedMLP, got {type(module).__name__}")
    _shard_parameters(module, group)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, _parallel_linear(child, name, group, sequence_parallel, communicate_input=False))
    _register_region_entry(module, group, sequence_parallel)
    return module


def _refuse_labels(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if (len(args) > 1 and args[1] is not None) or kwargs.get("labels") is not None:
        raise ValueError("a tensor-parallel model returns vocabulary-sharded logits, so it cannot compute the "
                         "loss itself: call it without labels and use parallel.vocab_parallel_cross_entropy")


def parallelize_model(model: GatedDeltaNetForCausalLM, group: ProcessGroup | None,
                      sequence_parallel: bool = False) -> GatedDeltaNetForCausalLM:
    """Shard a full, initialised model across the TP group, in place (see the module docstring).

    Afterwards model(input_ids).logits is this rank's vocabulary slice [B, T, V / TP] for the full
    sequence; forward with labels raises (the loss needs vocab_parallel_cross_entropy), and generate()
    is for single-process models. Gradients of replicated weights still need
    grads.finalize_model_grads after backward. Raises ValueError when the shape does not split.
    """
    world = group_size(group)
    if sequence_parallel and world == 1:
        raise ValueError("sequence parallelism needs tensor-model-parallel-size > 1")
    check_tensor_parallel_config(model.config, world)
    check_unit_counts({VOCABULARY: model.config.vocab_size}, world)
    tied = model.lm_head.weight is model.model.embeddings.weight
    for block in model.model.layers:
        parallelize_region(block.attn, group, sequence_parallel)
        parallelize_region(block.mlp, group, sequence_parallel)

    full = model.model.embeddings
    embedding = VocabParallelEmbedding(full.num_embeddings, full.embedding_dim, group,
                                       sequence_parallel=sequence_parallel, device=full.weight.device,
                                       dtype=full.weight.dtype)
    with torch.no_grad():
        embedding.weight.copy_(shard_tensor(full.weight, rule_for("embeddings.weight"), group_rank(group), world))
    model.model.embeddings = embedding
    # The output layer gathers the sequence itself (it is the only column-parallel layer of its region).
    model.lm_head = _parallel_linear(model.lm_head, "lm_head", group, sequence_parallel, communicate_input=True)
    if tied:
        model.lm_head.weight = model.model.embeddings.weight
    model.register_forward_pre_hook(_refuse_labels, with_kwargs=True)
    return model
