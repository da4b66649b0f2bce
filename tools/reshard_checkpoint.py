"""Convert a checkpoint to another tensor-parallel size (split or merge its mp_rank_XX files).

    python tools/reshard_checkpoint.py --load checkpoints/tp2 --save checkpoints/tp4 \
        --target-tensor-model-parallel-size 4
    torchrun --nproc-per-node 4 pretrain_gdn.py ... --tensor-model-parallel-size 4 --load checkpoints/tp4

Model weights and optimizer state are split by the sharding rules the run used (parallel/sharding.py),
so the converted checkpoint resumes training where the original stopped. Writes one iteration (the
latest, or --ckpt-step) and points the new directory's tracker at it. See megatron_gdn/training/resharding.py
for what happens to the padded vocabulary and the random state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gdn.training.checkpointing import CheckpointError, save_checkpoint_shards  # noqa: E402
from megatron_gdn.training.full_checkpoint import read_full_checkpoint  # noqa: E402
from megatron_gdn.training.resharding import reshard_checkpoint_state  # noqa: E402


def reshard(load: str, save: str, target_tensor_model_parallel_size: int, iteration: int | None = None) -> Path:
    """Write the checkpoint of `load` (its latest iteration unless given) to `save` at the target TP size."""
    if Path(load).resolve() == Path(save).resolve():
        raise CheckpointError("--save must be another directory than --load (the source stays untouched)")
    # The optimizer state too: the converted checkpoint resumes training, not only the weights.
    checkpoint = read_full_checkpoint(load, iteration, with_training_state=True)
    states = reshard_checkpoint_state(checkpoint.training_state, target_tensor_model_parallel_size)
    return save_checkpoint_shards(save, checkpoint.iteration, states)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory to convert (pretrain_gdn.py --save)")
    parser.add_argument("--save", required=True, help="directory to write the converted checkpoint to")
    parser.add_argument("--target-tensor-model-parallel-size", type=int, required=True,
                        help="the --tensor-model-parallel-size of the run that will load it")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration to convert (default: the latest)")
    args = parser.parse_args(argv)
    if args.target_tensor_model_parallel_size < 1:
        print("error: --target-tensor-model-parallel-size must be at least 1", file=sys.stderr)
        return 2
    try:
        path = reshard(args.load, args.save, args.target_tensor_model_parallel_size, args.ckpt_step)
    except ValueError as e:  # CheckpointError and shapes that do not split are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} for tensor-model-parallel-size {args.target_tensor_model_parallel_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
