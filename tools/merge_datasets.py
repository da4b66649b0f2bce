"""Merge indexed datasets (.bin/.idx shards) into one, documents in order.

    python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document
    python tools/merge_datasets.py --datasets data/a_text_document data/b_text_document --output-prefix data/ab_text_document

--input DIR takes every PREFIX.idx/PREFIX.bin pair in the directory, sorted by name (as Megatron-LM's
merge tool does); --datasets takes prefixes in the order given. All inputs must have the same token
dtype. The output is the same bytes as tokenizing all inputs in one run; it appears only once complete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gdn.data.errors import DataError  # noqa: E402
from megatron_gdn.data.indexed_dataset import datasets_in_directory, merge_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory holding the datasets to merge (every PREFIX.idx/.bin, sorted)")
    source.add_argument("--datasets", nargs="+", help="dataset prefixes to merge, in this order")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    args = parser.parse_args(argv)
    try:
        prefixes = datasets_in_directory(args.input) if args.input else args.datasets
        merged = merge_datasets(prefixes, args.output_prefix)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx: "
          f"{merged.num_documents} documents, {len(merged)} sequences, {merged.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
