"""SentencePiece training (tools/train_tokenizer.py) and the tokenizer interface the trainer uses."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from megatron_gdn.data.errors import DataError
from megatron_gdn.data.tokenizer import SentencePieceTokenizer, padded_vocab_size
from test_data_corpus import corpus_texts, run_tool, train_tiny_tokenizer, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_special_ids_and_vocab(tokenizer):
    assert tokenizer.vocab_size == 600
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    assert tokenizer.piece(tokenizer.eod) == "</s>"


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  # indented\n\n\tdone\n",
    "  leading and   repeated   spaces  ",
    "Größe, 東京, 🚀 (characters outside the vocabulary go through byte fallback)",
    "",
])
def test_detokenize_inverts_tokenize(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize(np.asarray(ids, dtype=np.uint16)) == text


def test_batch_encode_equals_single_encode(tokenizer):
    texts = corpus_texts()[:40]
    batch = tokenizer.tokenize_batch(texts)
    assert all(a.dtype == np.int32 for a in batch)
    assert [a.tolist() for a in batch] == [tokenizer.tokenize(t) for t in texts]


def test_tokenizer_pickles_by_path(tokenizer):
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert restored.tokenize("hello world") == tokenizer.tokenize("hello world")


@pytest.mark.parametrize("vocab, divisible, tp, padded", [
    (32000, 128, 1, 32000), (50257, 128, 1, 50304), (50257, 128, 2, 50432), (600, 128, 8, 1024), (7, 1, 1, 7),
])
def test_padded_vocab_size_follows_megatron(vocab, divisible, tp, padded):
    assert padded_vocab_size(vocab, divisible, tp) == padded


def test_padded_vocab_size_rejects_nonsense():
    with pytest.raises(ValueError, match="positive sizes"):
        padded_vocab_size(0)


def test_train_tokenizer_tool_with_special_tokens(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    (tmp_path / "extra.txt").write_text("plain text lines\nare read one sentence per line\n")
    result = run_tool("train_tokenizer.py", "--input", str(corpus), str(tmp_path / "extra.txt"),
                      "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "500", "--model-type", "unigram",
                      "--user-defined-symbols", "<|im_start|>", "<|im_end|>", "--num-threads", "1")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and os.path.isfile(tmp_path / "tok.vocab")
    tokenizer = SentencePieceTokenizer(str(tmp_path / "tok.model"))
    assert tokenizer.vocab_size == 500
    ids = tokenizer.tokenize("<|im_start|>hi<|im_end|>")
    assert ids[0] == 4 and ids[-1] == 5  # the symbols follow the four special ids, one token each


def test_train_tokenizer_tool_reports_bad_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"body": "no text key"}\n')
    result = run_tool("train_tokenizer.py", "--input", str(path), "--model-prefix", str(tmp_path / "tok"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"error: {path}:2: no key 'text'")
    assert "Traceback" not in result.stderr


def test_not_a_sentencepiece_model(tmp_path):
    fake = tmp_path / "tokenizer.model"
    fake.write_text('{"model": "a Hugging Face tokenizer.json, not SentencePiece"}')
    with pytest.raises(DataError, match=f"{fake}: not a SentencePiece model"):
        SentencePieceTokenizer(str(fake))
    with pytest.raises(DataError, match="no such tokenizer model file"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))


def test_model_without_eos_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(t for t in corpus_texts() if t.strip()))
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "noeos"), vocab_size=300,
                                       eos_id=-1, logstream=quiet)
    with pytest.raises(DataError, match="has no end-of-document piece"):
        SentencePieceTokenizer(str(tmp_path / "noeos.model"))
