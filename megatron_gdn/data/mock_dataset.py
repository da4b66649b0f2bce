"""A deterministic synthetic corpus for smoke tests and benchmarks (Megatron's --mock-data).

Sample i is a stream of "words" drawn from a fixed random lexicon (a few hundred short token
sequences), so it has structure a model can learn: the loss falls from ln(vocab) as the model
learns which token follows which inside a word. The lexicon depends on the seed only, so the
train and validation splits speak the same language; every sample is a pure function of
(seed, split, index): no state to save, exact resume for free.
"""

from __future__ import annotations

import numpy as np
import torch

LEXICON_WORDS = 512
WORD_LENGTHS = (2, 8)  # tokens per word, inclusive range


class MockGPTDataset(torch.utils.data.Dataset):
    """num_samples samples of {"tokens": LongTensor[seq_length + 1]} over a vocabulary of vocab_size.

    split (0 train, 1 validation, ...) selects an independent stream of samples over the same lexicon.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int = 0) -> None:
        if vocab_size < 2:
            raise ValueError(f"mock data needs a vocabulary of at least 2 tokens, got {vocab_size}")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self.split = split
        rng = np.random.default_rng([seed, 0])
        lengths = rng.integers(WORD_LENGTHS[0], WORD_LENGTHS[1] + 1, size=LEXICON_WORDS)
        self.words = [rng.integers(0, vocab_size, size=n) for n in lengths]
        self.mean_word_length = float(lengths.mean())

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, 1 + self.split, index])
        needed = self.seq_length + 1
        # Enough words for the sample with a wide margin; top up in the rare case it falls short.
        pieces: list[np.ndarray] = []
        total = 0
        while total < needed:
            choice = rng.integers(0, LEXICON_WORDS, size=int(needed / self.mean_word_length) + 16)
            pieces.extend(self.words[w] for w in choice)
            total = sum(len(p) for p in pieces)
        tokens = np.concatenate(pieces)[:needed]
        return {"tokens": torch.from_numpy(tokens.astype(np.int64))}
