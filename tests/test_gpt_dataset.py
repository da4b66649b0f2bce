"""GPT samples: splits, epochs and shuffles against a brute-force model of the token stream, blending
ratios, the index cache and the rank-0 protocol, cu_seqlens, and exact resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_gdn.data.errors import DataError
from megatron_gdn.data.gpt_dataset import (
    blending_indices,
    build_sample_index,
    build_train_valid_test_datasets,
    check_data_vocab,
    get_train_valid_test_num_samples,
    make_sample,
    parse_data_path,
    parse_split,
    split_ranges,
)
from megatron_gdn.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

EOD = 1


def write_dataset(prefix: str, count: int, seed: int, first_token: int = 2) -> list[np.ndarray]:
    """Documents of random lengths (a few empty), each ending in EOD, tokens numbered so that every
    token of the corpus is distinct apart from the EODs (first_token separates datasets)."""
    rng = np.random.default_rng(seed)
    documents, next_token = [], first_token
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for _ in range(count):
            length = int(rng.integers(0, 40)) if rng.random() > 0.05 else 0
            tokens = np.arange(next_token, next_token + length)
            next_token += length
            document = np.append(tokens, EOD) if length else tokens
            builder.add_document(document)
            documents.append(document)
        builder.finalize()
    return documents


def build(prefix: str | list[str], seq_length: int = 16, seed: int = 1234, samples=(200, 20, 5), split: str = "969,30,1",
          reset: bool = False, **kwargs):
    data_path = [prefix] if isinstance(prefix, str) else prefix
    return build_train_valid_test_datasets(data_path, split, seq_length, seed, samples, reset, EOD, **kwargs)


def stream_of(dataset) -> np.ndarray:
    """The token stream a GPT dataset packs its samples from: its document index order."""
    pieces = [dataset.indexed[int(s)] for s in dataset.document_index]
    return np.concatenate(pieces).astype(np.int64)


@pytest.fixture()
def prefix(tmp_path) -> str:
    write_dataset(str(tmp_path / "corpus"), count=1000, seed=0)
    return str(tmp_path / "corpus")


def test_parse_arguments():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["1", "a", "3", "b"]) == (["a", "b"], [0.25, 0.75])
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    for bad in (["0.3", "a", "0.7"], ["a", "0.5"], [], ["-1", "a"]):
        with pytest.raises(DataError):
            parse_data_path(bad)
    with pytest.raises(DataError, match="--split"):
        parse_split("90,x")
    assert get_train_valid_test_num_samples(1000, 8, 100, 10) == (8000, 880, 80)


def test_split_boundaries_are_contiguous_sequence_ranges(prefix):
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("98,2"), 1001) == [(0, 981), (981, 1001), (1001, 1001)]
    train, valid, test = build(prefix)
    n = len(IndexedDataset(prefix))
    for dataset, (lo, hi) in zip((train, valid, test), split_ranges(parse_split("969,30,1"), n)):
        # Every sequence of the split appears, each equally often (whole epochs), and nothing else.
        counts = np.bincount(np.asarray(dataset.document_index), minlength=n)
        epochs = counts[lo]
        assert epochs >= 1 and (counts[lo:hi] == epochs).all() and counts.sum() == epochs * (hi - lo)
    assert build(prefix, split="98,2")[2] is None
    assert build(prefix, samples=(200, 0, 5))[1] is None  # no samples asked for: no dataset


def test_samples_are_consecutive_windows_of_the_shuffled_stream(prefix):
    seq_length = 16
    train, valid, _ = build(prefix, seq_length=seq_length, samples=(3000, 50, 5))
    for dataset in (train, valid):
        stream = stream_of(dataset)
        assert len(dataset) == (len(stream) - 1) // seq_length
        for k in range(len(dataset)):
            j = int(dataset.shuffle_index[k])
            expected = stream[j * seq_length : j * seq_length + seq_length + 1]
            sample = dataset[k]["tokens"]
            assert sample.dtype == torch.int64 and sample.shape == (seq_length + 1,)
            assert sample.tolist() == expected.tolist()
        assert sorted(np.asarray(dataset.shuffle_index).tolist()) == list(range(len(dataset)))


def test_sample_index_against_a_token_by_token_walk():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 7, size=200)
    lengths[:3] = 0  # empty documents first
    seq_length = 5
    index = build_sample_index(lengths, seq_length)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # document of every stream token
    offset = np.concatenate([np.arange(n) for n in lengths])
    assert len(index) == (lengths.sum() - 1) // seq_length + 1
    for j, (position, token_offset) in enumerate(index):
        assert (position, token_offset) == (owner[j * seq_length], offset[j * seq_length])


def test_epochs_and_separate_last_epoch(prefix):
    seq_length = 16
    lo, hi = split_ranges(parse_split("969,30,1"), len(IndexedDataset(prefix)))[0]
    tokens = int(IndexedDataset(prefix).sequence_lengths[lo:hi].sum())
    per_epoch = (tokens - 1) // seq_length
    # A few samples into the second epoch: its use is under 80%, so it is shuffled on its own.
    train, _, _ = build(prefix, seq_length=seq_length, samples=(per_epoch + 10, 20, 5))
    assert len(train.document_index) == 2 * (hi - lo)
    assert sorted(np.asarray(train.document_index[hi - lo :]).tolist()) == list(range(lo, hi))
    # 90% into the second epoch: both epochs are shuffled together.
    train, _, _ = build(prefix, seq_length=seq_length, samples=(int(1.9 * per_epoch), 20, 5))
    assert len(train.document_index) == 2 * (hi - lo)
    assert sorted(np.asarray(train.document_index[hi - lo :]).tolist()) != list(range(lo, hi))
    assert len(train) >= int(1.9 * per_epoch)


def test_same_seed_same_samples_other_seed_other_samples(tmp_path):
    write_dataset(str(tmp_path / "a"), 300, seed=1)
    first = build(str(tmp_path / "a"), seed=5, cache_dir=str(tmp_path / "c1"))[0]
    again = build(str(tmp_path / "a"), seed=5, cache_dir=str(tmp_path / "c2"))[0]
    other = build(str(tmp_path / "a"), seed=6, cache_dir=str(tmp_path / "c3"))[0]
    same = [first[k]["tokens"].tolist() == again[k]["tokens"].tolist() for k in range(50)]
    differ = [first[k]["tokens"].tolist() != other[k]["tokens"].tolist() for k in range(50)]
    assert all(same) and sum(differ) > 40


def test_index_cache_is_reused_and_keyed(prefix):
    cache = os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices")
    train, _, _ = build(prefix)
    files = set(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 9  # 3 arrays x 3 splits
    reloaded, _, _ = build(prefix)
    assert set(os.listdir(cache)) == files
    assert isinstance(reloaded.sample_index, np.memmap)  # loaded, memory-mapped
    assert np.array_equal(reloaded.shuffle_index, train.shuffle_index)
    build(prefix, seq_length=32)
    assert len(set(os.listdir(cache)) - files) == 3 * 4  # new key: 3 arrays + description per split


def test_rank_zero_builds_other_ranks_load(tmp_path):
    write_dataset(str(tmp_path / "a"), 200, seed=2)
    events = []
    rank0 = build(str(tmp_path / "a"), is_rank_zero=True, barrier=lambda: events.append("rank 0 barrier"))
    cache = tmp_path / "cache" / "GPTDataset_indices"
    files = set(os.listdir(cache))
    rank1 = build(str(tmp_path / "a"), is_rank_zero=False, barrier=lambda: events.append("rank 1 barrier"))
    assert events == ["rank 0 barrier", "rank 1 barrier"]
    assert set(os.listdir(cache)) == files
    assert isinstance(rank1[0].shuffle_index, np.memmap)
    assert [rank1[0][k]["tokens"].tolist() for k in range(20)] == [rank0[0][k]["tokens"].tolist() for k in range(20)]
    # A rank that cannot see the cache rebuilds the same arrays without writing anything.
    elsewhere = tmp_path / "node2"
    elsewhere.mkdir()
    alone = build(str(tmp_path / "a"), is_rank_zero=False, cache_dir=str(elsewhere))
    assert os.listdir(elsewhere) == []
    assert np.array_equal(alone[0].shuffle_index, rank0[0].shuffle_index)


def _distributed_rank(rank: int, init_file: str, prefix: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    train, _, _ = build(prefix, is_rank_zero=rank == 0, barrier=dist.barrier)
    results.put((rank, isinstance(train.shuffle_index, np.memmap), [train[k]["tokens"].tolist() for k in range(5)]))
    dist.destroy_process_group()


def test_rank_zero_protocol_with_a_real_barrier(tmp_path):
    """Two gloo processes: rank 0 builds and saves, rank 1 waits at dist.barrier and memory-maps the cache."""
    import multiprocessing

    write_dataset(str(tmp_path / "a"), 200, seed=4)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_distributed_rank, args=(rank, str(tmp_path / "init"), str(tmp_path / "a"), results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcome = dict((rank, (mapped, samples)) for rank, mapped, samples in (results.get(timeout=120) for _ in range(2)))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert outcome[0][0] is False and outcome[1][0] is True  # rank 0 built in memory, rank 1 loaded the files
    assert outcome[0][1] == outcome[1][1]


def test_blending_indices_follow_the_weights_at_every_prefix():
    weights = [0.2, 0.3, 0.5]
    dataset_index, sample_index = blending_indices(weights, 10_000, window=777)
    counts = np.zeros((len(dataset_index) + 1, 3))
    counts[1:] = np.cumsum(np.eye(3)[dataset_index], axis=0)
    steps = np.arange(len(dataset_index) + 1)[:, None]
    assert np.abs(counts - steps * np.array(weights)).max() <= 1.0
    # Each dataset's samples are used in order 0, 1, 2, ...
    for d in range(3):
        assert sample_index[dataset_index == d].tolist() == list(range(int(counts[-1, d])))


def test_blending_matches_the_greedy_rule():
    weights = [0.5, 0.125, 0.375]
    dataset_index, _ = blending_indices(weights, 500, window=64)
    counts, expected = [0, 0, 0], []
    for _ in range(500):
        due = [(counts[d] + 0.5) / weights[d] for d in range(3)]
        d = int(np.argmin(due))  # smallest due time, ties to the lower index
        expected.append(d)
        counts[d] += 1
    assert dataset_index.tolist() == expected


def test_blended_datasets(tmp_path):
    write_dataset(str(tmp_path / "a"), 400, seed=1, first_token=2)
    write_dataset(str(tmp_path / "b"), 100, seed=2, first_token=1_000_000)
    data_path = ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")]
    train, valid, test = build(data_path, samples=(800, 40, 8), split="90,8,2")
    assert (len(train), len(valid), len(test)) == (800, 40, 8)
    from_b = [bool((train[k]["tokens"] >= 1_000_000).any()) for k in range(800)]
    assert abs(sum(from_b) - 600) <= 1  # dataset b's tokens are all >= 1e6 (apart from EOD)
    for k in (0, 1, 2, 799):
        d, s = int(train.dataset_index[k]), int(train.dataset_sample_index[k])
        assert train[k]["tokens"].tolist() == train.datasets[d][s]["tokens"].tolist()
    # Without weights, each dataset counts in proportion to its tokens in the split.
    unweighted, _, _ = build([str(tmp_path / "a"), str(tmp_path / "b")], samples=(1000, 40, 8), split="90,8,2")
    tokens = []
    for name in ("a", "b"):
        ds = IndexedDataset(str(tmp_path / name))
        lo, hi = split_ranges(parse_split("90,8,2"), len(ds))[0]
        tokens.append(int(ds.sequence_lengths[lo:hi].sum()))
    share = tokens[1] / sum(tokens)
    assert abs(np.mean(np.asarray(unweighted.dataset_index) == 1) - share) < 0.01


def test_cu_seqlens_follow_the_eod_tokens(prefix):
    seq_length = 16
    train, _, _ = build(prefix, seq_length=seq_length, reset=True)
    for k in range(len(train)):
        sample = train[k]
        inputs = sample["tokens"][:-1].tolist()
        cu = sample["cu_seqlens"]
        assert cu.dtype == torch.int32
        expected = [0] + [i + 1 for i, t in enumerate(inputs) if t == EOD and i + 1 < seq_length] + [seq_length]
        assert cu.tolist() == expected
        assert (cu[1:] > cu[:-1]).all()  # no empty pieces


@pytest.mark.parametrize("tokens, cu", [
    ([5, 6, 7, 8, 9], [0, 4]),  # no EOD: one document
    ([5, EOD, 7, 8, 9], [0, 2, 4]),
    ([EOD, EOD, 7, 8, 9], [0, 1, 2, 4]),  # consecutive EODs: pieces of one token
    ([5, 6, 7, EOD, 9], [0, 4]),  # EOD at the last input position: no extra boundary
    ([5, 6, 7, 8, EOD], [0, 4]),  # EOD only in the label position
])
def test_cu_seqlens_edge_cases(tokens, cu):
    sample = make_sample(np.asarray(tokens, dtype=np.int64), True, EOD)
    assert sample["cu_seqlens"].tolist() == cu
    assert set(make_sample(np.asarray(tokens, dtype=np.int64), False, EOD)) == {"tokens"}


def test_resume_from_consumed_samples_gives_the_same_batches(prefix):
    from megatron_gdn.data.sampler import MegatronPretrainingSampler

    micro, ranks, steps = 4, 2, 12
    train, _, _ = build(prefix, samples=(micro * ranks * steps, 20, 5))

    def batches(consumed: int) -> list[list[list[int]]]:
        samplers = [iter(MegatronPretrainingSampler(len(train), consumed, micro, r, ranks)) for r in range(ranks)]
        out = []
        for _ in range(steps - consumed // (micro * ranks)):
            out.append([train[i]["tokens"].tolist() for sampler in samplers for i in next(sampler)])
        return out

    uninterrupted = batches(0)
    for stop_step in (1, 5, 11):
        # A fresh process would rebuild the datasets from the cache: do that too.
        train, _, _ = build(prefix, samples=(micro * ranks * steps, 20, 5))
        assert batches(stop_step * micro * ranks) == uninterrupted[stop_step:]
    # Plain index order (no sampler) is the same sequence.
    flat = [train[i]["tokens"].tolist() for i in range(micro * ranks * steps)]
    assert [t for batch in uninterrupted for t in batch] == flat


def test_check_data_vocab(tmp_path):
    write_dataset(str(tmp_path / "a"), 50, seed=1)
    size = IndexedDataset(str(tmp_path / "a")).num_tokens
    check_data_vocab([str(tmp_path / "a")], 10_000)
    with pytest.raises(DataError, match=r"a.bin: token id \d+ in document \d+ .* outside the model's vocabulary of 100"):
        check_data_vocab(["1", str(tmp_path / "a")], 100)
    assert size > 100


def test_check_data_vocab_remembers_a_passed_corpus(tmp_path, monkeypatch):
    """A restart does not read the corpus again; a rewritten .bin and another vocabulary are checked again."""
    import megatron_gdn.data.gpt_dataset as gpt_dataset
    prefix = str(tmp_path / "a")
    write_dataset(prefix, 20, seed=1)
    reads = []
    real = gpt_dataset.validate_vocab
    monkeypatch.setattr(gpt_dataset, "validate_vocab", lambda p, v: (reads.append((p, v)), real(p, v)))
    check_data_vocab([prefix], 10_000)
    check_data_vocab([prefix], 10_000)
    assert reads == [(prefix, 10_000)]
    assert len(list((tmp_path / "cache" / "GPTDataset_indices").glob("*-vocab_ok"))) == 1
    check_data_vocab([prefix], 20_000)
    assert len(reads) == 2
    # The same name rewritten with ids past the vocabulary (the modification time moves on): checked again.
    st = os.stat(prefix + ".bin")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        builder.add_document([5, 50_000])
        builder.finalize()
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(DataError, match="token id 50000"):
        check_data_vocab([prefix], 10_000)


def test_split_without_tokens_is_an_error(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "tiny"), np.int32) as builder:
        builder.add_document([5])
        builder.finalize()
    waited = []
    with pytest.raises(DataError, match="tiny: the train split .* has 1 tokens; a sample needs at least 2"):
        build(str(tmp_path / "tiny"), split="1,0,0", barrier=lambda: waited.append(True))
    assert waited == [True]  # rank 0 reaches the barrier before raising: the other ranks do not hang
