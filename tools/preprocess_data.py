"""Tokenize JSONL corpora into Megatron-LM indexed datasets ({output_prefix}_{key}_document.bin/.idx).

    python tools/preprocess_data.py --input data/demo.jsonl --tokenizer-model data/tokenizer.model \\
        --output-prefix data/demo --append-eod --workers 2
    # -> data/demo_text_document.bin / .idx; train with --data-path data/demo_text_document

--input takes files, glob patterns and .jsonl.gz files. Documents keep their input order, and the
output is the same bytes for any --workers. Several hosts can split one corpus (a shared file system
is needed; rank 0 merges the shards):

    mpiexec -n 4 python tools/preprocess_data.py ... --workers 16 --mpi

Each worker reads its own byte ranges of the input and encodes whole batches with SentencePiece, so
throughput is close to SentencePiece's own batched encode (docs/PERFORMANCE.md); memory does not grow
with the corpus. A failed run leaves no output under the final names (docs/DATA.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gdn.data.corpus import expand_inputs  # noqa: E402
from megatron_gdn.data.errors import DataError  # noqa: E402
from megatron_gdn.data.preprocess import PreprocessConfig, preprocess, run_mpi  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns (.jsonl.gz read as gzip)")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the texts; one output dataset per key")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                       choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer"],
                       help="accepted for Megatron command lines; both mean a SentencePiece model")
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file (tools/train_tokenizer.py)")
    group.add_argument("--append-eod", action="store_true", help="append the eod token after each non-empty document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (one core each)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines (0: none)")
    group.add_argument("--task-mb", type=float, default=0.0,
                       help="MB of input per task (0: about 32 tasks per worker, between 1 and 16 MB)")
    group.add_argument("--no-progress-bar", action="store_true", help="log lines instead of a bar, even on a terminal")
    group.add_argument("--mpi", action="store_true", help="split the corpus over the ranks of mpiexec (needs mpi4py)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = 0
    started = time.perf_counter()
    try:
        config = PreprocessConfig(
            inputs=expand_inputs(args.input),
            tokenizer_model=args.tokenizer_model,
            output_prefix=args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            task_bytes=int(args.task_mb * (1 << 20)),
            log_interval=args.log_interval,
            progress_bar=False if args.no_progress_bar else None,
        )
        if args.mpi:
            try:
                from mpi4py import MPI
            except ImportError:
                raise DataError("--mpi needs mpi4py (pip install mpi4py) and an MPI launcher such as mpiexec") from None
            rank = MPI.COMM_WORLD.Get_rank()
            documents, tokens = run_mpi(config)
        else:
            documents, tokens = preprocess(config)
    except DataError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    if rank == 0:
        elapsed = time.perf_counter() - started
        for prefix in config.output_prefixes():
            print(f"wrote {prefix}.bin/.idx")
        print(f"{documents} documents, {tokens} tokens in {elapsed:.1f} s ({tokens / elapsed / 1e6:.2f}M tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
