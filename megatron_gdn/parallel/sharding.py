"""The sharding rule of every parameter: the one place that says how the model is split across TP ranks.

Initialisation (parallelize.py takes each rank's shard of the full, seeded weights), gradient
synchronisation (grads.py all-reduces the replicated weights that need it and counts each weight
once in the gradient norm), and checkpoint conversion between TP sizes (tools/reshard_checkpoint.py)
all read PARAMETER_RULES below; nothing else decides it.

Every split is one contiguous 1/TP block of whole units (heads, vocabulary rows, MLP channels), so a
shard is `tensor.chunk(TP, dim)[rank]` and merging is `torch.cat(shards, dim)`. Why whole heads and
one contiguous block per rank is right for GDN:
  - q/k are split by key heads, v/g/a/b (and A_log, dt_bias, the v conv channels) by value heads.
    Value head j reads q/k head j // (HV / H) (the kernels repeat_interleave q/k), so rank r's value
    heads [r HV/TP, (r+1) HV/TP) read exactly its q/k heads [r H/TP, (r+1) H/TP): with
    num_v_heads > num_heads every q/k head stays with its value heads. Both counts must divide by TP.
  - the q/k/v projections are separate weights, so a split never mixes components the way an even
    split of a fused [q, k, v, ...] projection does.
  - o_norm's weight [head_v_dim] is shared by all heads: replicated, and each rank's gradient only
    covers its heads, so it is all-reduced across TP always. The block norms and the final norm are
    replicated too; under sequence parallelism each rank sees other tokens, so their gradients are
    all-reduced across TP then (without it every rank already has the full gradient).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# What a split dimension counts, named by the GatedDeltaNetConfig field that holds the count.
KEY_HEADS = "num_heads"
VALUE_HEADS = "num_v_heads"
MLP_CHANNELS = "intermediate_size"
VOCABULARY = "vocab_size"

# When a replicated parameter's gradient must be summed across the TP group.
NEVER = "never"
ALWAYS = "always"
UNDER_SEQUENCE_PARALLEL = "sequence_parallel"


@dataclass(frozen=True)
class ShardRule:
    """dim: the dimension split into TP contiguous blocks of whole `unit`s, or None when replicated.
    grad_sync (replicated only): when the gradient is all-reduced across TP."""

    dim: int | None
    unit: str | None = None
    grad_sync: str = NEVER

    @property
    def is_sharded(self) -> bool:
        return self.dim is not None

    def needs_grad_all_reduce(self, sequence_parallel: bool) -> bool:
        return self.grad_sync == ALWAYS or (self.grad_sync == UNDER_SEQUENCE_PARALLEL and sequence_parallel)


def _column(unit: str) -> ShardRule:
    return ShardRule(dim=0, unit=unit)


def _row(unit: str) -> ShardRule:
    return ShardRule(dim=1, unit=unit)


# Matched against the end of a parameter's name (whole dotted components), so the same table serves
# the full model ("model.layers.3.attn.q_proj.weight") and a lone layer ("q_proj.weight").
PARAMETER_RULES: dict[str, ShardRule] = {
    # embedding and output layer: vocabulary-parallel
    "embeddings.weight": _column(VOCABULARY),
    "lm_head.weight": _column(VOCABULARY),
    # GDN mixer: column-parallel on whole heads
    "q_proj.weight": _column(KEY_HEADS),
    "k_proj.weight": _column(KEY_HEADS),
    "v_proj.weight": _column(VALUE_HEADS),
    "g_proj.weight": _column(VALUE_HEADS),
    "a_proj.weight": _column(VALUE_HEADS),
    "b_proj.weight": _column(VALUE_HEADS),
    # its per-head parameters follow their heads
    "q_conv1d.weight": _column(KEY_HEADS),
    "q_conv1d.bias": _column(KEY_HEADS),
    "k_conv1d.weight": _column(KEY_HEADS),
    "k_conv1d.bias": _column(KEY_HEADS),
    "v_conv1d.weight": _column(VALUE_HEADS),
    "v_conv1d.bias": _column(VALUE_HEADS),
    "A_log": _column(VALUE_HEADS),
    "dt_bias": _column(VALUE_HEADS),
    # output: row-parallel over the value heads; the per-head norm weight is shared by all heads
    "o_proj.weight": _row(VALUE_HEADS),
    "o_norm.weight": ShardRule(dim=None, grad_sync=ALWAYS),
    # SwiGLU MLP
    "gate_proj.weight": _column(MLP_CHANNELS),
    "up_proj.weight": _column(MLP_CHANNELS),
    "down_proj.weight": _row(MLP_CHANNELS),
    # norms on the residual stream
    "attn_norm.weight": ShardRule(dim=None, grad_sync=UNDER_SEQUENCE_PARALLEL),
    "mlp_norm.weight": ShardRule(dim=None, grad_sync=UNDER_SEQUENCE_PARALLEL),
    "norm.weight": ShardRule(dim=None, grad_sync=UNDER_SEQUENCE_PARALLEL),
}

_PATTERNS = [(re.compile(r"(^|\.)" + re.escape(suffix) + "$"), rule) for suffix, rule in PARAMETER_RULES.items()]


def rule_for(name: str) -> ShardRule:
    """The rule of the parameter called `name`. A parameter without exactly one rule is an error, so a
    new parameter in the model cannot be silently replicated (or split) by accident."""
    found = [rule for pattern, rule in _PATTERNS if pattern.search(name)]
    if len(found) != 1:
        raise KeyError(f"parameter {name!r} matches {len(found)} sharding rules in parallel/sharding.py "
                       f"(it needs exactly one): add or fix its entry in PARAMETER_RULES")
    return found[0]


def check_unit_counts(counts: Mapping[str, int], tensor_model_parallel_size: int) -> None:
    """Every unit that is split must divide by TP: heads are never cut in two."""
    what = {KEY_HEADS: "num_heads (q/k heads; --num-attention-heads)", VALUE_HEADS: "num_v_heads (value heads)",
            MLP_CHANNELS: "intermediate_size (--ffn-hidden-size)", VOCABULARY: "the padded vocabulary size"}
    for unit, count in counts.items():
        if count % tensor_model_parallel_size:
            raise ValueError(f"{what[unit]} = {count} is not divisible by --tensor-model-parallel-size "
                             f"{tensor_model_parallel_size}: tensor parallelism splits them into equal whole parts")


def check_tensor_parallel_config(config, tensor_model_parallel_size: int) -> None:
    """Raise ValueError unless the layers of a GatedDeltaNetConfig split across tensor_model_parallel_size
    ranks (heads and MLP channels; the vocabulary is padded to fit by the training loop and checked by
    parallelize_model)."""
    check_unit_counts({unit: getattr(config, unit) for unit in (KEY_HEADS, VALUE_HEADS, MLP_CHANNELS)},
                      tensor_model_parallel_size)


def shard_tensor(full: torch.Tensor, rule: ShardRule, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s part of a full tensor (the full tensor itself when replicated)."""
    if not rule.is_sharded or world_size == 1:
        return full
    if full.shape[rule.dim] % world_size:
        raise ValueError(f"dimension {rule.dim} of a {tuple(full.shape)} tensor does not split into {world_size}")
    return full.chunk(world_size, dim=rule.dim)[rank].contiguous()


def merge_shards(shards: list[torch.Tensor], rule: ShardRule, name: str) -> torch.Tensor:
    """The full tensor from the shards of ranks 0..TP-1. Replicated tensors must agree on every rank:
    a difference means the ranks drifted apart (a missing gradient all-reduce) and is an error."""
    if rule.is_sharded:
        return torch.cat(shards, dim=rule.dim)
    for rank, shard in enumerate(shards[1:], start=1):
        if not torch.equal(shard, shards[0]):
            diff = (shard.float() - shards[0].float()).abs().max().item()
            raise ValueError(f"replicated tensor {name!r} differs between tensor-parallel ranks 0 and {rank} "
                             f"(max abs difference {diff:.3e}): the checkpoint's ranks drifted apart")
    return shards[0]


def shard_state_dict(full: Mapping[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return {name: shard_tensor(t, rule_for(name), rank, world_size) for name, t in full.items()}


def merge_state_dicts(shards: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: merge_shards([s[name] for s in shards], rule_for(name), name) for name in shards[0]}
