"""Convert a Hugging Face Gated DeltaNet model (fla or qwen3_next format) into a megatron_gdn training checkpoint.

    python tools/convert_hf_to_checkpoint.py --load hf/model --save checkpoints/from_hf \\
        --tensor-model-parallel-size 2
    python pretrain_gdn.py --load checkpoints/from_hf --finetune --tensor-model-parallel-size 2 ... \\
        --tokenizer-model checkpoints/from_hf/tokenizer.model

The format is read from config.json (model_type "gated_deltanet" or "qwen3_next"; a qwen3_next model must
have only linear_attention layers and dense MLPs). The checkpoint holds the model only (iteration 0, no
optimizer or RNG state): continue pretraining from it with --finetune. Its vocabulary is padded with zero
rows to a multiple of --make-vocab-size-divisible-by x TP, as pretrain_gdn.py pads it; the tensor-parallel
split is parallel/sharding.py's. A tokenizer.model in the HF directory is copied into the checkpoint
directory and recorded as the run's --tokenizer-model.

Security: the directory is read as data. config.json is parsed as JSON, weights come from safetensors;
pickle-based weights (pytorch_model.bin) are refused unless --allow-pickle (then read with
weights_only=True); no code from the directory is imported or run.

Exit codes: 0 on success, 2 for bad input (a one-line "error: ..." on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gdn.data.tokenizer import padded_vocab_size  # noqa: E402
from megatron_gdn.models.hf_conversion import (ConversionError, load_hf_model_state, resize_vocabulary,  # noqa: E402
                                               run_tool, staged_directory)
from megatron_gdn.training.full_checkpoint import FullCheckpoint, write_full_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="Hugging Face model directory (fla or qwen3_next format)")
    parser.add_argument("--save", required=True, help="output checkpoint directory (give it to pretrain_gdn.py --load)")
    parser.add_argument("--tensor-model-parallel-size", "--target-tensor-model-parallel-size", type=int, default=1,
                        dest="tensor_model_parallel_size", help="TP size of the checkpoint (of the run that loads it)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this x TP (as pretrain_gdn.py does)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece model to record (default: the directory's tokenizer.model, if any)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle-based pytorch_model.bin weights (only from a source you trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    return parser


def convert(args: argparse.Namespace) -> Path:
    load, save = Path(args.load), Path(args.save)
    if not load.is_dir():
        raise ConversionError(f"{load} is not a directory; --load takes a Hugging Face model directory")
    if args.tensor_model_parallel_size < 1:
        raise ConversionError(f"--tensor-model-parallel-size must be at least 1, got {args.tensor_model_parallel_size}")
    if save.is_dir() and any(save.iterdir()) and not args.overwrite:
        raise ConversionError(f"{save} exists and is not empty; pass --overwrite to replace it")
    config, state, fmt = load_hf_model_state(load, args.allow_pickle)
    tokenizer = Path(args.tokenizer_model) if args.tokenizer_model else load / "tokenizer.model"
    if args.tokenizer_model and not tokenizer.is_file():
        raise ConversionError(f"--tokenizer-model {tokenizer}: no such file")
    true_vocab = config.vocab_size
    padded = padded_vocab_size(true_vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    config = dataclasses.replace(config, vocab_size=padded)
    state = resize_vocabulary(state, padded)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embeddings.weight"]
    # What the exporter needs to undo the padding, and the run needs to find its tokenizer.
    run_args = {"vocab_size": true_vocab, "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
                "tokenizer_model": None, "converted_from": str(load.absolute()), "converted_format": fmt}
    with staged_directory(save, args.overwrite, protect=(load,)) as staging:
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, staging / "tokenizer.model")
            run_args["tokenizer_model"] = str(save.absolute() / "tokenizer.model")
        write_full_checkpoint(staging, FullCheckpoint(iteration=0, model_config=config, state=state, args=run_args),
                              args.tensor_model_parallel_size)
    print(f"wrote a TP={args.tensor_model_parallel_size} checkpoint of the {fmt} model {load} to {save} "
          f"(vocabulary {true_vocab} padded to {padded}); continue training with pretrain_gdn.py --load {save} "
          f"--finetune")
    return save


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
