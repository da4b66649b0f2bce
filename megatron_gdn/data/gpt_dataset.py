"""GPT pretraining samples from indexed datasets, with Megatron-LM's GPTDataset semantics.

For one dataset (prefix) and one split:

1. Split. ``--split 969,30,1`` is normalized to fractions; the train/valid/test splits are the contiguous
   sequence ranges [round(lo * N), round(hi * N)) of the file, in file order (no shuffling first).
2. Epochs. The fewest epochs E with E * T >= n * S + 1 tokens (T tokens in the split, n samples asked
   for, S the sequence length; the +1 is the extra label token of the last sample).
3. Document index: the split's sequence ids repeated E times, shuffled by RandomState(seed). When the last
   epoch would be used for less than 80% of it, it is shuffled on its own so that its partial use does not
   favour some documents (Megatron's "separate final epoch").
4. Sample index: documents are packed back to back without padding; sample j covers the S + 1 tokens at
   positions [j * S, j * S + S] of that stream (consecutive samples share one token), stored as
   (position in the document index, offset in that document) of its first token. Vectorized numpy.
5. Shuffle index: the sample order, shuffled by the same RandomState (the two epoch groups separately).

Several datasets blend by weights (``--data-path w1 p1 w2 p2``): sample i of the blend comes from the
dataset whose next sample is most overdue, the smallest (count_d + 0.5) / w_d (ties: the lower index).
This greedy rule keeps every dataset within about one sample of its share at every prefix of the run,
uses no randomness, and is computed without a Python loop.

All index arrays are cached as .npy files (``cache/GPTDataset_indices`` next to the data) under an md5 of
everything they depend on; rank 0 builds and saves them, the other ranks wait at the barrier and load
them (or rebuild the same arrays if they cannot see the cache). Samples are read in index order, so
resuming at consumed_samples continues with exactly the next samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megatron_gdn.data.errors import DataError
from megatron_gdn.data.indexed_dataset import IndexedDataset, validate_vocab

SPLIT_NAMES = ("train", "valid", "test")
# Megatron's threshold: a last epoch used for less than this fraction of it is shuffled separately.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: [prefix], [w1, prefix1, w2, prefix2, ...] or [prefix1, prefix2, ...].

    Returns (prefixes, normalized weights), weights None when none were given."""
    if not data_path:
        raise DataError("--data-path is empty; give a dataset prefix, or weight-prefix pairs")

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not is_number(data_path[0]):
        if any(is_number(item) for item in data_path):
            raise DataError(f"--data-path {' '.join(data_path)}: mixes weights and prefixes; write w1 prefix1 w2 prefix2 ...")
        return list(data_path), None
    if len(data_path) % 2:
        raise DataError(f"--data-path {' '.join(data_path)}: weights and prefixes must come in pairs (w1 prefix1 w2 prefix2 ...)")
    weights = [float(w) for w in data_path[0::2]]
    prefixes = list(data_path[1::2])
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--data-path weights {weights}: need non-negative numbers with a positive sum")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001]; missing parts are 0 ('98,2' -> [0.98, 0.02, 0.0])."""
    try:
        parts = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"--split {split!r}: expected up to three comma-separated numbers such as 969,30,1") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(fractions: list[float], num_sequences: int) -> list[tuple[int, int]]:
    """[begin, end) sequence ids of each split: book-ends at the running sums of the fractions, rounded
    as Megatron rounds them (Python's round)."""
    bookends = [0.0]
    for fraction in fractions:
        bookends.append(bookends[-1] + fraction)
    return [(int(round(lo * num_sequences)), int(round(hi * num_sequences))) for lo, hi in zip(bookends[:-1], bookends[1:])]


