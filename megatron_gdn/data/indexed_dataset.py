"""Megatron-LM compatible indexed dataset: ``PREFIX.bin`` (raw tokens) + ``PREFIX.idx`` (MMIDIDX v1).

Byte layout of ``PREFIX.idx`` (little endian, no padding anywhere; docs/DATA.md has the table):

    offset 0        9 bytes   magic b"MMIDIDX\\x00\\x00"
    offset 9        <Q        version, always 1
    offset 17       <B        dtype code of the tokens in .bin (DTYPE_CODES)
    offset 18       <Q        sequence count N
    offset 26       <Q        document count D+1 (length of the document index array)
    offset 34       int32[N]  sequence lengths in tokens
    34+4N           int64[N]  sequence pointers: byte offset of each sequence in .bin
    34+12N          int64[D+1] document indices: document d is sequences [doc[d], doc[d+1]); doc[0]=0, doc[D]=N

``PREFIX.bin`` is the concatenation of all sequences in that dtype, native little-endian, no header.
Megatron-LM's ``IndexedDataset`` reads files written here, and this reader reads Megatron's.

A *document* is what a corpus line became; a *sequence* is a run of tokens inside it. Our preprocessor
writes one sequence per non-empty document and no sequence for an empty one (as Megatron's does).
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np

from megatron_gdn.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document count: exactly 34 bytes.
HEADER = struct.Struct("<9sQBQQ")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}

# Arrays are streamed in pieces of this many elements, so no step holds a whole index in memory.
_CHUNK = 1 << 20


def dtype_code(dtype: np.dtype | type) -> int:
    """The MMIDIDX code of a numpy dtype (raises DataError for dtypes the format has no code for)."""
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise DataError(f"dtype {dtype} has no MMIDIDX code; use one of {sorted(str(d) for d in DTYPE_CODES.values())}")


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary: uint16 below 65500 ids, else int32 (Megatron's rule and threshold)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """True when both PREFIX.bin and PREFIX.idx exist."""
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def byte_pointers(lengths: np.ndarray, itemsize: int, start: int = 0) -> np.ndarray:
    """Byte offset of each sequence given its length in tokens, in int64 (no overflow past 2^31 tokens)."""
    sizes = lengths.astype(np.int64) * itemsize
    pointers = np.empty(len(sizes), dtype=np.int64)
    if len(sizes):
        pointers[0] = start
        np.cumsum(sizes[:-1], out=pointers[1:])
        pointers[1:] += start
    return pointers


class _SpillArray:
    """An append-only int array kept in a small buffer and spilled to a file, so memory stays O(buffer)."""

    def __init__(self, path: str, dtype: type, buffer_size: int) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self._buffer = np.empty(buffer_size, dtype=self.dtype)
        self._used = 0
        self._file = open(path, "wb")
        self.count = 0

    def append(self, value: int) -> None:
        self._buffer[self._used] = value
        self._used += 1
        self.count += 1
        if self._used == len(self._buffer):
            self._flush()

    def extend(self, values: np.ndarray) -> None:
        if len(values) >= len(self._buffer) - self._used:
            self._flush()
            self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        else:
            self._buffer[self._used : self._used + len(values)] = values
            self._used += len(values)
        self.count += len(values)

    def _flush(self) -> None:
        self._file.write(self._buffer[: self._used].tobytes())
        self._used = 0

    def close(self) -> None:
        if not self._file.closed:
            self._flush()
            self._file.close()

    def chunks(self) -> Iterator[np.ndarray]:
        """The stored values in order, _CHUNK at a time (call close() first)."""
        with open(self.path, "rb") as f:
            while True:
                piece = np.fromfile(f, dtype=self.dtype, count=_CHUNK)
                if len(piece) == 0:
                    return
                yield piece


class IndexedDatasetBuilder:
    """Writes PREFIX.bin and PREFIX.idx in the MMIDIDX v1 format.

    Tokens stream to a temporary .bin and the per-sequence lengths and document boundaries to temporary
    side files, so the writer's memory does not grow with the corpus. Nothing appears under the final
    names until finalize(), which writes the .idx and then renames both files into place; on an error
    (or leaving a ``with`` block without finalize) abort() removes every temporary file.
    """

    def __init__(self, prefix: str, dtype: np.dtype | type = np.uint16, buffer_size: int = _CHUNK) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._tmp = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._bin = open(self._tmp + ".bin", "wb")
        self._lengths = _SpillArray(self._tmp + ".lengths", np.int32, buffer_size)
        self._documents = _SpillArray(self._tmp + ".documents", np.int64, buffer_size)
        self._documents.append(0)
        self.num_tokens = 0
        self.finished = False
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._token_range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._token_range = None

    @property
    def num_sequences(self) -> int:
        return self._lengths.count

    @property
    def num_documents(self) -> int:
        return self._documents.count - 1

    def _check_range(self, tokens: np.ndarray) -> None:
        # A silent wrap-around (70000 -> 4464 in uint16) would corrupt the data; refuse instead.
        if self._token_range is None or tokens.size == 0 or tokens.dtype == self.dtype:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < self._token_range[0] or high > self._token_range[1]:
            bad = high if high > self._token_range[1] else low
            raise DataError(
                f"{self.prefix}: token id {bad} does not fit the dataset dtype {self.dtype}; "
                f"build it with dtype=optimal_dtype(vocab_size) (int32 for vocabularies of 65500 or more)"
            )

    def _write_tokens(self, tokens: np.ndarray) -> None:
        self._check_range(tokens)
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += len(tokens)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close it with end_document())."""
        array = _as_token_array(tokens)
        self._write_tokens(array)
        self._lengths.append(len(array))

    def end_document(self) -> None:
        """Close the current document: it holds the sequences added since the previous end_document()."""
        self._documents.append(self.num_sequences)

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append a whole document. ``lengths`` splits it into sequences; by default it is one sequence,
        and an empty document gets no sequence at all (what Megatron's preprocessor writes)."""
        array = _as_token_array(tokens)
        if lengths is None:
            lengths = [len(array)] if len(array) else []
        lengths_array = np.asarray(lengths, dtype=np.int64)
        if int(lengths_array.sum()) != len(array) or (lengths_array < 0).any():
            raise DataError(f"{self.prefix}: sequence lengths {list(lengths)} do not add up to the {len(array)} tokens given")
        self._write_tokens(array)
        self._lengths.extend(lengths_array)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Append many documents at once: ``tokens`` is their concatenation, ``document_lengths`` their
        token counts (zeros allowed). Each non-empty document is one sequence."""
        self._write_tokens(np.asarray(tokens))
        self._add_document_lengths(np.asarray(document_lengths))

    def add_raw_documents(self, tokens_path: str, document_lengths: np.ndarray) -> None:
        """Like add_documents, with the tokens already written in this dataset's dtype in a raw file
        (the shards of tools/preprocess_data.py). The file is copied, never loaded whole."""
        document_lengths = np.asarray(document_lengths)
        expected = int(document_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = os.path.getsize(tokens_path)
        if actual != expected:
            raise DataError(f"{tokens_path}: {actual} bytes, but its lengths say {expected}")
        with open(tokens_path, "rb") as source:
            shutil.copyfileobj(source, self._bin, 16 << 20)
        self.num_tokens += expected // self.dtype.itemsize
        self._add_document_lengths(document_lengths)

    def _add_document_lengths(self, document_lengths: np.ndarray) -> None:
        if (document_lengths < 0).any() or (document_lengths > np.iinfo(np.int32).max).any():
            raise DataError(f"{self.prefix}: document lengths must lie in [0, 2^31)")
        non_empty = document_lengths > 0
        boundaries = self.num_sequences + np.cumsum(non_empty, dtype=np.int64)
        self._lengths.extend(document_lengths[non_empty])
        self._documents.extend(boundaries)

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset PREFIX (same dtype): how shards are merged."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{idx_path(prefix)}: tokens are {other.dtype}, but the merged dataset is {self.dtype}")
        offset = self.num_sequences
        for start in range(0, len(other), _CHUNK):
            self._lengths.extend(other.sequence_lengths[start : start + _CHUNK])
        documents = other.document_indices
        for start in range(1, len(documents), _CHUNK):
            self._documents.extend(documents[start : start + _CHUNK] + offset)
        used_bytes = other.num_tokens * self.dtype.itemsize
        with open(bin_path(prefix), "rb") as source:
            _copy_bytes(source, self._bin, used_bytes)
        self.num_tokens += other.num_tokens

    def finalize(self) -> None:
        """Write PREFIX.idx and move both files to their final names."""
        if self.finished:
            raise RuntimeError(f"{self.prefix}: finalize() called twice")
        try:
            self._bin.close()
            self._lengths.close()
            self._documents.close()
            with open(self._tmp + ".idx", "wb") as index:
                index.write(HEADER.pack(MAGIC, VERSION, self._code, self.num_sequences, self._documents.count))
                for lengths in self._lengths.chunks():
                    index.write(lengths.tobytes())
                start = 0
                for lengths in self._lengths.chunks():
                    pointers = byte_pointers(lengths, self.dtype.itemsize, start)
                    index.write(pointers.tobytes())
                    start += int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize
                for documents in self._documents.chunks():
                    index.write(documents.tobytes())
            # Drop the old index first: at every moment the final names hold the old pair, a .bin
            # without an .idx (not a dataset), or the new pair; never a mismatched pair.
            if os.path.exists(idx_path(self.prefix)):
                os.remove(idx_path(self.prefix))
            os.replace(self._tmp + ".bin", bin_path(self.prefix))
            os.replace(self._tmp + ".idx", idx_path(self.prefix))
            self.finished = True
        finally:
            self._remove_temporaries()

    def abort(self) -> None:
        """Remove every temporary file; the final names are left as they were."""
        self.finished = True
        self._bin.close()
        self._lengths.close()
        self._documents.close()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for suffix in (".bin", ".idx", ".lengths", ".documents"):
            if os.path.exists(self._tmp + suffix):
                os.remove(self._tmp + suffix)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if not self.finished:
            self.abort()


def _as_token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise DataError(f"tokens must be a 1-D sequence of ids, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"tokens must be integer ids, got dtype {array.dtype}")
    return array


def _copy_bytes(source, target, count: int) -> None:
    remaining = count
    while remaining:
        block = source.read(min(remaining, 16 << 20))
        if not block:
            raise DataError(f"{source.name}: ended {remaining} bytes before its index says")
        target.write(block)
        remaining -= len(block)


class IndexedDataset:
    """Memory-mapped reader of PREFIX.bin/.idx.

    ``ds[i]`` is sequence i as a numpy array (a read-only view), ``ds.get(i, offset, length)`` a part of it,
    ``ds.document(d)`` the tokens of document d. The constructor checks the header and that the .bin is as
    long as the index says, and raises DataError naming the file otherwise. Pickling re-opens the files,
    so DataLoader workers can share a dataset object.
    """

    def __init__(self, prefix: str, mmap: bool = True) -> None:
        self.prefix = prefix
        self.mmap = mmap
        index_file = idx_path(prefix)
        data_file = bin_path(prefix)
        for path in (index_file, data_file):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (is --data-path the prefix without .bin/.idx?)")
        self._index_bytes = np.memmap(index_file, dtype=np.uint8, mode="r") if os.path.getsize(index_file) else b""
        if len(self._index_bytes) < HEADER.size:
            raise DataError(f"{index_file}: {len(self._index_bytes)} bytes, shorter than the 34-byte MMIDIDX header")
        magic, version, code, count, document_count = HEADER.unpack(bytes(self._index_bytes[: HEADER.size]))
        if magic != MAGIC:
            raise DataError(f"{index_file}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{index_file}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{index_file}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        needed = HEADER.size + 12 * count + 8 * document_count
        if len(self._index_bytes) < needed:
            raise DataError(f"{index_file}: {len(self._index_bytes)} bytes, but its header needs {needed}; the file is truncated")
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(self._index_bytes, np.int32, count, offset)
        offset += 4 * count
        self.sequence_pointers = np.frombuffer(self._index_bytes, np.int64, count, offset)
        offset += 8 * count
        self.document_indices = np.frombuffer(self._index_bytes, np.int64, document_count, offset)
        if document_count < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != count:
            raise DataError(f"{index_file}: document indices must run from 0 to the sequence count {count}")

        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if count else 0
        size = os.path.getsize(data_file)
        if size < end:
            raise DataError(f"{data_file}: {size} bytes, shorter than the {end} bytes its index {index_file} says")
        self._data_bytes = end
        self._data: np.ndarray | None = None
        self._file = None
        if mmap and end:
            self._data = np.memmap(data_file, dtype=self.dtype, mode="r", shape=(end // self.dtype.itemsize,))
        elif end:
            self._file = open(data_file, "rb")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence ``index`` (to its end when length is None)."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) outside sequence {index} of length {size}")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        if self._data is not None:
            return self._data[start : start + length]
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        buffer = os.pread(self._file.fileno(), length * self.dtype.itemsize, start * self.dtype.itemsize)
        return np.frombuffer(buffer, dtype=self.dtype)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.prefix}: sequence {index} out of range for {len(self)} sequences")
        return self.get(index % len(self))

    def document(self, index: int) -> np.ndarray:
        """All tokens of document ``index`` (its sequences concatenated; empty for an empty document)."""
        first, last = int(self.document_indices[index]), int(self.document_indices[index + 1])
        pieces = [self.get(i) for i in range(first, last)]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def token_chunks(self, chunk_tokens: int = 1 << 24) -> Iterator[tuple[int, np.ndarray]]:
        """(first token position, tokens) over the whole .bin, chunk_tokens at a time."""
        total = self._data_bytes // self.dtype.itemsize
        for start in range(0, total, chunk_tokens):
            count = min(chunk_tokens, total - start)
            if self._data is not None:
                yield start, self._data[start : start + count]
            else:
                buffer = os.pread(self._file.fileno(), count * self.dtype.itemsize, start * self.dtype.itemsize)
                yield start, np.frombuffer(buffer, dtype=self.dtype)

    def locate_token(self, position: int) -> tuple[int, int, int]:
        """(document, sequence, offset within the sequence) of the token at a position of the .bin."""
        starts = self.sequence_pointers // self.dtype.itemsize
        # The last sequence starting at or before the position; empty ones starting there come before it.
        sequence = int(np.searchsorted(starts, position, side="right")) - 1
        document = int(np.searchsorted(self.document_indices, sequence, side="right")) - 1
        return document, sequence, position - int(starts[sequence])

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "mmap": self.mmap}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], state["mmap"])


def validate_vocab(dataset: IndexedDataset | str, vocab_size: int) -> None:
    """Check that every token id of a dataset lies in [0, vocab_size).

    One pass over the .bin (a numpy max per 16M-token chunk, about a second per GB from the page cache),
    skipped when the token dtype cannot hold an id that large (uint16 data and vocab_size > 65535).
    Raises DataError naming the .bin and the document, sequence and position of the first bad id.
    """
    if isinstance(dataset, str):
        dataset = IndexedDataset(dataset)
    if np.issubdtype(dataset.dtype, np.unsignedinteger) and np.iinfo(dataset.dtype).max < vocab_size:
        return
    for start, chunk in dataset.token_chunks():
        bad = (chunk >= vocab_size) | (chunk < 0)
        if bad.any():
            position = start + int(np.argmax(bad))
            token = int(chunk[position - start])
            document, sequence, offset = dataset.locate_token(position)
            raise DataError(
                f"{bin_path(dataset.prefix)}: token id {token} in document {document} (sequence {sequence}, "
                f"token {offset}) is outside the model's vocabulary of {vocab_size}; preprocess the data with "
                f"the model's tokenizer, or give the model a vocabulary that covers it"
            )


def datasets_in_directory(directory: str) -> list[str]:
    """Prefixes of the .bin/.idx pairs in a directory, sorted (how Megatron's merge tool orders them)."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory")
    prefixes = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".idx"):
            prefix = os.path.join(directory, name[: -len(".idx")])
            if not os.path.isfile(bin_path(prefix)):
                raise DataError(f"{idx_path(prefix)}: has no matching .bin")
            prefixes.append(prefix)
    if not prefixes:
        raise DataError(f"{directory}: no .idx/.bin datasets in it")
    return prefixes


def merge_datasets(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets (documents in the given order) into OUTPUT_PREFIX.bin/.idx, atomically.
    The result is byte-identical to writing all their documents with one builder."""
    if not prefixes:
        raise DataError("no datasets to merge")
    if os.path.abspath(output_prefix) in {os.path.abspath(prefix) for prefix in prefixes}:
        raise DataError(f"{output_prefix}: the output would overwrite one of the inputs")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize()
    return IndexedDataset(output_prefix)
