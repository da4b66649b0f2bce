"""Named random-number streams that can be swapped in around a piece of code (Megatron's RNG tracker).

The default generators (CPU, and the current GPU's) carry the seed shared by every rank: identical
draws everywhere, which is what initialisation needs (parallelize.py initialises the full model on
every rank and keeps a shard, so a TP run starts from the same weights as one process). Randomness
that must differ between the ranks of a TP group, like dropout on the activations of a TP region
(each rank holds other heads) or on sequence-parallel shards (other tokens), runs inside
`tracker.fork()`, which uses the "model-parallel-rng" stream seeded with seed + 2718 + tp_rank as in
Megatron. The tracker's states go into checkpoints so a resumed run continues every stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"
MODEL_PARALLEL_SEED_OFFSET = 2718  # Megatron's offset, so seeds line up with its runs


def _default_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_default_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _seeded_states(seed: int) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
    return states


class RNGStatesTracker:
    """Named generator states; `fork(name)` runs a block with that stream as the default generator."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"random stream {name!r} already exists")
        self._states[name] = _seeded_states(seed)

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"no random stream {name!r}; known: {sorted(self._states)}")
        outer = _default_states()
        _set_default_states(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _default_states()
            _set_default_states(outer)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: dict(states) for name, states in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._states = {name: dict(s) for name, s in states.items()}


def model_parallel_rng_tracker(seed: int, tensor_model_parallel_rank: int) -> RNGStatesTracker:
    """The tracker of a training run: a per-TP-rank stream for TP-region randomness, and the shared one."""
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + tensor_model_parallel_rank)
    tracker.add(DATA_PARALLEL_RNG, seed)
    return tracker
