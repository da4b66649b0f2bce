"""The full (unsharded) model of a training checkpoint: read and merge one, or write one at any TP size.

read_full_checkpoint is the project's one reader of a whole checkpoint (every TP rank merged), used by
tools/convert_checkpoint_to_hf.py, tools/generate_text.py and tools/reshard_checkpoint.py (which asks for
the optimizer state too); write_full_checkpoint by tools/convert_hf_to_checkpoint.py. How a parameter is
split across tensor-parallel ranks is parallel/sharding.py's rule (merge_state_dicts / shard_state_dict),
and how the rest of a training state merges is resharding.py's; nothing here decides either.

Reading goes in two steps per TP rank, so that other checkpoint layouts plug in at one place:
  1. `read_rank_model_state` gives that rank's full model shard: the "model" entry of
     mp_rank_XX/model_optim_rng.pt, or, for a DeepSpeed ZeRO checkpoint (weights partitioned across
     data-parallel ranks in zero_pp_rank_* files), the fp32 shard consolidated from its partitions
     (zero_checkpoint.py, through checkpointing.load_checkpoint).
  2. `merge_state_dicts` joins the TP ranks' shards into the full model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import GatedDeltaNetForCausalLM
from ..models.configuration import GatedDeltaNetConfig
from ..parallel.sharding import check_tensor_parallel_config, merge_state_dicts, shard_state_dict
from .checkpointing import (CHECKPOINT_VERSION, TRACKER, CheckpointError, checkpoint_file, iteration_dir,
                            load_checkpoint, read_tracker, saved_tensor_parallel_size)
from .resharding import merge_tensor_parallel_states


@dataclass
class FullCheckpoint:
    """A training checkpoint's full model: state dict (fp32, padded vocabulary), config, and the run's args.

    training_state is filled only by read_full_checkpoint(..., with_training_state=True): everything the TP
    ranks saved, merged into the state one process would have saved ("model" in its saved dtype, "optimizer"
    merged by the sharding rules, the data position, ...; the per-TP-rank RNG streams are dropped)."""

    iteration: int
    model_config: GatedDeltaNetConfig
    state: dict[str, torch.Tensor]
    args: dict = field(default_factory=dict)
    tensor_parallel_size: int = 1
    training_state: dict | None = None


def resolve_iteration(root: str | os.PathLike, iteration: int | None) -> int:
    """The iteration to read: the given one (it must exist) or the tracker's; a clear error for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory; --load takes a checkpoint directory (the --save of "
                              f"pretrain_gdn.py)")
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(f"{root} is not a megatron_gdn checkpoint directory (no {TRACKER} and no "
                                  f"iter_* directories)")
    if not iteration_dir(root, iteration).is_dir():
        found = sorted(p.name for p in root.glob("iter_*") if p.is_dir())
        raise CheckpointError(f"{root} has no iteration {iteration} (found: {', '.join(found) or 'none'})")
    return iteration


def read_rank_model_state(root: str | os.PathLike, iteration: int, tp_rank: int) -> dict:
    """TP rank tp_rank's checkpoint state (its "model" entry holds the rank's shard of every parameter); a
    DeepSpeed ZeRO checkpoint's partitions are consolidated into it by checkpointing.load_checkpoint."""
    state = load_checkpoint(root, iteration, tensor_parallel_rank=tp_rank)
    if state is None:  # only when iteration is None, which the callers never pass
        raise CheckpointError(f"no checkpoint in {root}")
    return state


