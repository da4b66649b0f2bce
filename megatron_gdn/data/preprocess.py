"""Tokenize JSONL corpora into Megatron indexed datasets (the engine of tools/preprocess_data.py).

Design, for throughput close to SentencePiece's own batched encode and memory flat in corpus size:

- The input is cut into tasks: byte ranges of each plain file (a task owns the lines that *start* in
  its range), and blocks of whole lines read from each .gz stream. Tasks are numbered in file order.
- Each worker process reads its task's bytes itself, parses the JSON lines, encodes the texts in
  batches with one SentencePiece call, and writes the tokens (.bin, in the output dtype) and the
  document lengths (.npy) of the task to a shard file. Only a task description goes to the worker
  and a few counters come back: no per-document inter-process traffic.
- The parent appends the shards to the output in task order, as they complete, and deletes them.
  Documents keep their file order, so the output is the same bytes for any number of workers
  (and for any number of MPI ranks, see run_mpi).
- Everything is written under temporary names and renamed at the end; a failed run leaves the
  previous files (if any) untouched under the final names and no temporary files behind.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron_gdn.data.corpus import BadLine, is_gzip, open_binary, parse_json_line
from megatron_gdn.data.errors import DataError
from megatron_gdn.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megatron_gdn.data.tokenizer import SentencePieceTokenizer

# Texts are sent to SentencePiece in batches of about this many characters: large enough that the
# per-call overhead vanishes, small enough that the id arrays of one batch stay a few MB.
BATCH_CHARS = 1 << 20
MIN_TASK_BYTES = 1 << 20
MAX_TASK_BYTES = 16 << 20
# .gz tasks carry their lines from the parent (two per worker in flight), so they stay small.
MAX_GZIP_TASK_BYTES = 4 << 20


@dataclass
class PreprocessConfig:
    inputs: list[str]  # files, already expanded (corpus.expand_inputs)
    tokenizer_model: str
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    task_bytes: int = 0  # 0: chosen from the corpus size and the worker count (task_size)
    log_interval: int = 1000  # documents between two progress lines
    progress_bar: bool | None = None  # None: a tqdm bar when stderr is a terminal

    def output_prefixes(self) -> list[str]:
        """Megatron's naming: one dataset {prefix}_{key}_document per JSON key."""
        return [f"{self.output_prefix}_{key}_document" for key in self.json_keys]


@dataclass(frozen=True)
class Unit:
    """A plain file's byte range [start, end), or a whole .gz file (start = end = -1)."""

    path: str
    start: int
    end: int
    size: int  # bytes this unit covers, used to balance MPI ranks and to size the progress bar


@dataclass(frozen=True)
class Task:
    number: int
    path: str
    start: int  # byte offset of the task in the (decompressed) file
    end: int
    payload: bytes | None = None  # the lines themselves, for .gz files (which cannot be seeked)
    first_line: int = 0  # 1-based number of the payload's first line (.gz only)


@dataclass
class TaskResult:
    number: int
    shards: list[tuple[str, str]]  # (tokens .bin, document lengths .npy) per JSON key
    documents: int
    tokens: int
    bytes: int


