"""Convert a megatron_gdn training checkpoint into a Hugging Face model directory.

    python tools/convert_checkpoint_to_hf.py --load checkpoints/run1 --save hf/run1 --format qwen3_next
    python tools/convert_checkpoint_to_hf.py --load checkpoints/run1 --iteration 2000 --save hf/run1-fla \\
        --format fla --dtype bf16

Formats (docs/HF_EXPORT.md):
  fla         flash-linear-attention's GatedDeltaNetForCausalLM (model_type "gated_deltanet"); loads with
              AutoModelForCausalLM after `import fla`, and with megatron_gdn's GatedDeltaNetForCausalLM.from_pretrained.
  qwen3_next  stock transformers' Qwen3NextForCausalLM, every layer linear_attention with a dense MLP;
              loads with AutoModelForCausalLM and no extra package.

The tensor-parallel shards of the checkpoint are merged (parallel/sharding.py's rule), the vocabulary
padding is removed (the true size is the tokenizer's, or --vocab-size for models trained on mock data),
and the directory gets config.json, generation_config.json, model.safetensors (sharded above
--max-shard-size, with model.safetensors.index.json) and the tokenizer: tokenizer.model plus
tokenizer.json / tokenizer_config.json / special_tokens_map.json. Everything is written into a temporary
directory renamed into place at the end, so a failure leaves nothing behind.

Exit codes: 0 on success, 2 for bad input (a one-line "error: ..." on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gdn.models.hf_conversion import (DEFAULT_MAX_SHARD_SIZE, DTYPES, FORMATS, ConversionError,  # noqa: E402
                                               check_expressible, parse_size, resize_vocabulary, run_tool,
                                               staged_directory, write_hf_model, write_tokenizer_files)
from megatron_gdn.training.full_checkpoint import read_full_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (the --save of pretrain_gdn.py)")
    parser.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the latest)")
    parser.add_argument("--save", required=True, help="output directory of the Hugging Face model")
    parser.add_argument("--format", required=True, help=f"output format: {' or '.join(FORMATS)}")
    parser.add_argument("--dtype", default="bf16", help="weight dtype: bf16 or fp32 (A_log and dt_bias stay fp32)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="SentencePiece model of the training data (default: the checkpoint's --tokenizer-model)")
    parser.add_argument("--no-tokenizer", action="store_true", help="write the model only, no tokenizer files")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="true vocabulary size (default: the tokenizer's, or --vocab-size of a mock-data run)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="split model.safetensors into files of at most this size (e.g. 5GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save directory")
    return parser


def true_vocab_size(args: argparse.Namespace, run_args: dict, tokenizer_model: str | None, padded: int) -> int:
    """The vocabulary without Megatron's padding rows: --vocab-size, else the run's mock-data --vocab-size,
    else the tokenizer's size."""
    if args.vocab_size is not None:
        size = args.vocab_size
    elif run_args.get("vocab_size"):
        size = int(run_args["vocab_size"])
    elif tokenizer_model is not None:
        import sentencepiece as spm

        size = spm.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()
    else:
        raise ConversionError("cannot tell the true vocabulary size (the checkpoint names no tokenizer and no "
                              "--vocab-size): pass --tokenizer-model or --vocab-size")
    if not 0 < size <= padded:
        raise ConversionError(f"vocabulary size {size} does not fit the model's {padded} embedding rows")
    return size


def find_tokenizer(args: argparse.Namespace, run_args: dict) -> str | None:
    """The run's SentencePiece model: --tokenizer-model, else the one the run trained with (if it is still there).
    With --no-tokenizer a missing file is no error (it then only serves to tell the vocabulary size)."""
    path = args.tokenizer_model or run_args.get("tokenizer_model")
    if path is None:
        return None
    if not os.path.isfile(path):
        if args.no_tokenizer and not args.tokenizer_model:
            return None
        how = "" if args.tokenizer_model else " (recorded in the checkpoint's args)"
        raise ConversionError(f"tokenizer model {path}{how} not found: pass --tokenizer-model PATH or --no-tokenizer")
    return path


def convert(args: argparse.Namespace) -> Path:
    if args.format not in FORMATS:
        raise ConversionError(f"--format {args.format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if args.dtype not in DTYPES:
        raise ConversionError(f"--dtype {args.dtype!r} is not supported; choose bf16 or fp32")
    parse_size(args.max_shard_size)
    save = Path(args.save)
    if save.is_dir() and any(save.iterdir()) and not args.overwrite:  # before the (slow) read of the checkpoint
        raise ConversionError(f"{save} exists and is not empty; pass --overwrite to replace it")
    checkpoint = read_full_checkpoint(args.load, args.iteration)
    config = checkpoint.model_config
    check_expressible(config, args.format)
    tokenizer_model = find_tokenizer(args, checkpoint.args)
    vocab = true_vocab_size(args, checkpoint.args, tokenizer_model, config.vocab_size)
    special_ids = {}
    if tokenizer_model is not None:
        from megatron_gdn.data.tokenizer import SentencePieceTokenizer

        tokenizer = SentencePieceTokenizer(tokenizer_model)
        special_ids = dict(bos_token_id=tokenizer.bos if tokenizer.bos >= 0 else None, eos_token_id=tokenizer.eod,
                           pad_token_id=tokenizer.pad)
    config = dataclasses.replace(config, vocab_size=vocab, **special_ids)
    state = resize_vocabulary(checkpoint.state, vocab)
    with staged_directory(save, args.overwrite, protect=(args.load,)) as staging:
        # The tokenizer first: its check loads the directory, which must not have a config.json yet.
        if tokenizer_model is not None and not args.no_tokenizer:
            write_tokenizer_files(staging, tokenizer_model)
        write_hf_model(staging, config, state, args.format, DTYPES[args.dtype], args.max_shard_size)
    print(f"wrote {args.format} model (iteration {checkpoint.iteration}, TP {checkpoint.tensor_parallel_size} merged, "
          f"vocabulary {vocab} of {checkpoint.model_config.vocab_size} rows, {args.dtype}) to {save}"
          + (" without tokenizer files" if args.no_tokenizer or tokenizer_model is None else ""))
    return save


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
