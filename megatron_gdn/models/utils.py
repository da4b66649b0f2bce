"""Cache: the per-layer state a Gated DeltaNet model carries from one forward call to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerState:
    """What one GDN layer needs to continue a sequence.

    recurrent_state: [B, HV, K, V] fp32, the delta-rule state after the last token.
    conv_state: the last conv_size - 1 inputs of the q, k, v short convolutions, each [B, conv_size - 1, D]
    (None without short convolutions).
    """

    recurrent_state: torch.Tensor
    conv_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class Cache:
    """The generation cache: one LayerState per layer plus the number of tokens seen.

    Pass an empty Cache() with use_cache=True to the first forward; each layer fills its entry.
    """

    def __init__(self) -> None:
        self.layers: list[LayerState | None] = []
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> LayerState | None:
        return self.layers[layer_idx] if layer_idx < len(self.layers) else None

    def update(self, layer_idx: int, state: LayerState, num_new_tokens: int) -> None:
        """Store layer_idx's state; the first layer's update advances seen_tokens."""
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        self.layers[layer_idx] = state
        if layer_idx == 0:
            self.seen_tokens += num_new_tokens

    def get_seq_length(self) -> int:
        return self.seen_tokens
