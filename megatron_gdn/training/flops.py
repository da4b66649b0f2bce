"""Model FLOPs of a Gated DeltaNet language model, for throughput and MFU.

Counted per token of the forward pass as 2 x (multiply-adds), then x 3 for forward + backward
(the backward computes the gradients of inputs and of weights, each as costly as the forward:
the convention of Megatron-LM's throughput and of the PaLM paper's MFU, appendix B).
Recomputation is not counted: this is model FLOPs, not hardware FLOPs.

Per layer, with h = hidden, dk = key_dim, dv = value_dim, HV value heads of K x V, conv width W,
chunk C = 64, intermediate size I:
  projections   2 h (2 dk + 2 dv + 2 HV) + 2 dv h          q, k, v, g, a, b in; o out (g only with the gate)
  short conv    2 W (2 dk + dv)
  delta rule    HV x [2 C K (K K^T and Q K^T) + 2 C K (w = T k) + 2 C V (u = T v) + 2 C V (attention x v_new)
                      + 3 x 2 K V (w S, q S and the state update)]        per token, chunked form
  MLP           3 x 2 h I
and once per token the lm head, 2 h vocab. Norms, activations and the [C, C] triangular solve are
left out (under 1% at the shapes that matter).
"""

from __future__ import annotations

from ..models.configuration import GatedDeltaNetConfig

CHUNK_SIZE = 64

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "GB200": 2450e12, "B200": 2250e12}


def forward_flops_per_token(config: GatedDeltaNetConfig) -> float:
    h = config.hidden_size
    K, V = config.head_dim, config.head_v_dim
    HV = config.num_v_heads
    dk, dv = config.num_heads * K, HV * V
    C = CHUNK_SIZE
    gate_dim = dv if config.use_gate else 0
    projections = 2 * h * (2 * dk + dv + gate_dim + 2 * HV) + 2 * dv * h
    conv = 2 * config.conv_size * (2 * dk + dv) if config.use_short_conv else 0
    delta_rule = HV * (2 * 2 * C * K + 2 * C * K + 2 * 2 * C * V + 3 * 2 * K * V)
    mlp = 3 * 2 * h * config.intermediate_size
    return config.num_hidden_layers * (projections + conv + delta_rule + mlp) + 2 * h * config.vocab_size


def training_flops_per_token(config: GatedDeltaNetConfig) -> float:
    return 3 * forward_flops_per_token(config)


def peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a known GPU, or None (then MFU is not reported)."""
    for key, value in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return None
