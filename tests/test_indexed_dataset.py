"""The MMIDIDX v1 writer and reader: byte layout (written independently with struct), round trips,
merging, and clear errors for damaged files."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from megatron_gdn.data import indexed_dataset as idx
from megatron_gdn.data.errors import DataError
from megatron_gdn.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    byte_pointers,
    merge_datasets,
    optimal_dtype,
    validate_vocab,
)
from test_data_corpus import run_tool  # noqa: E402


def expected_files(documents: list[list[list[int]]], code: int, fmt: str) -> tuple[bytes, bytes]:
    """The .bin and .idx bytes of documents (each a list of sequences), built from the documented layout
    with struct only: magic | <Q 1 | <B code | <Q N | <Q D+1 | int32 lengths | int64 pointers | int64 docs."""
    sequences = [s for document in documents for s in document]
    lengths = [len(s) for s in sequences]
    itemsize = struct.calcsize("<" + fmt)
    pointers, position = [], 0
    for length in lengths:
        pointers.append(position)
        position += length * itemsize
    boundaries, count = [0], 0
    for document in documents:
        count += len(document)
        boundaries.append(count)
    tokens = [t for s in sequences for t in s]
    data = struct.pack(f"<{len(tokens)}{fmt}", *tokens)
    index = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
             + struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(boundaries))
             + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
             + struct.pack(f"<{len(boundaries)}q", *boundaries))
    return data, index


def random_documents(seed: int, count: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        length = int(rng.choice([0, 1, 2, int(rng.integers(3, 300))]))
        documents.append(rng.integers(0, vocab, size=length).tolist())
    return documents


def write(prefix: str, documents: list[list[int]], dtype, **kwargs) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype, **kwargs) as builder:
        for document in documents:
            builder.add_document(document)
        builder.finalize()
    return IndexedDataset(prefix)


def test_header_and_arrays_match_the_documented_layout_byte_by_byte(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document([5, 6, 7])
        builder.add_document([])  # an empty document: no sequence
        builder.add_item([1])
        builder.add_item([65535, 0])  # a document of two sequences
        builder.end_document()
        builder.add_document([9] * 4, lengths=[1, 3])
        builder.finalize()
    data, index = expected_files([[[5, 6, 7]], [], [[1], [65535, 0]], [[9], [9, 9, 9]]], code=8, fmt="H")
    assert open(prefix + ".bin", "rb").read() == data
    assert open(prefix + ".idx", "rb").read() == index
    assert len(index) == 34 + 12 * 5 + 8 * 5  # 34-byte header, no padding anywhere


def test_large_vocabulary_uses_int32(tmp_path):
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32
    documents = [[0, 65535, 65536, 200_000], [], [131_071]]
    ds = write(str(tmp_path / "big"), documents, optimal_dtype(250_000))
    data, index = expected_files([[d] if d else [] for d in documents], code=4, fmt="i")
    assert open(tmp_path / "big.bin", "rb").read() == data
    assert open(tmp_path / "big.idx", "rb").read() == index
    assert [ds.document(d).tolist() for d in range(3)] == documents


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65535), (np.int32, 2**31 - 1), (np.uint8, 256)])
def test_round_trip_of_random_documents(tmp_path, dtype, vocab):
    documents = random_documents(seed=vocab, count=400, vocab=vocab)
    ds = write(str(tmp_path / "rt"), documents, dtype)
    assert ds.num_documents == len(documents)
    assert len(ds) == sum(1 for d in documents if d)  # empty documents have no sequence
    assert ds.num_tokens == sum(len(d) for d in documents)
    for d, document in enumerate(documents):
        assert ds.document(d).tolist() == document
    # Partial reads, the file-reading (no mmap) path and pickling all give the same tokens.
    plain = IndexedDataset(str(tmp_path / "rt"), mmap=False)
    restored = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        full = ds[i]
        assert plain[i].tolist() == restored[i].tolist() == full.tolist()
        if len(full) > 3:
            assert ds.get(i, 1, 2).tolist() == full[1:3].tolist() == plain.get(i, 1, 2).tolist()


def test_writer_memory_does_not_depend_on_corpus_size(tmp_path, monkeypatch):
    """Lengths and boundaries go to side files through a fixed buffer and are streamed back in chunks:
    a tiny buffer and chunk give the same bytes as the defaults."""
    documents = random_documents(seed=1, count=200, vocab=1000)
    write(str(tmp_path / "default"), documents, np.uint16)
    monkeypatch.setattr(idx, "_CHUNK", 3)
    write(str(tmp_path / "tiny"), documents, np.uint16, buffer_size=2)
    for suffix in (".bin", ".idx"):
        assert open(tmp_path / f"tiny{suffix}", "rb").read() == open(tmp_path / f"default{suffix}", "rb").read()


def test_pointers_are_int64_past_two_to_the_31_tokens():
    lengths = np.full(6, 2**30, dtype=np.int32)
    pointers = byte_pointers(lengths, itemsize=4, start=2**40)
    assert pointers.dtype == np.int64
    assert pointers.tolist() == [2**40 + k * 2**32 for k in range(6)]


def test_merging_equals_writing_at_once(tmp_path):
    documents = random_documents(seed=7, count=120, vocab=30_000)
    parts = [documents[:50], [], documents[50:51], documents[51:]]  # includes an empty shard
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for k, part in enumerate(parts):
        write(str(shard_dir / f"part_{k}"), part, np.uint16)
    write(str(tmp_path / "whole"), documents, np.uint16)
    merge_datasets([str(shard_dir / f"part_{k}") for k in range(len(parts))], str(tmp_path / "merged"))
    result = run_tool("merge_datasets.py", "--input", str(shard_dir), "--output-prefix", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    for name in ("merged", "cli"):
        for suffix in (".bin", ".idx"):
            assert open(tmp_path / f"{name}{suffix}", "rb").read() == open(tmp_path / f"whole{suffix}", "rb").read()


def test_merging_refuses_mixed_dtypes(tmp_path):
    write(str(tmp_path / "a"), [[1, 2]], np.uint16)
    write(str(tmp_path / "b"), [[1, 2]], np.int32)
    with pytest.raises(DataError, match="b.idx: tokens are int32, but the merged dataset is uint16"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    assert not os.path.exists(tmp_path / "ab.idx") and not os.path.exists(tmp_path / "ab.bin")


def test_failed_write_leaves_nothing_and_keeps_the_old_dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2, 3]], np.uint16)
    before = open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()
    with pytest.raises(DataError, match="token id 70000 does not fit the dataset dtype uint16"):
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            builder.add_document([4, 5])
            builder.add_document([70000])
    assert (open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def corrupt(tmp_path, edit) -> str:
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    edit(prefix)
    return prefix


def patch_bytes(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("edit, message", [
    (lambda p: patch_bytes(p + ".idx", 0, b"NOTMMIDX\x00"), r"ds.idx: not an MMIDIDX index \(magic"),
    (lambda p: patch_bytes(p + ".idx", 9, struct.pack("<Q", 2)), "ds.idx: index version 2, only version 1"),
    (lambda p: patch_bytes(p + ".idx", 17, struct.pack("<B", 99)), "ds.idx: unknown dtype code 99"),
    (lambda p: os.truncate(p + ".idx", 50), "ds.idx: 50 bytes, but its header needs"),
    (lambda p: os.truncate(p + ".idx", 10), "shorter than the 34-byte MMIDIDX header"),
    (lambda p: os.truncate(p + ".bin", 6), "ds.bin: 6 bytes, shorter than the 10 bytes its index"),
    (lambda p: os.remove(p + ".bin"), "ds.bin: no such file"),
])
def test_damaged_files_give_a_clear_error(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit)
    with pytest.raises(DataError, match=message):
        IndexedDataset(prefix)


def test_reads_files_written_by_another_writer(tmp_path):
    """A Megatron-written pair (built here from the layout with struct), including the trailing int8
    modes array a multimodal Megatron dataset carries after the document indices."""
    documents = [[[3, 1, 4, 1, 5]], [[9, 2], [6]], []]
    data, index = expected_files(documents, code=4, fmt="i")
    (tmp_path / "m.bin").write_bytes(data)
    (tmp_path / "m.idx").write_bytes(index + bytes(3))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 3
    assert [ds.document(d).tolist() for d in range(3)] == [[3, 1, 4, 1, 5], [9, 2, 6], []]


def test_validate_vocab_names_the_document(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix, [[1, 2], [], [3, 4, 31999], [5, 32000, 6]], np.uint16)
    validate_vocab(prefix, 32001)
    with pytest.raises(DataError, match=r"ds.bin: token id 32000 in document 3 \(sequence 2, token 1\) is outside "
                                        r"the model's vocabulary of 32000"):
        validate_vocab(prefix, 32000)
    validate_vocab(prefix, 70000)  # uint16 cannot hold an id that large: nothing to scan
