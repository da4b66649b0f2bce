"""Public gated delta rule ops, with flash-linear-attention's signatures so users can swap them in.

    chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False) -> (o, final_state)
    fused_recurrent_gated_delta_rule(...same...) -> (o, final_state)

Like flash-linear-attention's, they optionally compute the gate and beta themselves (fused on GPU):
use_gate_in_kernel=True takes the raw gate logits as ``g`` with ``A_log`` and ``dt_bias`` and computes
g = -exp(A_log) * softplus(g + dt_bias); use_beta_sigmoid_in_kernel=True takes beta logits and applies
sigmoid (times 2 with allow_neg_eigval, so that beta is in (0, 2)).

q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H); g (log decay), beta: [B, T, HV];
states: [N, HV, K, V] fp32 (fp64 for fp64 inputs); cu_seqlens: [N + 1] with B == 1 for packed documents.
On CPU tensors they run the PyTorch reference (kernels/reference.py).
"""

from __future__ import annotations

import torch

from .reference import (chunk_gated_delta_rule_torch, gated_rmsnorm, gdn_gate, l2norm,
                        recurrent_gated_delta_rule)

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "check_inputs", "gated_rmsnorm",
           "gdn_gate", "l2norm"]


def check_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=None) -> int:
    """Validate shapes, dtypes and devices of a gated delta rule call; returns N, the number of sequences.

    Raises ValueError with a message that says what is wrong, instead of a failure deep inside a kernel.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}; got {tuple(v.shape)}")
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"the number of value heads ({HV}) must be a multiple of the q/k heads ({H})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}; got {tuple(t.shape)}")
    tensors = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state)]
    devices = {name: t.device for name, t in tensors if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device; got {devices}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B == 1; got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be an integer tensor [N + 1] of document offsets")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must rise monotonically from 0 to T={T}; got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None and initial_state.shape != (N, HV, K, v.shape[3]):
        raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, v.shape[3])}; got {tuple(initial_state.shape)}")
    return N


def _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    """Turn raw gate/beta logits into the log decay and beta (the PyTorch path of the fused options)."""
    if use_gate_in_kernel:
        if A_log is None or dt_bias is None:
            raise ValueError("use_gate_in_kernel=True needs A_log and dt_bias")
        g = gdn_gate(g, A_log, dt_bias)
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval needs use_beta_sigmoid_in_kernel=True (or pass beta already in (0, 2))")
    if use_beta_sigmoid_in_kernel:
        beta = beta.to(torch.promote_types(beta.dtype, torch.float32)).sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    return g, beta


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule by the chunked algorithm (training and prefill). Returns (o, final_state)."""
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule token by token (decoding a few tokens from a cached state)."""
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)
