"""GatedDeltaNetConfig: the model's shape, with flash-linear-attention's field names and defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Named model sizes, expand_v = 2. tiny to large: q/k heads x head_dim = hidden, so value_dim = 2 x hidden.
# 1.3b: flash-linear-attention's default shape (the paper's 1.3B; key_dim = 0.75 x hidden, value_dim = 1.5 x hidden;
# 1.39B parameters with a 32000 vocabulary).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=6, num_heads=4, head_dim=64),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_heads=12, head_dim=64),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, num_heads=16, head_dim=64),
    "large": dict(hidden_size=1280, num_hidden_layers=36, num_heads=20, head_dim=64),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=21, num_heads=6, head_dim=256),
}


@dataclass
class GatedDeltaNetConfig:
    """Shape of a Gated DeltaNet language model (fla's `GatedDeltaNetConfig` fields).

    num_heads=None derives the q/k heads from the ~6 x hidden^2 parameter budget of the mixer:
    key_dim = 0.75 x hidden with the output gate, hidden without it.
    intermediate_size=None gives 256 x ceil(hidden x hidden_ratio x 2/3 / 256) (SwiGLU).
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 21
    num_heads: int | None = 6
    num_v_heads: int | None = None
    head_dim: int = 256
    expand_v: float = 2.0
    use_gate: bool = True
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    conv_bias: bool = False
    attn_mode: str = "chunk"
    hidden_ratio: int = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "gated_deltanet"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "conv_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads is None:
            key_dim = self.hidden_size * 3 // 4 if self.use_gate else self.hidden_size
            if key_dim % self.head_dim:
                raise ValueError(
                    f"cannot derive num_heads: key_dim {key_dim} (from hidden_size {self.hidden_size}) is not a "
                    f"multiple of head_dim {self.head_dim}; set num_heads explicitly")
            self.num_heads = key_dim // self.head_dim
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {self.num_heads}")
        if self.num_v_heads is None:
            self.num_v_heads = self.num_heads
        if self.num_v_heads % self.num_heads:
            raise ValueError(
                f"num_v_heads ({self.num_v_heads}) must be a multiple of num_heads ({self.num_heads}): "
                "each group of value heads shares one q/k head")
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v) or self.expand_v <= 0:
            raise ValueError(f"head_dim x expand_v must be a positive integer; got {self.head_dim} x {self.expand_v}")
        if self.attn_mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"attn_mode must be 'chunk' or 'fused_recurrent', got {self.attn_mode!r}")
        if self.hidden_act != "swish":
            raise ValueError(f"only hidden_act='swish' (SwiGLU) is supported, got {self.hidden_act!r}")
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(self.hidden_size * self.hidden_ratio * 2 / 3 / 256)

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GatedDeltaNetConfig":
        """A named size (tiny, small, medium, large, 1.3b); keyword arguments override its fields."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GatedDeltaNetConfig":
        """Build from a dict, ignoring keys this class does not know (e.g. from a newer version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
