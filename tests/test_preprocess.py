"""tools/preprocess_data.py: the output is Megatron's, the same bytes for any number of workers or MPI
ranks, and bad input gives a one-line error naming the file and line with no output left behind."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from megatron_gdn.data.corpus import expand_inputs
from megatron_gdn.data.errors import DataError
from megatron_gdn.data.indexed_dataset import IndexedDataset
from megatron_gdn.data.preprocess import PreprocessConfig, preprocess
from megatron_gdn.data.tokenizer import SentencePieceTokenizer
from test_data_corpus import corpus_texts, run_tool, tool, train_tiny_tokenizer, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], list[str]]:
    """Three input files (one gzip) holding the test corpus, with blank lines; returns (files, texts)."""
    directory = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts()
    parts = [texts[:60], texts[60:61] + [""], texts[61:]]
    files = [write_jsonl(directory / "a.jsonl", parts[0]), write_jsonl(directory / "b.jsonl.gz", parts[1], compress=True),
             write_jsonl(directory / "c.jsonl", parts[2])]
    with open(files[2], "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    return [str(f) for f in files], parts[0] + parts[1] + parts[2]


def run(model: str, inputs: list[str], prefix: str, **overrides) -> tuple[int, int]:
    config = PreprocessConfig(inputs=inputs, tokenizer_model=model, output_prefix=prefix, append_eod=True,
                              log_interval=0, progress_bar=False)
    for name, value in overrides.items():
        setattr(config, name, value)
    return preprocess(config)


def read(prefix: str) -> tuple[bytes, bytes]:
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_output_is_megatron_layout_of_the_tokenized_documents(model, corpus, tmp_path):
    """Expected bytes built independently: SentencePiece ids per document, eod after each non-empty one,
    an empty document with no sequence, uint16 tokens, the documented .idx layout."""
    files, texts = corpus
    documents, tokens = run(model, files, str(tmp_path / "out"))
    tokenizer = SentencePieceTokenizer(model)
    encoded = [tokenizer.tokenize(text) for text in texts]
    sequences = [ids + [tokenizer.eod] for ids in encoded if ids]
    lengths = [len(s) for s in sequences]
    flat = [t for s in sequences for t in s]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2
    boundaries = np.concatenate([[0], np.cumsum([1 if ids else 0 for ids in encoded])])
    index = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sequences), len(boundaries))
             + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
             + struct.pack(f"<{len(boundaries)}q", *boundaries))
    assert read(str(tmp_path / "out_text_document")) == (struct.pack(f"<{len(flat)}H", *flat), index)
    assert (documents, tokens) == (len(texts), len(flat))
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_any_number_of_workers_gives_the_same_bytes(model, corpus, tmp_path):
    files, _ = corpus
    run(model, files, str(tmp_path / "w1"), workers=1)
    # Tiny tasks: many byte ranges, most of them cutting through a line.
    for workers, task_bytes in [(2, 0), (2, 3000), (3, 1000)]:
        name = f"w{workers}_{task_bytes}"
        run(model, files, str(tmp_path / name), workers=workers, task_bytes=task_bytes)
        assert read(str(tmp_path / f"{name}_text_document")) == read(str(tmp_path / "w1_text_document"))


def test_command_line_with_glob_and_two_keys(model, tmp_path):
    texts = corpus_texts()[:30]
    for k in range(2):
        lines = "".join(json.dumps({"text": text, "title": f"title {i}"}) + "\n" for i, text in enumerate(texts[k::2]))
        (tmp_path / f"part{k}.jsonl").write_text(lines)
    result = run_tool("preprocess_data.py", "--input", str(tmp_path / "part*.jsonl"), "--json-keys", "text", "title",
                      "--tokenizer-model", model, "--output-prefix", str(tmp_path / "cli"), "--workers", "2",
                      "--append-eod", "--log-interval", "5")
    assert result.returncode == 0, result.stderr
    assert "processed" in result.stderr and "tokens/s" in result.stderr  # progress lines
    run(model, expand_inputs([str(tmp_path / "part*.jsonl")]), str(tmp_path / "api"), json_keys=["text", "title"])
    for key in ("text", "title"):
        assert read(str(tmp_path / f"cli_{key}_document")) == read(str(tmp_path / f"api_{key}_document"))
    titles = IndexedDataset(str(tmp_path / "cli_title_document"))
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.detokenize(titles.document(0)[:-1]) == "title 0"


def test_without_append_eod(model, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["hello world", "", "more text"])
    run(model, [str(path)], str(tmp_path / "out"), append_eod=False)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    tokenizer = SentencePieceTokenizer(model)
    assert [ds.document(d).tolist() for d in range(3)] == [tokenizer.tokenize("hello world"), [], tokenizer.tokenize("more text")]


BAD_LINES = [
    (b'{"text": "broken', "malformed JSON"),
    (b'{"content": "x"}', "no key 'text' in this JSON object"),
    (b'{"text": "caf\xe9 au lait"}', "byte 0xe9 at column 14 is not valid UTF-8"),
    (b'{"text": ["a list"]}', "the value of 'text' is list, expected a string"),
    (b'{"text": "lone surrogate \\ud800"}', "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("line, message", BAD_LINES)
@pytest.mark.parametrize("compress", [False, True])
def test_bad_line_names_file_and_line_and_leaves_old_output(model, tmp_path, line, message, workers, compress):
    good = [f'{{"text": "document number {i} {"x" * (i % 50)}"}}'.encode() for i in range(300)]
    lines = good[:237] + [line] + good[237:]
    name = "bad.jsonl.gz" if compress else "bad.jsonl"
    path = tmp_path / name
    data = b"\n".join(lines) + b"\n"
    if compress:
        import gzip

        data = gzip.compress(data)
    path.write_bytes(data)
    # A previous good output must survive the failed run untouched.
    previous = write_jsonl(tmp_path / "previous.jsonl", ["an older corpus"])
    prefix = str(tmp_path / "out")
    run(model, [str(previous)], prefix)
    before = read(prefix + "_text_document")
    with pytest.raises(DataError, match=f"{name}:238: .*{message}"):
        run(model, [str(previous), str(path)], prefix, workers=workers, task_bytes=1500)
    assert read(prefix + "_text_document") == before
    assert sorted(os.listdir(tmp_path)) == sorted([name, "previous.jsonl", "out_text_document.bin", "out_text_document.idx"])


def test_empty_input_is_an_error(model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no documents"):
        run(model, [str(empty)], str(tmp_path / "out"), workers=2)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def _die(task):
    os._exit(3)  # a worker killed from outside (e.g. by the out-of-memory killer)


def test_a_dying_worker_is_reported_not_waited_for(model, corpus, tmp_path, monkeypatch):
    from megatron_gdn.data import preprocess as module

    monkeypatch.setattr(module, "_run_task", _die)  # the forked workers inherit the patch
    files, _ = corpus
    with pytest.raises(DataError, match=r"a tokenizer worker process died while tokenizing .*a.jsonl \(bytes 0\.\."):
        run(model, files, str(tmp_path / "out"), workers=2)
    assert os.listdir(tmp_path) == []


def test_command_line_errors_are_one_line(model, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["text"])
    fake = tmp_path / "fake.model"
    fake.write_text("not a model")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": \n')
    cases = [
        (["--input", str(good), "--tokenizer-model", str(fake)], f"error: {fake}: not a SentencePiece model"),
        (["--input", str(bad), "--tokenizer-model", model], f"error: {bad}:2: malformed JSON"),
        (["--input", str(tmp_path / "none*.jsonl"), "--tokenizer-model", model],
         f"error: {tmp_path / 'none*.jsonl'}: no file matches"),
    ]
    for args, message in cases:
        result = run_tool("preprocess_data.py", *args, "--output-prefix", str(tmp_path / "out"), "--workers", "2")
        assert result.returncode == 1
        assert result.stderr.strip().startswith(message), result.stderr
        assert "Traceback" not in result.stderr
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def _mpi_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return tool("mpiexec") is not None


@pytest.mark.skipif(not _mpi_available(), reason="needs mpi4py and mpiexec (the test extras install the mpich wheel)")
def test_mpi_ranks_give_the_same_bytes(model, corpus, tmp_path):
    files, _ = corpus
    run(model, files, str(tmp_path / "single"))
    result = run_tool("preprocess_data.py", "--input", *files, "--tokenizer-model", model, "--append-eod",
                      "--output-prefix", str(tmp_path / "mpi"), "--workers", "1", "--task-mb", "0.002", "--mpi",
                      launcher=[tool("mpiexec"), "-n", "2"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote") == 1  # rank 0 reports
    assert read(str(tmp_path / "mpi_text_document")) == read(str(tmp_path / "single_text_document"))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("mpi")) == ["mpi_text_document.bin", "mpi_text_document.idx"]

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(open(files[0], "rb").read() + b"{oops\n")
    result = run_tool("preprocess_data.py", "--input", str(bad), "--tokenizer-model", model,
                      "--output-prefix", str(tmp_path / "mpibad"), "--task-mb", "0.002", "--mpi",
                      launcher=[tool("mpiexec"), "-n", "2"])
    assert result.returncode != 0
    assert f"{bad}:61: malformed JSON" in result.stderr
    assert not any(n.startswith("mpibad") for n in os.listdir(tmp_path))
