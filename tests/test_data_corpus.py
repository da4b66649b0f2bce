"""Corpus reading and the demo corpus builder; also the helpers the other data tests import
(a small mixed corpus, a tiny SentencePiece model, running a tool as a subprocess)."""

from __future__ import annotations

import gzip
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_gdn.data.corpus import expand_inputs, iter_texts
from megatron_gdn.data.errors import DataError
from megatron_gdn.data.tokenizer import TokenizerTrainingConfig, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


def corpus_texts() -> list[str]:
    """About 300 KB of varied documents: Python source, its docstrings, non-ASCII text, empty ones."""
    import argparse
    import json as json_module
    import string

    modules = [textwrap, string, json_module.decoder, json_module.encoder, argparse]
    texts = []
    for module in modules:
        source = inspect.getsource(module)
        texts.extend(part for part in source.split("\n\n\n") if part.strip())
    texts += ["", "Größe, naïve café, 東京, emoji 🚀 and tabs\tend", "", "x = 1\n\n\n    y = 2\n"]
    return texts


def write_jsonl(path: Path, texts: list[str], key: str = "text", compress: bool = False) -> Path:
    lines = "".join(json.dumps({key: text, "id": i}, ensure_ascii=False) + "\n" for i, text in enumerate(texts))
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def train_tiny_tokenizer(directory: Path, vocab_size: int = 600, model_type: str = "bpe") -> str:
    corpus = write_jsonl(directory / "tokenizer_corpus.jsonl", corpus_texts())
    config = TokenizerTrainingConfig(inputs=[str(corpus)], output_prefix=str(directory / f"tiny_{model_type}"),
                                     vocab_size=vocab_size, model_type=model_type, num_threads=1)
    with open(os.devnull, "w") as quiet:
        return train_sentencepiece(config, log_stream=quiet)


def tool(name: str) -> str | None:
    """A console script of this environment (the venv's bin first: the mpich wheel puts mpiexec there, and a venv's
    python run without activating it does not put its bin on PATH)."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_tool(name: str, *args: str, launcher: list[str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = (launcher or []) + [sys.executable, str(REPO / "tools" / name), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_expand_inputs_sorts_globs_and_reports_missing(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    assert expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt")]) == [
        str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.txt")]
    with pytest.raises(DataError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match="no such input file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])


def test_iter_texts_reads_jsonl_gzip_and_text(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    write_jsonl(tmp_path / "b.jsonl.gz", ["three"], compress=True)
    (tmp_path / "c.txt").write_text("four\n\nfive\n")
    paths = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")]
    assert list(iter_texts(paths, ["text"])) == ["one", "two", "three", "four", "five"]


@pytest.mark.parametrize("line, message", [
    (b'{"text": "unterminated}', "malformed JSON"),
    (b'{"other": "x"}', "no key 'text'"),
    (b'{"text": 5}', "is int, expected a string"),
    (b'["text"]', "expected a JSON object"),
    (b'{"text": "caf\xe9"}', "byte 0xe9 at column 14 is not valid UTF-8"),
])
def test_iter_texts_names_file_and_line_of_bad_input(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + line + b"\n")
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        list(iter_texts([str(path)], ["text"]))


def test_demo_corpus_reads_no_installed_package_as_the_standard_library(tmp_path, monkeypatch):
    """In a venv the interpreter's own site-packages lies inside the stdlib root but is not the venv's purelib: its
    packages must not pass for the standard library (the corpus would change with what is installed there), and
    --site-packages reads the environment's packages (purelib) under their own label."""
    sys.path.insert(0, str(REPO / "tools"))
    import build_demo_corpus
    stdlib, venv = tmp_path / "lib" / "python3.11", tmp_path / "venv" / "site-packages"
    for path in (stdlib / "os.py", stdlib / "json" / "decoder.py", stdlib / "site-packages" / "sympy" / "core.py",
                 stdlib / "dist-packages" / "numpy" / "core.py", venv / "torch" / "nn.py"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    paths = {"stdlib": str(stdlib), "purelib": str(venv), "platlib": str(venv)}
    monkeypatch.setattr(build_demo_corpus.sysconfig, "get_paths", lambda: paths)
    assert [name for _, name in build_demo_corpus.source_files(False)] == ["stdlib/os.py", "stdlib/json/decoder.py"]
    assert [name for _, name in build_demo_corpus.source_files(True)] == [
        "stdlib/os.py", "stdlib/json/decoder.py", "site-packages/torch/nn.py"]


def test_demo_corpus_from_the_standard_library(tmp_path):
    out = tmp_path / "demo.jsonl"
    result = run_tool("build_demo_corpus.py", "--output", str(out), "--max-mb", "0.5")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert 0.3e6 < out.stat().st_size <= 0.5e6
    assert any(r["source"].endswith("(docstrings)") for r in records)
    assert all(r["source"].startswith("stdlib/") and r["text"].strip() for r in records)
    # The same command gives the same corpus.
    again = tmp_path / "again.jsonl"
    run_tool("build_demo_corpus.py", "--output", str(again), "--max-mb", "0.5")
    assert again.read_bytes() == out.read_bytes()
