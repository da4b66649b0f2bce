"""The PyTorch gated delta rule: the chunked form equals the per-token recurrence, and the recurrence
equals the closed-form transition S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_gdn.kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, gdn_gate
from megatron_gdn.kernels.reference import chunk_gated_delta_rule_torch, recurrent_gated_delta_rule


def rel_rms(ref: torch.Tensor, x: torch.Tensor) -> float:
    return ((ref - x).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_inputs(B, T, H, HV, K, V, decay="normal", neg_eigval=False, dtype=torch.float64, seed=0, h0=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=dtype)
    if decay == "none":
        g = torch.zeros(B, T, HV, dtype=dtype)
    elif decay == "strong":
        g = -torch.rand(B, T, HV, generator=gen, dtype=dtype) * 8 - 2  # exp(g) in (e^-10, e^-2)
    else:
        g = F.logsigmoid(torch.randn(B, T, HV, generator=gen, dtype=dtype))
    beta = torch.rand(B, T, HV, generator=gen, dtype=dtype) * (2.0 if neg_eigval else 1.0)
    state = None if h0 is None else torch.randn(h0, HV, K, V, generator=gen, dtype=dtype)
    return q, k, v, g, beta, state


CASES = {
    # name: (B, T, H, HV, K, V, decay, neg_eigval, cu_seqlens, with_h0)
    "T_not_multiple_of_chunk": (2, 100, 2, 2, 16, 12, "normal", False, None, True),
    "T_below_chunk": (2, 37, 2, 2, 16, 16, "normal", False, None, False),
    "more_value_heads": (1, 70, 2, 4, 16, 8, "normal", False, None, True),
    "varlen_with_length_1_doc": (1, 150, 2, 4, 16, 8, "normal", False, [0, 1, 65, 66, 130, 150], True),
    "no_decay": (2, 80, 2, 2, 16, 8, "none", False, None, True),
    "strong_decay": (2, 80, 2, 2, 16, 8, "strong", False, None, True),
    "allow_neg_eigval": (2, 90, 2, 2, 16, 8, "normal", True, None, True),
    "several_chunks_odd_dims": (1, 200, 3, 3, 20, 6, "normal", False, None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_equals_recurrence_values_and_gradients(case):
    B, T, H, HV, K, V, decay, neg, cu, with_h0 = CASES[case]
    cu_seqlens = torch.tensor(cu) if cu is not None else None
    N = len(cu) - 1 if cu is not None else B
    inputs = make_inputs(B, T, H, HV, K, V, decay, neg, h0=N if with_h0 else None)
    results = []
    for fn in (recurrent_gated_delta_rule, chunk_gated_delta_rule_torch):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
        q, k, v, g, beta, h0 = leaves
        o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                   use_qk_l2norm_in_kernel=True)
        # Random weights on both outputs so the final-state gradient flows into the loss.
        gen = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
               (ht * torch.randn(ht.shape, generator=gen, dtype=ht.dtype)).sum()
        loss.backward()
        results.append([o, ht] + [t.grad for t in leaves if t is not None])
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, ref, got in zip(names, *results):
        assert torch.isfinite(got).all(), name
        assert rel_rms(ref, got) < 1e-10, f"{name}: {rel_rms(ref, got)}"  # fp64


def test_chunk_equals_recurrence_fp32():
    inputs = make_inputs(2, 130, 2, 4, 32, 16, dtype=torch.float32, h0=2)
    q, k, v, g, beta, h0 = inputs
    ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True)
    got = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    for r, x in zip(ref, got):
        assert x.dtype == torch.float32
        assert rel_rms(r, x) < 1e-5


def test_recurrence_equals_closed_form_transition():
    """An independent oracle for the oracle: build the [K, K] transition matrices explicitly."""
    B, T, H, K, V = 1, 9, 1, 5, 3
    q, k, v, g, beta, h0 = make_inputs(B, T, H, H, K, V, h0=1)
    k = F.normalize(k, dim=-1)
    o, ht = recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0, output_final_state=True)
    S = h0[0, 0]
    for t in range(T):
        kt, vt, qt = k[0, t, 0], v[0, t, 0], q[0, t, 0]
        A = g[0, t, 0].exp() * (torch.eye(K, dtype=S.dtype) - beta[0, t, 0] * torch.outer(kt, kt))
        S = A @ S + beta[0, t, 0] * torch.outer(kt, vt)
        torch.testing.assert_close(o[0, t, 0], 0.7 * S.T @ qt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht[0, 0], S, rtol=1e-12, atol=1e-12)


def test_varlen_equals_separate_sequences():
    """Packing documents with cu_seqlens equals running each one alone from its own initial state."""
    lengths = [1, 64, 7, 100]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, g, beta, h0 = make_inputs(1, sum(lengths), 2, 2, 8, 8, h0=len(lengths))
    o, ht = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, h_n = recurrent_gated_delta_rule(*(x[:, start:end] for x in (q, k, v, g, beta)),
                                              initial_state=h0[n:n + 1], output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(o[:, start:end], o_n, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ht[n:n + 1], h_n, rtol=1e-10, atol=1e-10)


def test_public_ops_fuse_gate_and_beta():
    """use_gate_in_kernel / use_beta_sigmoid_in_kernel equal computing the gate and beta outside."""
    q, k, v, a, b, _ = make_inputs(1, 50, 2, 4, 8, 8)
    A_log = torch.rand(4, dtype=torch.float64) * 3
    dt_bias = torch.randn(4, dtype=torch.float64)
    for op in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        fused, _ = op(q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                      dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
        g = -A_log.exp() * F.softplus(a + dt_bias)
        plain, _ = recurrent_gated_delta_rule(q, k, v, g, 2 * b.sigmoid(), use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gdn_gate(a, A_log, dt_bias), -A_log.exp() * F.softplus(a + dt_bias))


@pytest.mark.parametrize("bad, message", [
    (dict(k=torch.randn(1, 10, 3, 8)), "q and k"),
    (dict(v=torch.randn(1, 10, 3, 8)), "multiple of the q/k heads"),
    (dict(g=torch.randn(1, 10, 3)), "g must be"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10])), "monotonically"),
    (dict(cu_seqlens=torch.tensor([0, 5, 9])), "from 0 to T"),
    (dict(initial_state=torch.zeros(2, 2, 8, 8)), "initial_state"),
    (dict(v=torch.randn(1, 10, 2, 8, dtype=torch.float64)), "dtype"),
])
def test_clear_errors(bad, message):
    args = dict(q=torch.randn(1, 10, 2, 8), k=torch.randn(1, 10, 2, 8), v=torch.randn(1, 10, 2, 8),
                g=torch.zeros(1, 10, 2), beta=torch.rand(1, 10, 2))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**args)


def test_cu_seqlens_needs_packed_batch():
    x = torch.randn(2, 10, 2, 8)
    with pytest.raises(ValueError, match="B == 1"):
        chunk_gated_delta_rule(x, x, x, torch.zeros(2, 10, 2), torch.rand(2, 10, 2), cu_seqlens=torch.tensor([0, 10]))
