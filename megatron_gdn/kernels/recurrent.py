"""The fused recurrent gated delta rule in Triton: one token at a time, for decoding (forward only).

One program owns a [K, BV] slice of one sequence's state for one value head, keeps it in fp32 registers
across the tokens of its sequence, and reads it from and writes it to memory once. Fused in: the q/k L2 norm,
the gate -exp(A_log) * softplus(g + dt_bias), and beta's sigmoid. Per token (the order of reference.py):

    S = exp(g) S;   S = S + k (beta (v - S^T k))^T;   o = scale S^T q
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import load_state, scan_coords
from .reference import L2NORM_EPS
from .triton_utils import configs, cu_seqlens_int32, exp, sigmoid, softplus


@triton.autotune(configs=configs([triton.Config({"BV": bv}, num_warps=nw)
                                  for bv, nw in ((16, 4), (8, 2), (16, 2), (32, 4), (32, 8), (64, 8))]),
                 key=["H", "HV", "K", "V", "BK", "NSEQ"], restore_value=[])
@triton.jit
def fused_recurrent_fwd_kernel(q, k, v, g, beta, A_log, dt_bias, h0, o, ht, cu_seqlens, scale, eps, NSEQ,
                               H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                               L2NORM: tl.constexpr, GATE_IN_KERNEL: tl.constexpr, BETA_SIGMOID: tl.constexpr,
                               BETA_SCALE: tl.constexpr):
    # cu_seqlens stands in for the chunk offsets, which a token-by-token pass does not use
    i_n, i_hv, i_h, bos, eos, _, o_v, p_s, m_s = scan_coords(cu_seqlens, cu_seqlens, H, HV, K, V, BK, BV)
    b_S = load_state(h0, i_n, i_hv, p_s, m_s, HV, K, V, BK, BV, USE_H0)  # [BK, BV]
    o_k = tl.arange(0, BK)
    m_k, m_v = o_k < K, o_v < V
    if GATE_IN_KERNEL:
        b_a = exp(tl.load(A_log + i_hv).to(tl.float32))
        b_dt = tl.load(dt_bias + i_hv).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)  # [BK]
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0.).to(tl.float32)  # [BV]
        b_g = tl.load(g + t * HV + i_hv).to(tl.float32)
        b_beta = tl.load(beta + t * HV + i_hv).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + eps)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + eps)
        if GATE_IN_KERNEL:
            b_g = -b_a * softplus(b_g + b_dt)
        if BETA_SIGMOID:
            b_beta = BETA_SCALE * sigmoid(b_beta)
        b_S = b_S * exp(b_g)
        b_vn = b_beta * (b_v - tl.sum(b_S * b_k[:, None], axis=0))  # [BV]
        b_S = b_S + b_k[:, None] * b_vn[None, :]
        b_o = tl.sum(b_S * b_q[:, None], axis=0) * scale
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + (i_n * HV + i_hv) * K * V + p_s, b_S, mask=m_s)


def fused_recurrent_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                        use_qk_l2norm_in_kernel=False, A_log=None, dt_bias=None, beta_scale=None):
    """Token-by-token forward. q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] (logits when
    A_log/dt_bias or beta_scale are given). Returns (o [B, T, HV, V], final state [N, HV, K, V] fp32 or None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    cu = cu_seqlens_int32(cu_seqlens, B, T, q.device)
    N = len(cu) - 1
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    gate = A_log is not None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]) * N * HV,)  # noqa: E731
    fused_recurrent_fwd_kernel[grid](
        q, k, v, g, beta, A_log if gate else g, dt_bias if gate else g, h0 if h0 is not None else o,
        o, ht if ht is not None else o, cu, scale, L2NORM_EPS, triton.next_power_of_2(N * HV),
        H=H, HV=HV, K=K, V=V, BK=triton.next_power_of_2(K), USE_H0=h0 is not None, STORE_HT=output_final_state,
        L2NORM=use_qk_l2norm_in_kernel, GATE_IN_KERNEL=gate, BETA_SIGMOID=beta_scale is not None,
        BETA_SCALE=beta_scale or 1.0)
    return o, ht
