"""Checkpoints in Megatron's directory layout, written so that a crash never corrupts the last good one.

    SAVE/latest_checkpointed_iteration.txt           the tracker: the newest complete iteration
    SAVE/iter_0000500/mp_rank_00/model_optim_rng.pt  model, optimizer, scheduler, RNG, data position, args

With tensor parallelism each TP rank writes its own mp_rank_{tp:02d} file (its shard of the model and
optimizer; the split is parallel/sharding.py's, tools/reshard_checkpoint.py converts between TP sizes).
An iteration is written into a temporary directory, flushed to disk and renamed into place by rank 0
once every rank has written (a barrier); only then is the tracker replaced (atomically). A run killed
mid-save leaves the tracker on the previous checkpoint. Files hold tensors and plain Python data only
and are read with weights_only=True, so loading a checkpoint never runs code from it.

Under DeepSpeed ZeRO (--zero-stage 1-3) DeepSpeed writes the files of an iteration (zero_checkpoint.py has the
layout) between the same begin_save / commit_save steps, and load_checkpoint consolidates them into this format.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

from ..parallel.state import barrier, is_rank_zero

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, unsafe or does not fit the model."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def checkpoint_file(root: str | os.PathLike, iteration: int, tp_rank: int = 0) -> Path:
    return iteration_dir(root, iteration) / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, iteration: int, state: dict, tensor_parallel_rank: int = 0,
                    write: bool = True) -> Path:
    """Write state as this TP rank's file of iteration's checkpoint under root, then point the tracker at it.

    Under torch.distributed every process calls it (it synchronises with barriers); write=False on the
    processes whose shard another one writes (data-parallel replicas of the same TP rank).
    """
    return _save(Path(root), iteration, {tensor_parallel_rank: state} if write else {})


def save_checkpoint_shards(root: str | os.PathLike, iteration: int, states: list[dict]) -> Path:
    """Write every TP rank's file from one process (tools that convert checkpoints); states[r] is rank r's."""
    return _save(Path(root), iteration, dict(enumerate(states)))


def _save(root: Path, iteration: int, shards: dict[int, dict]) -> Path:
    partial = begin_save(root, iteration)
    for tensor_parallel_rank, state in shards.items():
        target = partial / f"mp_rank_{tensor_parallel_rank:02d}" / "model_optim_rng.pt"
        target.parent.mkdir()
        with open(target, "wb") as f:
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(target.parent)
    return commit_save(root, iteration)


def begin_save(root: str | os.PathLike, iteration: int) -> Path:
    """Start saving an iteration (collective): rank 0 creates the empty temporary directory every rank then
    writes its files into (a leftover of a run killed mid-save is removed first). Returns its path."""
    root = Path(root)
    partial = partial_dir(root, iteration)
    if is_rank_zero():
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a run killed while saving
            shutil.rmtree(partial)
        partial.mkdir()
    barrier()
    return partial


def partial_dir(root: str | os.PathLike, iteration: int) -> Path:
    final = iteration_dir(root, iteration)
    return final.with_name(final.name + ".partial")


def commit_save(root: str | os.PathLike, iteration: int) -> Path:
    """Finish saving an iteration (collective, once every rank's files are flushed to disk): rank 0 renames the
    temporary directory into place and then replaces the tracker atomically."""
    root = Path(root)
    final, partial = iteration_dir(root, iteration), partial_dir(root, iteration)
    barrier()  # every rank's files are on disk
    if is_rank_zero():
        if final.exists():  # saving the same iteration again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_path(root)
        tracker_tmp = root / (TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, root / TRACKER)
        fsync_path(root)
    barrier()  # nobody reads or writes the next checkpoint before this one is complete
    return final


def read_tracker(root: str | os.PathLike) -> int | None:
    """The newest complete iteration under root, or None when root holds no checkpoint at all."""
    root = Path(root)
    tracker = root / TRACKER
    if not tracker.exists():
        if root.is_dir() and any(p.name.startswith("iter_") and p.is_dir() for p in root.iterdir()):
            raise CheckpointError(f"{root} has iteration directories but no {TRACKER}: no save completed there; "
                                  f"pass --ckpt-step N to load a specific iteration")
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration number, found {text[:40]!r}")
    return int(text)


def saved_tensor_parallel_size(root: str | os.PathLike, iteration: int) -> int:
    """How many TP ranks wrote the iteration (its mp_rank_* directories, or a DeepSpeed checkpoint's
    mp_rank_XX model-states files)."""
    from .zero_checkpoint import deepspeed_layout, is_deepspeed_checkpoint

    directory = iteration_dir(root, iteration)
    if is_deepspeed_checkpoint(directory):
        return deepspeed_layout(directory)["tensor_parallel_size"]
    return len([p for p in directory.glob("mp_rank_*") if p.is_dir()]) if directory.is_dir() else 0


def load_checkpoint(root: str | os.PathLike, iteration: int | None = None, tensor_parallel_rank: int = 0,
                    tensor_parallel_size: int | None = None) -> dict | None:
    """Read this TP rank's file of a checkpoint (the tracker's iteration unless given); None when root holds none.
    A DeepSpeed ZeRO checkpoint is consolidated into the same format (zero_checkpoint.py).

    Raises CheckpointError for a missing iteration, a corrupt file, a file carrying pickled objects, or
    (when tensor_parallel_size is given) a checkpoint saved with another number of TP ranks.
    """
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    saved_tp = saved_tensor_parallel_size(root, iteration)
    if tensor_parallel_size is not None and saved_tp and saved_tp != tensor_parallel_size:
        raise CheckpointError(tensor_parallel_mismatch(root, saved_tp, tensor_parallel_size))
    from .zero_checkpoint import is_deepspeed_checkpoint, read_deepspeed_rank_state

    if is_deepspeed_checkpoint(iteration_dir(root, iteration)):  # saved under ZeRO: consolidate its partitions
        return {"iteration": iteration, **read_deepspeed_rank_state(iteration_dir(root, iteration),
                                                                    tensor_parallel_rank)}
    path = checkpoint_file(root, iteration, tensor_parallel_rank)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing (iteration {iteration}); "
                              f"the checkpoint is incomplete or was moved")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain data; refusing to "
                              f"load it, since unpickling them could run code ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"{path} is not a megatron_gdn checkpoint (no model state or iteration)")
    return state


def tensor_parallel_mismatch(path: str | os.PathLike, saved: int, current: int) -> str:
    return (f"checkpoint {path} was saved with --tensor-model-parallel-size {saved} and this run uses {current}: "
            f"convert it first with python tools/reshard_checkpoint.py --load {path} --save NEW_DIR "
            f"--target-tensor-model-parallel-size {current}")


def check_model_config(saved: dict, current: dict, path: str | os.PathLike, saved_tensor_parallel_size: int = 1,
                       tensor_parallel_size: int = 1) -> None:
    """Refuse a checkpoint of another model shape, naming every field that differs, or of another TP size."""
    if saved_tensor_parallel_size != tensor_parallel_size:
        raise CheckpointError(tensor_parallel_mismatch(path, saved_tensor_parallel_size, tensor_parallel_size))
    shape_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_v_heads", "head_dim",
                    "expand_v", "use_gate", "use_short_conv", "conv_size", "conv_bias", "intermediate_size",
                    "tie_word_embeddings")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {current.get(k)!r}"
             for k in shape_fields if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is for another model shape ({'; '.join(diffs)}); "
                              f"pass the same model flags as when it was saved")
