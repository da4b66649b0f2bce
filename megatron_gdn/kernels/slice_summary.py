"""What context parallelism needs from the kernels (../DESIGN.md section 4): the affine summary of a slice.

A slice of tokens maps the state entering it to the state leaving it affinely, S_out = M S_in + h, with
M = prod_t exp(g_t) (I - beta_t k_t k_t^T) ([K, K] per value head) and h the slice's final state from a zero
start. Both are final states of gated delta rule runs, so they come from the chunked kernels with their
gradients (to k, g, beta and v, and through the fused gate, beta sigmoid and L2 norm):

* h: run the slice from S_in = 0;
* M: run the slice with v = 0 (then u = 0 and every write is -beta k k^T S) from S_in = I.

The run of a slice from a given initial state, with gradients, is the public op itself:
``chunk_gated_delta_rule(..., initial_state=S_in, output_final_state=True)``; its gradient of S_in is the
dS0 that the backward chain passes to the ranks before.
"""

from __future__ import annotations

import torch


def slice_summary(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  cu_seqlens: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [N, HV, K, K], h [N, HV, K, V]), fp32, of each sequence of a slice; differentiable.

    k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] (or logits, with the fused options); options: the
    keyword options of chunk_gated_delta_rule (use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, backend). q does not enter a summary.
    """
    from . import chunk_gated_delta_rule

    B, T, H, K = k.shape
    HV = v.shape[2]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    _, h = chunk_gated_delta_rule(k, k, v, g, beta, output_final_state=True, cu_seqlens=cu_seqlens, **options)
    eye = torch.eye(K, dtype=torch.float32, device=k.device).expand(N, HV, K, K).contiguous()
    _, M = chunk_gated_delta_rule(k, k, k.new_zeros(B, T, HV, K), g, beta, initial_state=eye,
                                  output_final_state=True, cu_seqlens=cu_seqlens, **options)
    return M, h


def fold_summaries(Ms: list[torch.Tensor], hs: list[torch.Tensor], S: torch.Tensor | None = None) -> torch.Tensor:
    """The state after slices with summaries (Ms[j], hs[j]) in order, from S (zeros if None): S = M_j S + h_j.

    Shapes [..., K, K] and [..., K, V]; differentiable (the backward is the transposed chain of DESIGN.md 4).
    """
    for M, h in zip(Ms, hs):
        S = h if S is None else M @ S + h
    return S