def task_size(total_bytes: int, workers: int) -> int:
    """About 32 tasks per worker, so the last tasks balance well, within [1 MB, 16 MB]. A worker streams its
    task line by line, so the task size does not change its memory (except for .gz payloads)."""
    return int(min(MAX_TASK_BYTES, max(MIN_TASK_BYTES, total_bytes // (32 * max(workers, 1)))))


def plan_units(paths: list[str], task_bytes: int) -> list[Unit]:
    units = []
    for path in paths:
        size = os.path.getsize(path)
        if is_gzip(path):
            units.append(Unit(path, -1, -1, size))
            continue
        for start in range(0, size, task_bytes):
            end = min(start + task_bytes, size)
            units.append(Unit(path, start, end, end - start))
    return units


def iter_tasks(units: list[Unit], task_bytes: int, first_number: int = 0) -> Iterator[Task]:
    """Tasks in file order; .gz files are read here, block by block, as the workers need them."""
    number = first_number
    for unit in units:
        if unit.start >= 0:
            yield Task(number, unit.path, unit.start, unit.end)
            number += 1
            continue
        offset, line = 0, 1
        with open_binary(unit.path) as stream:
            while True:
                block = stream.read(min(task_bytes, MAX_GZIP_TASK_BYTES))
                if not block:
                    break
                if not block.endswith(b"\n"):
                    block += stream.readline()
                yield Task(number, unit.path, offset, offset + len(block), payload=block, first_line=line)
                number += 1
                offset += len(block)
                line += block.count(b"\n")


def task_lines(task: Task) -> Iterator[tuple[int, int, bytes]]:
    """(line index in the task, byte offset in the file, line) of every line the task owns, streamed.

    A plain-file task owns the lines that start in [task.start, task.end); a .gz task owns its payload."""
    if task.payload is not None:
        stream, position = io.BytesIO(task.payload), task.start
    else:
        stream = open(task.path, "rb")
        if task.start > 0:
            # The line running across task.start belongs to the previous task: skip to its end.
            stream.seek(task.start - 1)
            stream.readline()
        position = stream.tell()
    with stream:
        for index, line in enumerate(iter(stream.readline, b"")):
            if task.payload is None and position >= task.end:
                return
            yield index, position, line
            position += len(line)


def line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at a byte offset (counted only when reporting an error)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(16 << 20, offset - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


class _Encoder:
    """Per-process state of a worker: the tokenizer and where its shards go."""

    def __init__(self, config: PreprocessConfig, shard_directory: str) -> None:
        self.tokenizer = SentencePieceTokenizer(config.tokenizer_model)
        self.dtype = optimal_dtype(self.tokenizer.vocab_size)
        self.keys = config.json_keys
        self.eod = np.array([self.tokenizer.eod], dtype=self.dtype) if config.append_eod else None
        self.shard_directory = shard_directory
        self._tokens = np.empty(1 << 20, dtype=self.dtype)  # output buffer, grown to the largest batch

    def run(self, task: Task) -> TaskResult:
        shards = [
            (os.path.join(self.shard_directory, f"{task.number:09d}.{k}.bin"),
             os.path.join(self.shard_directory, f"{task.number:09d}.{k}.npy"))
            for k in range(len(self.keys))
        ]
        outputs = [open(tokens_path, "wb") for tokens_path, _ in shards]
        lengths: list[list[np.ndarray]] = [[] for _ in self.keys]
        batch: list[list[str]] = [[] for _ in self.keys]
        batch_lines: list[tuple[int, int]] = []  # (line index, byte offset) of each batched document
        batch_chars = documents = tokens = consumed = 0

        def where(index: int, offset: int) -> str:
            if task.payload is not None:
                return f"{task.path}:{task.first_line + index}"
            return f"{task.path}:{line_number(task.path, offset)}"

        def flush() -> int:
            try:
                return self._encode(batch, outputs, lengths)
            except (UnicodeEncodeError, TypeError):
                # SentencePiece refuses a str that is not valid Unicode; find which document it was.
                bad = next((batch_lines[i] for i, texts in enumerate(zip(*batch)) if not _encodable(texts)), None)
                if bad is None:
                    raise
                raise DataError(f"{where(*bad)}: the text holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                f"which is not valid Unicode") from None
            finally:
                batch_lines.clear()
                for texts in batch:
                    texts.clear()

        try:
            for index, offset, line in task_lines(task):
                consumed += len(line)
                if not line.strip():
                    continue
                try:
                    texts = parse_json_line(line, self.keys)
                except BadLine as error:
                    raise DataError(f"{where(index, offset)}: {error}") from None
                for k, text in enumerate(texts):
                    batch[k].append(text)
                    batch_chars += len(text)
                batch_lines.append((index, offset))
                documents += 1
                if batch_chars >= BATCH_CHARS:
                    tokens += flush()
                    batch_chars = 0
            tokens += flush()
        finally:
            for output in outputs:
                output.close()
        for (_, lengths_path), pieces in zip(shards, lengths):
            np.save(lengths_path, np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32))
        return TaskResult(task.number, shards, documents, tokens, consumed)

    def _encode(self, batch: list[list[str]], outputs: list, lengths: list[list[np.ndarray]]) -> int:
        """Encode one batch per JSON key with a single SentencePiece call; append tokens and lengths."""
        written = 0
        for k, texts in enumerate(batch):
            if not texts:
                continue
            encoded = self.tokenizer.tokenize_batch(texts)
            pieces: list[np.ndarray] = []
            sizes = np.empty(len(encoded), dtype=np.int32)
            for i, ids in enumerate(encoded):
                pieces.append(ids)
                # --append-eod closes every non-empty document with the eod token; empty ones stay empty.
                if self.eod is not None and len(ids):
                    pieces.append(self.eod)
                    sizes[i] = len(ids) + 1
                else:
                    sizes[i] = len(ids)
            count = int(sizes.sum(dtype=np.int64))
            if len(self._tokens) < count:
                self._tokens = np.empty(max(count, 2 * len(self._tokens)), dtype=self.dtype)
            # Into one reused buffer, cast on the way: no large temporary arrays per batch, which would
            # fragment the heap and make a long-running worker's memory creep up.
            np.concatenate(pieces, out=self._tokens[:count], casting="unsafe")
            outputs[k].write(memoryview(self._tokens[:count]))
            lengths[k].append(sizes)
            written += count
        return written


def _encodable(texts: tuple[str, ...]) -> bool:
    try:
        for text in texts:
            text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# The worker processes' encoder, created once per process by the pool initializer.
_worker: _Encoder | None = None


def _init_worker(config: PreprocessConfig, shard_directory: str) -> None:
    global _worker
    _worker = _Encoder(config, shard_directory)


def _run_task(task: Task) -> TaskResult:
    assert _worker is not None
    return _worker.run(task)


class Progress:
    """Counts documents, tokens and bytes; prints Megatron-style lines every log_interval documents and
    drives a tqdm bar when stderr is a terminal."""

    def __init__(self, total_bytes: int | None, log_interval: int, bar: bool | None, label: str = "", stream=sys.stderr) -> None:
        self.documents = self.tokens = self.bytes = 0
        self.label = label
        self.log_interval = log_interval
        self.next_log = log_interval
        self.stream = stream
        self.started = time.perf_counter()
        self.bar = None
        if bar or (bar is None and stream.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=stream)

    def update(self, result: TaskResult) -> None:
        self.documents += result.documents
        self.tokens += result.tokens
        self.bytes += result.bytes
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(result.bytes)
            self.bar.set_postfix_str(f"{self.documents} docs, {self.tokens / 1e6:.1f}M tokens, {self.tokens / elapsed / 1e6:.2f}M tok/s")
        elif self.log_interval > 0 and self.documents >= self.next_log:
            print(f"{self.label}processed {self.documents} documents ({self.tokens} tokens) "
                  f"{self.bytes / elapsed / 1e6:.1f} MB/s, {self.tokens / elapsed / 1e6:.2f}M tokens/s",
                  file=self.stream, flush=True)
            self.next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def encode_units(config: PreprocessConfig, units: list[Unit], output_prefixes: list[str], task_bytes: int,
                 on_result: Callable[[TaskResult], None] | None = None, require_documents: bool = True) -> tuple[int, int]:
    """Tokenize the units into datasets at output_prefixes (one per JSON key), atomically.

    Returns (documents, tokens). Raises DataError on bad input, after removing every temporary file.
    """
    tokenizer = SentencePieceTokenizer(config.tokenizer_model)
    dtype = optimal_dtype(tokenizer.vocab_size)
    for prefix in output_prefixes:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    shard_directory = tempfile.mkdtemp(prefix=os.path.basename(output_prefixes[0]) + ".shards-",
                                       dir=os.path.dirname(os.path.abspath(output_prefixes[0])))
    builders = [IndexedDatasetBuilder(prefix, dtype) for prefix in output_prefixes]
    documents = tokens = 0

    def merge(result: TaskResult) -> None:
        nonlocal documents, tokens
        for builder, (tokens_path, lengths_path) in zip(builders, result.shards):
            builder.add_raw_documents(tokens_path, np.load(lengths_path))
            os.remove(tokens_path)
            os.remove(lengths_path)
        documents += result.documents
        tokens += result.tokens
        if on_result is not None:
            on_result(result)

    try:
        tasks = iter_tasks(units, task_bytes)
        if config.workers <= 1:
            encoder = _Encoder(config, shard_directory)
            for task in tasks:
                merge(encoder.run(task))
        else:
            _encode_in_pool(config, shard_directory, tasks, merge)
        if documents == 0 and require_documents:
            raise DataError(f"{', '.join(config.inputs)}: no documents (the input is empty)")
        for builder in builders:
            builder.finalize()
    finally:
        for builder in builders:
            if not builder.finished:
                builder.abort()
        shutil.rmtree(shard_directory, ignore_errors=True)
    return documents, tokens


def _encode_in_pool(config: PreprocessConfig, shard_directory: str, tasks: Iterator[Task],
                    merge: Callable[[TaskResult], None]) -> None:
    """Run the tasks on config.workers processes and merge their results in task order.

    At most two tasks per worker are in flight: memory stays bounded (.gz payloads, shard files) and each
    result is merged as soon as the tasks before it are. A process pool executor, unlike
    multiprocessing.Pool, notices a worker that dies (e.g. killed for memory) instead of waiting forever."""
    # fork shares the loaded modules with the workers; spawn where fork does not exist.
    global _worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        # Load the tokenizer once, before the fork: the workers share its pages instead of each loading
        # a copy (measured: a few MB less and slightly faster with 2 workers).
        _worker = _Encoder(config, shard_directory)
        initializer, initargs = None, ()
    else:
        initializer, initargs = _init_worker, (config, shard_directory)
    with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context(method),
                             initializer=initializer, initargs=initargs) as pool:
        pending: deque[tuple[Task, Future]] = deque()

        def merge_oldest() -> None:
            merge(pending[0][1].result())
            pending.popleft()

        try:
            for task in tasks:
                pending.append((task, pool.submit(_run_task, task)))
                if len(pending) >= 2 * config.workers:
                    merge_oldest()
            while pending:
                merge_oldest()
        except BrokenProcessPool:
            task = pending[0][0] if pending else None
            where = f" while tokenizing {task.path} (bytes {task.start}..{task.end})" if task else ""
            raise DataError(f"a tokenizer worker process died{where}; was it killed for lack of memory?") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _worker = None


def preprocess(config: PreprocessConfig) -> tuple[int, int]:
    """Tokenize config.inputs into {output_prefix}_{key}_document.bin/.idx; returns (documents, tokens)."""
    total = sum(os.path.getsize(path) for path in config.inputs)
    task_bytes = config.task_bytes or task_size(total, config.workers)
    units = plan_units(config.inputs, task_bytes)
    plain_total = None if any(is_gzip(path) for path in config.inputs) else total
    progress = Progress(plain_total, config.log_interval, config.progress_bar)
    try:
        documents, tokens = encode_units(config, units, config.output_prefixes(), task_bytes, progress.update)
    finally:
        progress.close()
    return documents, tokens


def split_units(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Contiguous runs of units with about equal bytes, one per MPI rank (some may be empty)."""
    total = max(sum(unit.size for unit in units), 1)
    runs: list[list[Unit]] = [[] for _ in range(parts)]
    done = 0
    for unit in units:
        runs[min(parts - 1, done * parts // total)].append(unit)
        done += unit.size
    return runs


def run_mpi(config: PreprocessConfig) -> tuple[int, int]:
    """Preprocess with several MPI ranks (hosts): each rank tokenizes a contiguous part of the corpus into
    a shard next to the output with its own --workers processes; rank 0 merges the shards in rank order.
    The output is the same bytes as a run without MPI. Needs a file system that every rank sees."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    total = sum(os.path.getsize(path) for path in config.inputs)
    task_bytes = config.task_bytes or task_size(total, config.workers * size)
    mine = split_units(plan_units(config.inputs, task_bytes), size)[rank]
    shard_prefixes = [f"{prefix}.rank{rank:05d}-of-{size:05d}" for prefix in config.output_prefixes()]
    progress = Progress(sum(unit.size for unit in mine), config.log_interval,
                        config.progress_bar if rank == 0 else False, label=f"rank {rank}: ")
    error, counts = None, (0, 0)
    try:
        counts = encode_units(config, mine, shard_prefixes, task_bytes, progress.update, require_documents=False)
    except Exception as failure:  # every rank must reach the collectives below, whatever went wrong
        error = f"rank {rank}: {failure}"
    finally:
        progress.close()
    errors = [message for message in comm.allgather(error) if message]
    all_counts = comm.allgather(counts)
    documents = sum(c[0] for c in all_counts)
    tokens = sum(c[1] for c in all_counts)
    if not errors and documents == 0:
        errors = [f"{', '.join(config.inputs)}: no documents (the input is empty)"]
    if errors:
        _remove_datasets(shard_prefixes)
        raise DataError("; ".join(errors))
    merge_error = None
    if rank == 0:
        try:
            dtype = optimal_dtype(SentencePieceTokenizer(config.tokenizer_model).vocab_size)
            for prefix in config.output_prefixes():
                with IndexedDatasetBuilder(prefix, dtype) as builder:
                    for r in range(size):
                        builder.add_index(f"{prefix}.rank{r:05d}-of-{size:05d}")
                    builder.finalize()
        except Exception as failure:
            merge_error = f"rank 0, merging the shards: {failure}"
        finally:
            for r in range(size):
                _remove_datasets([f"{prefix}.rank{r:05d}-of-{size:05d}" for prefix in config.output_prefixes()])
    merge_error = comm.bcast(merge_error, root=0)
    if merge_error:
        raise DataError(merge_error)
    return documents, tokens


def _remove_datasets(prefixes: list[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if os.path.exists(prefix + suffix):
                os.remove(prefix + suffix)
