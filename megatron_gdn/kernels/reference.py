"""The gated delta rule in plain PyTorch: the CPU path and the oracle of every kernel test.

Two forms of the same function (layout as flash-linear-attention, state S is [K, V] per value head):

* ``recurrent_gated_delta_rule``: the per-token recurrence, written as literally as possible.
  It is the oracle; it is slow (a Python loop over tokens).
* ``chunk_gated_delta_rule_torch``: the chunked (WY / UT transform) algorithm, vectorised over
  chunks, with a sequential scan over chunks for the state. Fast enough to train small models on a CPU.

Per token t and value head (q/k head = value head // (HV / H)):

    S   = exp(g_t) * S                      # decay first
    S   = S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = scale * S^T q_t                   # read after the write

Both take q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay, <= 0), beta: [B, T, HV];
initial_state: [N, HV, K, V]; cu_seqlens: [N + 1] with B == 1 for packed documents (the state
restarts from initial_state[n] at each document). They compute in fp32 (fp64 if the inputs are
fp64), return o in v's dtype and the final state in the compute dtype, and are differentiable in
every input through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (flash-linear-attention's convention)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The log decay g = -exp(A_log) * softplus(a + dt_bias), in fp32 (Mamba2-style gate).

    a: [..., HV] raw gate logits (a_proj(x)); A_log, dt_bias: [HV]. Returns fp32 (fp64 for fp64 a).
    """
    dtype = _compute_dtype(a)
    return -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head output norm of the GDN layer: rmsnorm(x) * weight * silu(gate), computed in fp32.

    x, gate: [..., D]; weight: [D]. Returns x's dtype.
    """
    dtype = _compute_dtype(x)
    x32 = x.to(dtype)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return (y * F.silu(gate.to(dtype))).to(x.dtype)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """Upcast, L2-normalise, scale q, and expand q/k heads to the value heads (GVA)."""
    dtype = _compute_dtype(q, k, v)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    group = v.shape[2] // q.shape[2]
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    return q * scale, k, v, g, beta


def _segments(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence; row n of the states belongs to segment n."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def recurrent_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-token recurrence (the oracle). See the module docstring for shapes."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    B, T, HV, K = k.shape
    V = v.shape[-1]
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(_segments(B, T, cu_seqlens)):
        if initial_state is None:
            S = q.new_zeros(HV, K, V)
        else:
            S = initial_state[n].to(q.dtype)
        for t in range(start, end):
            S = S * g[b, t].exp()[:, None, None]
            err = v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t])
            S = S + torch.einsum("hk,hv->hkv", k[b, t], beta[b, t][:, None] * err)
            outputs.append(torch.einsum("hkv,hk->hv", S, q[b, t]))
        finals.append(S)
    o = torch.stack(outputs).reshape(B, T, HV, V) if outputs else v.new_zeros(B, T, HV, V)
    final_state = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final_state


def _to_chunks(x: torch.Tensor, segments, chunk_size: int) -> torch.Tensor:
    """Cut each sequence into chunks of chunk_size tokens, zero-padding its last chunk.

    x: [B, T, ...] -> [num_chunks, chunk_size, ...]. Zero padding is harmless: a padded token has
    g = 0 (no decay), beta = 0 (no write) and k = q = 0, so it changes neither state nor output.
    """
    pieces = []
    for b, start, end in segments:
        seq = x[b, start:end]
        pad = (-seq.shape[0]) % chunk_size
        if pad or seq.shape[0] == 0:
            pad = pad or chunk_size
            seq = torch.cat([seq, seq.new_zeros(pad, *seq.shape[1:])])
        pieces.append(seq.reshape(-1, chunk_size, *seq.shape[1:]))
    return torch.cat(pieces)


def chunk_gated_delta_rule_torch(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked algorithm (../DESIGN.md section 3) in PyTorch. Same contract as the recurrence.

    Within a chunk of C tokens with local cumulative log decay G:
      A = strict_lower(beta_i (k_i . k_j) exp(G_i - G_j)),  Tm = (I + A)^-1
      w = Tm (beta exp(G) k),  u = Tm (beta v)
    and, scanning chunks in order with S the state entering the chunk:
      v_new = u - w S
      o     = exp(G) q S + (lower_incl(q k^T exp(G_i - G_j))) v_new
      S     = exp(G_last) S + (k exp(G_last - G))^T v_new
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    B, T, HV, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    segments = _segments(B, T, cu_seqlens)
    # Chunks of all sequences side by side: [NC, C, HV, ...], heads moved before time.
    qc, kc, vc, gc, bc = (_to_chunks(x, segments, C).transpose(1, 2) for x in (q, k, v, g, beta))
    G = gc.cumsum(-1)  # [NC, HV, C], chunk-local, so every exponent below is a difference <= 0
    row = torch.arange(C, device=q.device)
    strict = row[:, None] > row[None, :]
    incl = row[:, None] >= row[None, :]
    # where() before exp(): masked entries would be positive and could overflow.
    diff = G[..., :, None] - G[..., None, :]
    decay_strict = torch.where(strict, diff, float("-inf")).exp()
    decay_incl = torch.where(incl, diff, float("-inf")).exp()

    A = (kc @ kc.transpose(-1, -2)) * decay_strict * bc[..., None]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    Tm = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    w = Tm @ (kc * (bc * G.exp())[..., None])
    u = Tm @ (vc * bc[..., None])
    attn = (qc @ kc.transpose(-1, -2)) * decay_incl
    q_decayed = qc * G.exp()[..., None]
    k_to_end = kc * (G[..., -1:] - G).exp()[..., None]
    last_decay = G[..., -1].exp()[..., None, None]

    # Lay the chunks out as a [N sequences, most chunks] grid so that one scan step advances every
    # sequence at once. Empty cells point at an appended all-zero chunk with no decay, which leaves
    # the state unchanged; the intra-chunk work above was done on real chunks only.
    counts = [max(1, -(-(end - start) // C)) for _, start, end in segments]
    firsts = [sum(counts[:n]) for n in range(len(counts))]
    num_real = sum(counts)
    grid = torch.full((len(segments), max(counts)), num_real, dtype=torch.long, device=q.device)
    for n, (first, count) in enumerate(zip(firsts, counts)):
        grid[n, :count] = torch.arange(first, first + count, device=q.device)

    def on_grid(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return torch.cat([x, torch.full_like(x[:1], fill)])[grid]

    u, w, attn, q_decayed, k_to_end = map(on_grid, (u, w, attn, q_decayed, k_to_end))
    last_decay = on_grid(last_decay, fill=1.0)

    if initial_state is None:
        S = q.new_zeros(len(segments), HV, K, V)
    else:
        S = initial_state.to(q.dtype)
    outputs = []
    for c in range(grid.shape[1]):
        v_new = u[:, c] - w[:, c] @ S
        outputs.append(q_decayed[:, c] @ S + attn[:, c] @ v_new)
        S = last_decay[:, c] * S + k_to_end[:, c].transpose(-1, -2) @ v_new

    o_grid = torch.stack(outputs, dim=1).transpose(2, 3)  # [N, chunks, C, HV, V]
    pieces = [o_grid[n, :count].reshape(-1, HV, V)[: end - start]
              for n, (count, (_, start, end)) in enumerate(zip(counts, segments))]
    o = torch.stack(pieces) if cu_seqlens is None else torch.cat(pieces)[None]
    return o.to(out_dtype), (S if output_final_state else None)
