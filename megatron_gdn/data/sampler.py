"""Batch sampling that resumes exactly: the position in the data is one number, consumed samples."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MegatronPretrainingSampler:
    """Yields, for this data-parallel rank, the sample indices of one micro batch at a time.

    Global sample order is 0, 1, 2, ... (datasets shuffle internally with their seed); a global step
    of micro_batch_size x data_parallel_size consecutive indices is split into one slice per rank.
    Starting at consumed_samples makes a resumed run see exactly the batches an uninterrupted run
    would have seen.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        # Drop the last incomplete global step, as Megatron does.
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into {"tokens": [B, S + 1]}; with per-sample document offsets also build the
    cu_seqlens of the B x S input positions packed into one row (what the model takes with B == 1)."""
    batch = {"tokens": torch.stack([s["tokens"] for s in samples])}
    if "cu_seqlens" in samples[0]:
        seq_length = batch["tokens"].shape[1] - 1
        pieces = [samples[0]["cu_seqlens"][:1].long()]
        for i, s in enumerate(samples):
            pieces.append(s["cu_seqlens"][1:].long() + i * seq_length)
        batch["cu_seqlens"] = torch.cat(pieces).to(torch.int32)
    return batch


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in page-locked memory, from which a copy to a GPU runs without making the host wait. A copy
    from pageable memory first waits for the GPU's queue to drain, and the GPU then idles while the host launches
    what follows. (torch's pinned allocator keeps the buffer until the copy has run.) Other tensors as they are."""
    return tensor.pin_memory() if tensor.device.type == "cpu" and not tensor.is_pinned() else tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on device; a CPU tensor bound for a GPU goes through page-locked memory (pinned)."""
    return (pinned(tensor) if device.type == "cuda" else tensor).to(device, non_blocking=True)