def check_full_state_shapes(state: dict[str, torch.Tensor], model_config: GatedDeltaNetConfig, where: str) -> None:
    """A merged model state (read from `where`) must have exactly the tensors of the single-process model of its
    config."""
    with torch.device("meta"):  # shapes only: no memory for the weights
        expected = {name: tuple(t.shape) for name, t in GatedDeltaNetForCausalLM(model_config).state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != expected:
        diffs = sorted(f"{n}: {got.get(n)} vs {expected.get(n)}" for n in set(got) | set(expected)
                       if got.get(n) != expected.get(n))
        raise CheckpointError(f"the merged model of {where} does not match its model_config: {'; '.join(diffs[:5])}")


def read_full_checkpoint(root: str | os.PathLike, iteration: int | None = None,
                         with_training_state: bool = False) -> FullCheckpoint:
    """Read every TP rank of a checkpoint (the tracker's iteration unless given) and merge the shards into the
    full model. Every problem is a CheckpointError that names the directory or file and what is wrong.

    with_training_state=True also merges the optimizer state and keeps the rest of what the ranks saved
    (FullCheckpoint.training_state), for tools that write a training checkpoint again. Off by default: an
    export needs only the weights, and merged Adam moments would take another twice the model's memory."""
    iteration = resolve_iteration(root, iteration)
    tp = saved_tensor_parallel_size(root, iteration)
    expected = {f"mp_rank_{r:02d}" for r in range(tp)}
    # mp_rank_XX directories, or a DeepSpeed checkpoint's [zero_pp_rank_D_]mp_rank_XX_model_states.pt files
    present = {re.search(r"mp_rank_\d\d", p.name).group() for p in iteration_dir(root, iteration).glob("*mp_rank_*")
               if p.is_dir() or p.name.endswith("_model_states.pt")}
    if present != expected:
        raise CheckpointError(f"{iteration_dir(root, iteration)} has TP rank directories {sorted(present)}; "
                              f"expected mp_rank_00 .. mp_rank_{tp - 1:02d} (a shard is missing)")
    ranks = [read_rank_model_state(root, iteration, r) for r in range(tp)]
    first = ranks[0]
    if "model_config" not in first:
        raise CheckpointError(f"{checkpoint_file(root, iteration, 0)} has no model_config; it was not written by "
                              f"megatron_gdn")
    model_config = GatedDeltaNetConfig.from_dict(first["model_config"])
    training_state = None
    try:
        # One rank has nothing to merge: its state is the full one (merging would copy every tensor).
        if with_training_state:
            training_state = merge_tensor_parallel_states(ranks) if tp > 1 else first
            state = training_state["model"]
        else:
            state = merge_state_dicts([r["model"] for r in ranks]) if tp > 1 else first["model"]
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot merge the {tp} tensor-parallel shards of {iteration_dir(root, iteration)}: "
                              f"{str(e).splitlines()[0]}") from None
    check_full_state_shapes(state, model_config, str(iteration_dir(root, iteration)))
    state = {k: v.float() for k, v in state.items()}
    return FullCheckpoint(iteration=first.get("iteration", iteration), model_config=model_config, state=state,
                          args=dict(first.get("args") or {}), tensor_parallel_size=tp, training_state=training_state)


def write_full_checkpoint(directory: str | os.PathLike, checkpoint: FullCheckpoint,
                          tensor_parallel_size: int = 1) -> Path:
    """Write a model-only training checkpoint at tensor_parallel_size into `directory` (new or empty).

    The result is what pretrain_gdn.py --load reads: the tracker, iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt
    with "model" (this rank's shard by parallel/sharding.py), "model_config", "args", the iteration and the
    data position. It holds no optimizer or RNG state: start training from it with --finetune (or
    --no-load-optim --no-load-rng). Write into a temporary directory and rename it (hf_conversion.staged_directory)
    so that a failure leaves nothing behind."""
    directory = Path(directory)
    check_tensor_parallel_config(checkpoint.model_config, tensor_parallel_size)
    for rank in range(tensor_parallel_size):
        shard = shard_state_dict(checkpoint.state, rank, tensor_parallel_size)
        path = checkpoint_file(directory, checkpoint.iteration, rank)
        path.parent.mkdir(parents=True)
        torch.save({"checkpoint_version": CHECKPOINT_VERSION, "iteration": checkpoint.iteration,
                    "model": {k: v.contiguous().clone() for k, v in shard.items()},
                    "model_config": checkpoint.model_config.to_dict(),
                    "args": {**checkpoint.args, "tensor_model_parallel_size": tensor_parallel_size},
                    "consumed_train_samples": 0, "skipped_iterations": 0}, path)
    (directory / TRACKER).write_text(str(checkpoint.iteration))
    return directory
