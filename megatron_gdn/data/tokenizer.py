"""SentencePiece tokenizer: loading (for preprocessing and training) and training (tools/train_tokenizer.py).

Models trained here use fixed special ids: <unk> 0, <s> (bos) 1, </s> (eod) 2, <pad> 3, then the
user-defined symbols, then the learned pieces. Text is kept exactly (identity normalization, no
whitespace collapsing, byte fallback), so detokenize(tokenize(text)) == text for source code too.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm

from megatron_gdn.data.corpus import iter_texts
from megatron_gdn.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# sentencepiece >= 0.2.1 can return each encoded text as an int32 buffer instead of a list of Python
# ints, which saves most of the cost of turning ids into a numpy array.
_HAS_NUMPY_ENCODE = "return_type" in inspect.signature(spm.SentencePieceProcessor.Encode).parameters


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """The model's embedding rows: vocab_size rounded up to a multiple of divisible_by x TP (Megatron's rule),
    so every tensor-parallel rank holds the same number of rows and each shard is a multiple of divisible_by."""
    if vocab_size < 1 or make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"make_vocab_size_divisible_by={make_vocab_size_divisible_by}, tensor_model_parallel_size={tensor_model_parallel_size}"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return math.ceil(vocab_size / multiple) * multiple


class SentencePieceTokenizer:
    """A SentencePiece model with Megatron's tokenizer interface.

    ``eod`` is the model's eos id (appended after each document by --append-eod); ``bos`` is its bos id
    (-1 when the model has none); ``pad`` is its pad id, or eod when the model has no pad piece.
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise DataError(f"{model_path}: no such tokenizer model file (--tokenizer-model)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"{model_path}: not a SentencePiece model ({reason})") from None
        self.model_path = model_path
        self.vocab_size: int = self._sp.get_piece_size()
        self.eod: int = self._sp.eos_id()
        self.bos: int = self._sp.bos_id()
        self.unk: int = self._sp.unk_id()
        self.pad: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        if self.eod < 0:
            raise DataError(f"{model_path}: the model has no end-of-document piece (eos_id is -1); retrain it with an eos piece")

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Encode many texts in one call (SentencePiece's batched C++ path), each as an int32 array."""
        if _HAS_NUMPY_ENCODE:
            return self._sp.encode(texts, return_type="numpy", num_threads=num_threads)
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts, num_threads=num_threads)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])


@dataclass
class TokenizerTrainingConfig:
    """What tools/train_tokenizer.py passes to SentencePiece (each field is a flag of that tool)."""

    inputs: list[str]
    output_prefix: str
    vocab_size: int = 32000
    model_type: str = "bpe"  # or "unigram"
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    byte_fallback: bool = True
    user_defined_symbols: list[str] = field(default_factory=list)
    # SentencePiece samples this many lines (0 = all) before training: it bounds time and memory.
    input_sentence_size: int = 2_000_000
    max_sentence_length: int = 16384
    character_coverage: float = 0.9995
    normalization_rule_name: str = "identity"
    split_digits: bool = True
    # No "▁" is added before a text's first word: documents (source files) start at their first character.
    add_dummy_prefix: bool = False
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 1234


def training_lines(paths: list[str], json_keys: list[str]) -> Iterator[str]:
    """The non-empty lines of every text: SentencePiece learns pieces within a line, and the newlines
    themselves are covered by byte fallback."""
    for text in iter_texts(paths, json_keys):
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(config: TokenizerTrainingConfig, log_stream=None) -> str:
    """Train a model from the config's corpus; writes PREFIX.model and PREFIX.vocab, returns the .model path."""
    if config.model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe or unigram, got {config.model_type!r}")
    specials = 4 + len(config.user_defined_symbols)
    if config.vocab_size <= specials:
        raise DataError(f"--vocab-size {config.vocab_size} leaves no room for learned pieces after {specials} special pieces")
    directory = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(directory, exist_ok=True)
    spm.set_random_generator_seed(config.seed)
    # SentencePiece turns an exception of the line iterator into its own RuntimeError; keep ours.
    input_errors: list[DataError] = []

    def lines() -> Iterator[str]:
        try:
            yield from training_lines(config.inputs, config.json_keys)
        except DataError as error:
            input_errors.append(error)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_prefix=config.output_prefix,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            byte_fallback=config.byte_fallback,
            user_defined_symbols=config.user_defined_symbols,
            input_sentence_size=config.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=config.max_sentence_length,
            character_coverage=config.character_coverage,
            normalization_rule_name=config.normalization_rule_name,
            remove_extra_whitespaces=False,
            add_dummy_prefix=config.add_dummy_prefix,
            allow_whitespace_only_pieces=True,
            split_digits=config.split_digits,
            num_threads=config.num_threads,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            logstream=log_stream,
        )
    except RuntimeError as error:
        if input_errors:
            raise input_errors[0] from None
        raise DataError(f"SentencePiece training on {', '.join(config.inputs)} failed: {str(error).splitlines()[0]}") from None
    return config.output_prefix + ".model"


def check_special_tokens(tokenizer: SentencePieceTokenizer, symbols: Sequence[str]) -> None:
    """Each user-defined symbol must encode to exactly its own piece (used by the trainer's self-check)."""
    for symbol in symbols:
        ids = tokenizer.tokenize(symbol)
        if len(ids) != 1 or tokenizer.piece(ids[-1]) != symbol:
            raise DataError(f"{tokenizer.model_path}: user-defined symbol {symbol!r} encodes to {ids}, not one piece")
