"""Change a checkpoint's tensor-parallel size: merge its mp_rank files into one full state, split it again.

This module works on checkpoint states in memory; reading a checkpoint directory into the merged state is
full_checkpoint.read_full_checkpoint(..., with_training_state=True), which calls merge_tensor_parallel_states.

Model weights and the optimizer's per-parameter state (AdamW's moments) are merged and split by the
sharding rules of parallel/sharding.py, the same rules that sharded them in training, so a resharded
checkpoint resumes: the next losses are those the original run would have had (up to the rounding of
the different TP reductions). Replicated weights must be identical on every rank; a difference means
the run's ranks drifted apart and is reported instead of silently picking one.

The vocabulary is padded to a multiple of --make-vocab-size-divisible-by x TP (Megatron's rule). When the
target TP needs another padded size, the padding rows are cut or zero-filled; padded logits take part in
the softmax as in Megatron, so the loss then moves slightly. Pick a divisor that fits both sizes to avoid it.

The random state: the shared generators are the same on every rank and are kept; the per-TP-rank
streams of the RNG tracker cannot be mapped between sizes and are dropped (the run re-seeds them).
"""

from __future__ import annotations

import torch

from ..data.tokenizer import padded_vocab_size
from ..models import GatedDeltaNetConfig
from ..parallel.sharding import (VOCABULARY, ShardRule, check_tensor_parallel_config, merge_shards,
                                 merge_state_dicts, rule_for, shard_state_dict, shard_tensor)
from .checkpointing import CheckpointError

REPLICATED = ShardRule(dim=None)
# Entries of a checkpoint that belong to one TP rank and are rebuilt (or dropped) by a conversion.
PER_RANK_KEYS = ("model", "optimizer", "rng_tracker_states", "tensor_model_parallel_size")


def _param_names(state: dict) -> list[str]:
    names = state.get("optimizer_param_names")
    if names is None:
        raise CheckpointError("the checkpoint has optimizer state but no optimizer_param_names (it predates "
                              "tensor-parallel checkpoints), so its optimizer state cannot be split by parameter")
    return names


def _map_optimizer(optimizers: list[dict], names: list[str], combine) -> dict:
    """Apply combine(values of one state entry across the inputs, rule, label) to every per-parameter
    tensor of AdamW state dicts; scalars (the step count) use the replicated rule."""
    per_entry = {}
    for index, entries in optimizers[0]["state"].items():
        rule = rule_for(names[index])
        per_entry[index] = {key: combine([o["state"][index][key] for o in optimizers],
                                         rule if optimizers[0]["state"][index][key].ndim else REPLICATED,
                                         f"optimizer state {key} of {names[index]}")
                            for key in entries}
    return per_entry


def merge_tensor_parallel_states(states: list[dict]) -> dict:
    """The TP=1 checkpoint state of the TP ranks' states (states[r]: mp_rank_r as load_checkpoint reads it)."""
    first = states[0]
    merged = {key: value for key, value in first.items() if key not in PER_RANK_KEYS}
    merged["model"] = merge_state_dicts([s["model"] for s in states])
    if "optimizer" in first:
        state = _map_optimizer([s["optimizer"] for s in states], _param_names(first), merge_shards)
        merged["optimizer"] = {"state": state, "param_groups": first["optimizer"]["param_groups"]}
    merged["tensor_model_parallel_size"] = 1
    merged["args"] = {**first.get("args", {}), "tensor_model_parallel_size": 1}
    return merged


def split_tensor_parallel_state(full: dict, tensor_model_parallel_size: int) -> list[dict]:
    """The states of TP ranks 0..N-1 from a TP=1 state (the inverse of merge_tensor_parallel_states)."""
    tp = tensor_model_parallel_size
    shards = []
    for rank in range(tp):
        state = {key: value for key, value in full.items() if key not in PER_RANK_KEYS}
        state["model"] = shard_state_dict(full["model"], rank, tp)
        if "optimizer" in full:
            per_entry = _map_optimizer([full["optimizer"]], _param_names(full),
                                       lambda values, rule, label: shard_tensor(values[0], rule, rank, tp))
            state["optimizer"] = {"state": per_entry, "param_groups": full["optimizer"]["param_groups"]}
        state["tensor_model_parallel_size"] = tp
        state["args"] = {**full.get("args", {}), "tensor_model_parallel_size": tp}
        shards.append(state)
    return shards


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows <= t.shape[0]:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def repad_vocabulary(full: dict, tensor_model_parallel_size: int) -> dict:
    """Give a TP=1 state the padded vocabulary that training at the target TP size builds."""
    config = full["model_config"]
    true_vocab = full.get("true_vocab_size", config["vocab_size"])
    divisor = full.get("args", {}).get("make_vocab_size_divisible_by", 1)
    rows = padded_vocab_size(true_vocab, divisor, tensor_model_parallel_size)
    if rows == config["vocab_size"]:
        return full
    print(f"note: the padded vocabulary changes from {config['vocab_size']} to {rows} rows "
          f"({true_vocab} real tokens); padding rows are cut or zero-filled, so the loss moves slightly")
    vocab_names = {name for name in full["model"] if rule_for(name).unit == VOCABULARY}
    full = {**full, "model_config": {**config, "vocab_size": rows}}
    full["model"] = {name: _resize_rows(t, rows) if name in vocab_names else t for name, t in full["model"].items()}
    if "optimizer" in full:
        names = _param_names(full)
        state = {index: {key: _resize_rows(v, rows) if names[index] in vocab_names and v.ndim else v
                         for key, v in entries.items()}
                 for index, entries in full["optimizer"]["state"].items()}
        full["optimizer"] = {**full["optimizer"], "state": state}
    return full


def reshard_checkpoint_state(full: dict, tensor_model_parallel_size: int) -> list[dict]:
    """The TP ranks' states of a merged checkpoint for a run at tensor_model_parallel_size."""
    full = repad_vocabulary(full, tensor_model_parallel_size)
    config = GatedDeltaNetConfig.from_dict(full["model_config"])
    check_tensor_parallel_config(config, tensor_model_parallel_size)
    return split_tensor_parallel_state(full, tensor_model_parallel_size)
