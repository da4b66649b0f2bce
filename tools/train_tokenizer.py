"""Train a SentencePiece tokenizer (BPE or unigram) on JSONL or plain-text files.

    python tools/train_tokenizer.py --input data/demo.jsonl --model-prefix data/tokenizer \\
        --vocab-size 8192 --model-type bpe
    # -> data/tokenizer.model, data/tokenizer.vocab

JSONL files (.jsonl, .json, optionally .gz) give the texts under --json-keys; any other file is read as
plain text, one sentence per line. SentencePiece learns from the lines of the texts, sampling
--input-sentence-size of them (that bounds time and memory on large corpora).

Special ids: <unk> 0, <s> 1, </s> 2 (the end-of-document token of --append-eod), <pad> 3, then the
--user-defined-symbols (each always one token). Text is kept exactly: identity normalization, no
whitespace collapsing, byte fallback for characters outside the vocabulary, so decoding the ids of a
text gives the text back, indentation and newlines included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gdn.data.corpus import expand_inputs  # noqa: E402
from megatron_gdn.data.errors import DataError  # noqa: E402
from megatron_gdn.data.tokenizer import (  # noqa: E402
    SentencePieceTokenizer,
    TokenizerTrainingConfig,
    check_special_tokens,
    train_sentencepiece,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TokenizerTrainingConfig(inputs=[], output_prefix="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL / text files or glob patterns")
    parser.add_argument("--json-keys", nargs="+", default=defaults.json_keys, help="keys of the texts in JSONL files")
    parser.add_argument("--model-prefix", "--output-prefix", dest="model_prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="pieces, special ones included")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default=defaults.model_type, help="SentencePiece algorithm")
    parser.add_argument("--user-defined-symbols", nargs="*", default=[], help="extra special tokens, e.g. '<|im_start|>'")
    parser.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    parser.add_argument("--input-sentence-size", type=int, default=defaults.input_sentence_size,
                        help="lines sampled for training (0: all)")
    parser.add_argument("--max-sentence-length", type=int, default=defaults.max_sentence_length,
                        help="longer lines (bytes) are left out of training")
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage,
                        help="share of characters that get their own piece (the rest go to bytes)")
    parser.add_argument("--normalization-rule-name", default=defaults.normalization_rule_name,
                        help="identity keeps text exactly; nmt_nfkc is SentencePiece's default")
    parser.add_argument("--no-split-digits", action="store_true", help="let pieces span several digits")
    parser.add_argument("--add-dummy-prefix", action="store_true", help="add a space before each text (SentencePiece's default)")
    parser.add_argument("--num-threads", type=int, default=defaults.num_threads, help="training threads")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sentence sampling")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        config = TokenizerTrainingConfig(
            inputs=expand_inputs(args.input),
            output_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            json_keys=args.json_keys,
            byte_fallback=not args.no_byte_fallback,
            user_defined_symbols=args.user_defined_symbols,
            input_sentence_size=args.input_sentence_size,
            max_sentence_length=args.max_sentence_length,
            character_coverage=args.character_coverage,
            normalization_rule_name=args.normalization_rule_name,
            split_digits=not args.no_split_digits,
            add_dummy_prefix=args.add_dummy_prefix,
            num_threads=args.num_threads,
            seed=args.seed,
        )
        with open(os.devnull, "w") as quiet:
            model = train_sentencepiece(config, log_stream=None if args.verbose else quiet)
        tokenizer = SentencePieceTokenizer(model)
        check_special_tokens(tokenizer, config.user_defined_symbols)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {model} and {config.output_prefix}.vocab: {tokenizer.vocab_size} pieces "
          f"(eod {tokenizer.eod}, bos {tokenizer.bos}, pad {tokenizer.pad}) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