def get_train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int) -> tuple[int, int, int]:
    """Samples each split must provide (Megatron's rule): train iters x batch; the validation set is
    evaluated every eval_interval iterations and once at the end; the test set once."""
    train = train_iters * global_batch_size
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size if eval_interval > 0 else 0
    test = eval_iters * global_batch_size
    return train, valid, test


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool) -> np.ndarray:
    """The sequence ids repeated num_epochs times and shuffled (int32)."""
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate([first, last])
    index = np.tile(documents.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(document_lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """[num_samples + 1, 2] int64: (position in the document index, token offset) where each sample starts.

    document_lengths are the lengths in document-index order. Sample j starts at stream position
    j * seq_length; row num_samples marks where the last sample's final (label) token is."""
    boundaries = np.zeros(len(document_lengths) + 1, dtype=np.int64)
    np.cumsum(document_lengths, out=boundaries[1:])
    num_samples = (int(boundaries[-1]) - 1) // seq_length
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # The document holding each start: the last boundary at or before it (this skips empty documents).
    positions = np.searchsorted(boundaries, starts, side="right") - 1
    return np.stack([positions, starts - boundaries[positions]], axis=1)


def build_shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by a permutation of [num_samples, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def blending_indices(weights: list[float], size: int, window: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16, dataset_sample_index int64) of a blend of `size` samples.

    Sample i comes from the dataset with the smallest (count_d + 0.5) / w_d, ties to the lower d: a merge of
    each dataset's arithmetic sequence of due times (k + 0.5) / w_d, done window by window so memory stays
    O(window). Since sum(w) = 1, the i-th merged due time is about i, which sizes the windows."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) > np.iinfo(np.int16).max:
        raise DataError(f"at most {np.iinfo(np.int16).max} datasets can be blended, got {len(w)}")
    w = w / w.sum()
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    emitted = np.zeros(len(w), dtype=np.int64)
    filled, horizon = 0, 0.0
    while filled < size:
        horizon += window
        due, datasets, counts = [], [], []
        for d, weight in enumerate(w):
            if weight <= 0:
                continue
            # Samples of d due before the horizon: (k + 0.5) / w < horizon.
            stop = max(int(math.ceil(weight * horizon - 0.5)), int(emitted[d]))
            k = np.arange(emitted[d], stop, dtype=np.int64)
            emitted[d] = stop
            due.append((k + 0.5) / weight)
            datasets.append(np.full(len(k), d, dtype=np.int16))
            counts.append(k)
        order = np.argsort(np.concatenate(due), kind="stable")  # stable: ties keep the lower dataset first
        take = min(len(order), size - filled)
        dataset_index[filled : filled + take] = np.concatenate(datasets)[order[:take]]
        sample_index[filled : filled + take] = np.concatenate(counts)[order[:take]]
        filled += take
    return dataset_index, sample_index


@dataclass
class _IndexKey:
    """Everything the GPT index arrays depend on; its md5 names the cache files."""

    dataset: str
    num_sequences: int
    num_tokens: int
    split: str
    split_range: tuple[int, int]
    num_samples: int
    seq_length: int
    seed: int
    version: int = 1

    def digest(self) -> str:
        return hashlib.md5(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def _cache_paths(directory: str, stem: str, names: tuple[str, ...]) -> dict[str, str]:
    return {name: os.path.join(directory, f"{stem}-{name}.npy") for name in names}


def _load_or_build(directory: str, stem: str, description: str, build: Callable[[], dict[str, np.ndarray]],
                   save: bool, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Load the arrays cached as DIRECTORY/STEM-NAME.npy, or build them (and save them when ``save``).

    Files are written under a temporary name and renamed, so a reader never sees half a file and two
    processes building the same arrays cannot corrupt each other."""
    marker = os.path.join(directory, f"{stem}-description.txt")
    if os.path.isfile(marker):
        with open(marker) as f:
            names = json.load(f)["arrays"]
        paths = _cache_paths(directory, stem, tuple(names))
        if all(os.path.isfile(path) for path in paths.values()):
            return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
    built = build()
    if save:
        try:
            os.makedirs(directory, exist_ok=True)
            paths = _cache_paths(directory, stem, tuple(built))
            for name, array in built.items():
                temporary = f"{paths[name]}.tmp-{uuid.uuid4().hex[:8]}.npy"
                np.save(temporary, array, allow_pickle=False)
                os.replace(temporary, paths[name])
            temporary = f"{marker}.tmp-{uuid.uuid4().hex[:8]}"
            with open(temporary, "w") as f:
                json.dump({"description": description, "arrays": list(built)}, f, indent=2)
            os.replace(temporary, marker)  # written last: its presence means every array is complete
        except OSError as error:
            log(f"> warning: could not write the index cache in {directory} ({error}); pass a writable cache_dir")
    return built


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens from one split of one indexed dataset (see the module docstring)."""

    def __init__(self, indexed: IndexedDataset, split: str, split_range: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, reset_state_at_eod: bool, eod_token: int, cache_dir: str,
                 save_cache: bool, log: Callable[[str], None]) -> None:
        self.indexed = indexed
        self.split = split
        self.seq_length = seq_length
        self.reset_state_at_eod = reset_state_at_eod
        self.eod_token = eod_token
        begin, end = split_range
        self.num_tokens_per_epoch = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        if self.num_tokens_per_epoch < 2:
            raise DataError(f"{indexed.prefix}: the {split} split (sequences {begin}..{end}) has {self.num_tokens_per_epoch} "
                            f"tokens; a sample needs at least 2")
        key = _IndexKey(os.path.abspath(indexed.prefix), len(indexed), indexed.num_tokens, split, split_range,
                        num_samples, seq_length, seed)
        description = json.dumps(asdict(key), indent=2)
        stem = f"{key.digest()}-GPTDataset-{split}"
        arrays = _load_or_build(cache_dir, stem, description, lambda: self._build(begin, end, num_samples, seed),
                                save_cache, log)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self, begin: int, end: int, num_samples: int, seed: int) -> dict[str, np.ndarray]:
        tokens, length = self.num_tokens_per_epoch, self.seq_length
        num_epochs = max(1, -(-(num_samples * length + 1) // tokens))
        separate_last_epoch = False
        samples_before_last_epoch = 0
        if num_epochs > 1:
            samples_before_last_epoch = ((num_epochs - 1) * tokens - 1) // length
            samples_in_last_epoch = num_samples - samples_before_last_epoch
            samples_per_epoch = (tokens - 1) // length
            separate_last_epoch = samples_in_last_epoch < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(seed)
        documents = np.arange(begin, end, dtype=np.int64)
        document_index = build_document_index(documents, num_epochs, rng, separate_last_epoch)
        sample_index = build_sample_index(self.indexed.sequence_lengths[document_index], length)
        total = len(sample_index) - 1
        shuffle_index = build_shuffle_index(samples_before_last_epoch if separate_last_epoch else total, total, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample ``index`` (int64)."""
        j = int(self.shuffle_index[index])
        (first, offset), (last, last_offset) = self.sample_index[j], self.sample_index[j + 1]
        first, offset, last, last_offset = int(first), int(offset), int(last), int(last_offset)
        documents = self.document_index
        if first == last:
            pieces = [self.indexed.get(int(documents[first]), offset, last_offset - offset + 1)]
        else:
            pieces = [self.indexed.get(int(documents[first]), offset)]
            pieces += [self.indexed.get(int(documents[i])) for i in range(first + 1, last)]
            pieces.append(self.indexed.get(int(documents[last]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return make_sample(self.tokens(index), self.reset_state_at_eod, self.eod_token)


def make_sample(tokens: np.ndarray, reset_state_at_eod: bool, eod_token: int) -> dict[str, torch.Tensor]:
    """{"tokens"} and, when resetting at EOD, {"cu_seqlens"}: the document starts within the inputs
    tokens[:-1], from 0 to seq_length, a boundary right after each EOD (none after the last input)."""
    sample = {"tokens": torch.from_numpy(tokens)}
    if reset_state_at_eod:
        seq_length = len(tokens) - 1
        starts = np.flatnonzero(tokens[:-1] == eod_token) + 1
        starts = starts[starts < seq_length]
        cu_seqlens = np.concatenate([[0], starts, [seq_length]]).astype(np.int32)
        sample["cu_seqlens"] = torch.from_numpy(cu_seqlens)
    return sample


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from several datasets by the deterministic greedy interleave."""

    def __init__(self, datasets: list[GPTDataset], weights: list[float], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray) -> None:
        self.datasets = datasets
        self.weights = weights
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[index])][int(self.dataset_sample_index[index])]


def _print_rank_zero(is_rank_zero: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if is_rank_zero:
            print(message, file=sys.stdout, flush=True)

    return log


def _build_split(prefixes: list[str], weights: list[float] | None, indexed: list[IndexedDataset], fractions: list[float],
                 split_number: int, num_samples: int, seq_length: int, seed: int, reset_state_at_eod: bool,
                 eod_token: int, cache_dir: str | None, save_cache: bool,
                 log: Callable[[str], None]) -> torch.utils.data.Dataset | None:
    split = SPLIT_NAMES[split_number]
    if num_samples <= 0:
        return None
    ranges = [split_ranges(fractions, len(ds))[split_number] for ds in indexed]
    present = [d for d, (lo, hi) in enumerate(ranges) if hi > lo and (weights is None or weights[d] > 0)]
    if not present:
        return None

    def gpt(d: int, samples: int) -> GPTDataset:
        return GPTDataset(indexed[d], split, ranges[d], samples, seq_length, seed, reset_state_at_eod, eod_token,
                          index_cache_dir(prefixes[d], cache_dir), save_cache, log)

    if len(prefixes) == 1:
        dataset = gpt(0, num_samples)
        log(f"> {split}: {prefixes[0]} sequences {ranges[0][0]}..{ranges[0][1]}, {len(dataset)} samples")
        return dataset

    if weights is None:
        # No weights given: each dataset in proportion to its tokens in this split.
        shares = [float(indexed[d].sequence_lengths[ranges[d][0] : ranges[d][1]].sum(dtype=np.int64)) for d in present]
    else:
        shares = [weights[d] for d in present]
    if sum(shares) <= 0:
        return None
    shares = [s / sum(shares) for s in shares]
    key = json.dumps({"class": "BlendedDataset", "datasets": [os.path.abspath(prefixes[d]) for d in present],
                      "weights": shares, "split": split, "size": num_samples})
    stem = f"{hashlib.md5(key.encode()).hexdigest()}-BlendedDataset-{split}"
    arrays = _load_or_build(index_cache_dir(prefixes[present[0]], cache_dir), stem, key,
                            lambda: dict(zip(("dataset_index", "dataset_sample_index"), blending_indices(shares, num_samples))),
                            save_cache, log)
    dataset_index, dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
    # Each dataset is asked for exactly the samples the blend draws from it.
    counts = np.bincount(dataset_index, minlength=len(present))
    datasets = [gpt(d, max(int(count), 1)) for d, count in zip(present, counts)]
    log(f"> {split}: blend of {len(datasets)} datasets, weights {[round(s, 4) for s in shares]}, {num_samples} samples")
    return BlendedDataset(datasets, shares, dataset_index, dataset_sample_index)


def build_train_valid_test_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], reset_state_at_eod: bool, eod_token: int,
                                    is_rank_zero: bool = True, barrier: Callable[[], None] | None = None,
                                    cache_dir: str | None = None):
    """(train, valid, test) map-style datasets of {"tokens": LongTensor[seq_length + 1]} samples (plus
    "cu_seqlens" with reset_state_at_eod); None for a split with no documents or no samples asked for.

    Every rank calls this. Rank 0 builds the index arrays and caches them; then all ranks meet at
    ``barrier()``; the other ranks then load the cached arrays. If rank 0 fails on bad data it still
    reaches the barrier before raising, and the other ranks then fail with the same error. ``cache_dir`` overrides the cache
    location (default: cache/GPTDataset_indices next to each dataset)."""
    if seq_length < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    if len(num_samples) != 3:
        raise DataError(f"num_samples must give (train, valid, test) sample counts, got {num_samples}")
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    log = _print_rank_zero(is_rank_zero)

    def build_all(save_cache: bool) -> tuple:
        indexed = [IndexedDataset(prefix) for prefix in prefixes]
        return tuple(
            _build_split(prefixes, weights, indexed, fractions, s, int(num_samples[s]), seq_length, seed,
                         reset_state_at_eod, eod_token, cache_dir, save_cache, log)
            for s in range(3)
        )

    datasets, failure = None, None
    if is_rank_zero:
        try:
            datasets = build_all(save_cache=True)
        except DataError as error:
            failure = error  # still meet the other ranks at the barrier, so that none of them hangs there
    if barrier is not None:
        barrier()
    if failure is not None:
        raise failure
    if not is_rank_zero:
        # Normally every array is in the cache by now; a rank that cannot see it (no shared file
        # system) rebuilds the same arrays in memory.
        datasets = build_all(save_cache=False)
    return datasets


def index_cache_dir(prefix: str, cache_dir: str | None = None) -> str:
    """Where the index arrays of a dataset are cached: cache_dir, or ``cache/GPTDataset_indices`` next to it."""
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")


def check_data_vocab(data_path: list[str], vocab_size: int, cache_dir: str | None = None) -> None:
    """Raise DataError naming the file and document if any dataset of --data-path holds a token id
    outside [0, vocab_size). One pass over each .bin (skipped where the dtype cannot hold such ids).

    A dataset that passed is remembered by an empty marker file in its index cache directory, named by an md5
    of the .bin's path, size and modification time and of vocab_size: restarting a run does not read a large
    corpus again, and a rewritten .bin is checked again. Where the marker cannot be written (a read-only cache),
    the next start simply checks again."""
    prefixes, _ = parse_data_path(data_path)
    for prefix in prefixes:
        path = os.path.abspath(prefix + ".bin")
        if not os.path.exists(path):
            validate_vocab(prefix, vocab_size)  # raises the data module's error for a missing file
        stat = os.stat(path)
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{vocab_size}"
        marker = os.path.join(index_cache_dir(prefix, cache_dir), f"{hashlib.md5(key.encode()).hexdigest()}-vocab_ok")
        if os.path.exists(marker):
            continue
        validate_vocab(prefix, vocab_size)
        with contextlib.suppress(OSError):  # a read-only cache: the next start checks again
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
