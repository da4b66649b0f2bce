"""The GDN layer's short convolution in Triton: depthwise causal convolution over time, then SiLU.

    y[t] = silu(bias + sum_{s < W} weight[:, W-1-s] * x[t - s])       x[t < 0] comes from `past`

The semantics are fused_reference.short_conv_silu's (the ShortConvolution module's): `past` holds the W - 1
inputs before x (zeros when absent); with packed documents a tap s is cut at token t when t is fewer than s
tokens into its document (document_positions, which lets the first document start inside `past`). fp32
inside, y in x's dtype.

Forward: one program per (block of tokens, block of channels, sequence). Backward: one kernel,
short_conv_bwd_kernel, one program per (strip of STRIP_BLOCKS blocks of rows, block of channels, sequence). For
each block of input rows (starting W - 1 rows before x, so that the first block also gives the gradient of
`past`) it recomputes the pre-activation's gradient dpre = dy * silu'(a) at the W shifted row blocks that the
rows feed, sums dx[t] = sum_s weight[:, W-1-s] dpre[t + s], and adds dpre[u] x[u - s] to the weight gradient
elementwise in registers, reducing across rows once per strip ([B * strips, W, D] partial sums, channels
contiguous; torch adds the strips). Per token and channel that reads x and dy once and writes dx once (6 bytes in
bf16); the W x W shifted loads overlap and come from cache. History on an H100 (`small`'s 8 x 4096 x 768, bf16):
three kernels (dpre to a scratch tensor, dx from it, the weight gradient from it and x; 14 bytes) took 222 us; an
earlier one reduced across rows W times per block: 7 times the forward's time. Decoding one token has its own
kernel (short_conv_silu_step), which also shifts the cached inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_reference import document_positions

# Tokens x channels per program: the forward holds W + 1 tiles at most. The backward sums W [rows, channels] fp32
# products in one [W rounded up to a power of two, 16, 64] tile for a strip of 32 blocks (512 rows).
BT, BD = 16, 128
BT_BWD, BD_BWD, STRIP_BLOCKS = 16, 64, 32


@triton.jit
def load_inputs(x, past, i_b, o_t, o_d, T, SX, D: tl.constexpr, W: tl.constexpr, HAS_PAST: tl.constexpr):
    """[len(o_t), len(o_d)] fp32 inputs of sequence i_b at rows o_t (SX elements apart in x): rows < 0 from past
    (zero without it)."""
    m_d = (o_d < D)[None, :]
    b_x = tl.load(x + (i_b * T + o_t)[:, None] * SX + o_d[None, :],
                  mask=((o_t >= 0) & (o_t < T))[:, None] & m_d, other=0.).to(tl.float32)
    if HAS_PAST:  # past is [B, W - 1, D]: row -1 is its last
        b_x += tl.load(past + (i_b * (W - 1) + o_t + W - 1)[:, None] * D + o_d[None, :],
                       mask=((o_t < 0) & (o_t >= 1 - W))[:, None] & m_d, other=0.).to(tl.float32)
    return b_x


@triton.jit
def tap_kept(pos, o_u, s, T):
    """[len(o_u)] whether output rows u keep tap s: u is at least s tokens into its document (rows outside
    [0, T) read position 0)."""
    return tl.load(pos + o_u, mask=(o_u >= 0) & (o_u < T), other=0) >= s


@triton.jit
def load_tap(x, past, pos, i_b, o_t, o_d, s, T, SX, D: tl.constexpr, W: tl.constexpr, HAS_PAST: tl.constexpr,
             HAS_DOCS: tl.constexpr):
    """[len(o_t), len(o_d)] fp32 input x[t - s] that tap s brings to output rows o_t, zero where it is cut."""
    b_x = load_inputs(x, past, i_b, o_t - s, o_d, T, SX, D, W, HAS_PAST)
    if HAS_DOCS:
        b_x = tl.where(tap_kept(pos, o_t, s, T)[:, None], b_x, 0.)
    return b_x


@triton.jit
def conv_preact(x, past, weight, bias, pos, i_b, o_t, o_d, T, SX, D: tl.constexpr, W: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_DOCS: tl.constexpr):
    """[BT, BD] fp32 bias + sum_s weight[:, W-1-s] x[t - s] at rows o_t, with the taps that reach before the
    token's document start cut."""
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(bias + o_d, mask=o_d < D, other=0.).to(tl.float32)[None, :]
    for s in tl.static_range(W):
        b_w = tl.load(weight + o_d * W + W - 1 - s, mask=o_d < D, other=0.).to(tl.float32)  # [BD]
        b_acc += load_tap(x, past, pos, i_b, o_t, o_d, s, T, SX, D, W, HAS_PAST, HAS_DOCS) * b_w[None, :]
    return b_acc


@triton.jit
def short_conv_fwd_kernel(x, past, weight, bias, pos, y, T, SX, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    b_a = conv_preact(x, past, weight, bias, pos, i_b, o_t, o_d, T, SX, D, W, BT, BD, HAS_PAST, HAS_BIAS, HAS_DOCS)
    tl.store(y + (i_b * T + o_t)[:, None] * D + o_d[None, :], (b_a * tl.sigmoid(b_a)).to(y.dtype.element_ty),
             mask=(o_t < T)[:, None] & (o_d < D)[None, :])


@triton.jit
def conv_dpre(x, past, weight, bias, pos, dy, i_b, o_u, o_d, T, SX, D: tl.constexpr, W: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DOCS: tl.constexpr):
    """[BT, BD] fp32 gradient of the pre-activation at output rows o_u, recomputed from x; zero outside [0, T)."""
    b_a = conv_preact(x, past, weight, bias, pos, i_b, o_u, o_d, T, SX, D, W, BT, BD, HAS_PAST, HAS_BIAS, HAS_DOCS)
    b_dy = tl.load(dy + (i_b * T + o_u)[:, None] * D + o_d[None, :],
                   mask=((o_u >= 0) & (o_u < T))[:, None] & (o_d < D)[None, :], other=0.).to(tl.float32)
    b_s = tl.sigmoid(b_a)
    return b_dy * b_s * (1. + b_a * (1. - b_s))  # silu'(a)


@triton.jit
def short_conv_bwd_kernel(x, past, weight, bias, pos, dy, dx, dpast, dweight, dbias, T, SX, NB, NS, D: tl.constexpr,
                          W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                          BLOCKS: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_DOCS: tl.constexpr):
    """One strip of up to BLOCKS blocks of BT input rows. Input rows start W - 1 rows before x, so the first block
    also gives the gradient of `past`: dx[t] = sum_s weight[:, W-1-s] dpre[t + s] over the taps s not cut at
    output t + s, with dpre recomputed at each shifted row block. The last of those blocks (rows t + W - 1, each
    output row once over all blocks) adds dpre[u] x[u - s] to the weight gradient's column W-1-s, summed
    elementwise in registers and across rows once at the end: this strip's partial sums ([B * NS, W, D])."""
    i_s, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_s = tl.arange(0, WP)
    # tap s's products go to row s of one [WP, BT, BD] tile (a select, not a list: Triton has no arrays of tiles)
    b_dw = tl.zeros([WP, BT, BD], dtype=tl.float32)
    b_db = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(i_s * BLOCKS, tl.minimum(i_s * BLOCKS + BLOCKS, NB)):
        o_t = j * BT - (W - 1) + tl.arange(0, BT)
        b_dx = tl.zeros([BT, BD], dtype=tl.float32)
        b_dpre = tl.zeros([BT, BD], dtype=tl.float32)
        for s in tl.static_range(W):
            b_dpre = conv_dpre(x, past, weight, bias, pos, dy, i_b, o_t + s, o_d, T, SX, D, W, BT, BD, HAS_PAST,
                               HAS_BIAS, HAS_DOCS)
            b_w = tl.load(weight + o_d * W + W - 1 - s, mask=m_d, other=0.).to(tl.float32)
            if HAS_DOCS:
                b_dx += tl.where(tap_kept(pos, o_t + s, s, T)[:, None], b_dpre, 0.) * b_w[None, :]
            else:
                b_dx += b_dpre * b_w[None, :]
        tl.store(dx + (i_b * T + o_t)[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty),
                 mask=((o_t >= 0) & (o_t < T))[:, None] & m_d[None, :])
        if HAS_PAST:
            tl.store(dpast + (i_b * (W - 1) + o_t + W - 1)[:, None] * D + o_d[None, :],
                     b_dx.to(dpast.dtype.element_ty), mask=(o_t < 0)[:, None] & m_d[None, :])
        o_u = o_t + W - 1  # b_dpre's rows
        for s in tl.static_range(W):
            b_x = load_tap(x, past, pos, i_b, o_u, o_d, s, T, SX, D, W, HAS_PAST, HAS_DOCS)
            b_dw = tl.where((o_s == s)[:, None, None], b_dw + (b_dpre * b_x)[None, :, :], b_dw)
        b_db += b_dpre
    i_p = i_b * NS + i_s
    tl.store(dweight + (i_p * W + W - 1 - o_s[:, None]) * D + o_d[None, :], tl.sum(b_dw, axis=1),
             mask=(o_s < W)[:, None] & m_d[None, :])
    if HAS_BIAS:
        tl.store(dbias + i_p * D + o_d, tl.sum(b_db, axis=0), mask=m_d)


@triton.jit
def short_conv_step_kernel(x, state, weight, bias, y, new_state, D: tl.constexpr, W: tl.constexpr,
                           BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_acc = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)
    for s in tl.static_range(W - 1):  # the cached inputs, oldest first, meet weight column s
        b_s = tl.load(state + (i_b * (W - 1) + s) * D + o_d, mask=m_d, other=0.)  # [BD]
        b_acc += b_s.to(tl.float32) * tl.load(weight + o_d * W + s, mask=m_d, other=0.).to(tl.float32)
        if s > 0:  # shift the cache by one token
            tl.store(new_state + (i_b * (W - 1) + s - 1) * D + o_d, b_s.to(new_state.dtype.element_ty), mask=m_d)
    b_x = tl.load(x + i_b * D + o_d, mask=m_d, other=0.)
    b_acc += b_x.to(tl.float32) * tl.load(weight + o_d * W + W - 1, mask=m_d, other=0.).to(tl.float32)
    if W > 1:
        tl.store(new_state + (i_b * (W - 1) + W - 2) * D + o_d, b_x.to(new_state.dtype.element_ty), mask=m_d)
    tl.store(y + i_b * D + o_d, (b_acc * tl.sigmoid(b_acc)).to(y.dtype.element_ty), mask=m_d)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, past, pos):
        B, T, D = x.shape
        W = weight.shape[-1]
        if x.stride(-1) != 1 or (B > 1 and x.stride(0) != T * x.stride(1)):
            x = x.contiguous()  # rows a constant stride apart (a column slice of a fused projection is kept)
        weight = weight.reshape(D, W).contiguous()
        past = None if past is None else past.contiguous()
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        short_conv_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD), B)](
            x, past, weight, bias, pos, y, T, x.stride(1), D=D, W=W, BT=BT, BD=BD, HAS_PAST=past is not None,
            HAS_BIAS=bias is not None, HAS_DOCS=pos is not None)
        ctx.save_for_backward(x, weight, bias, past, pos)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, past, pos = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[-1]
        dy = dy.contiguous()
        dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        dpast = None if past is None else torch.empty_like(past)
        NB = triton.cdiv(T + W - 1, BT_BWD)  # blocks of input rows, past's included
        NS = triton.cdiv(NB, STRIP_BLOCKS)
        dweight = torch.empty(B * NS, W, D, dtype=torch.float32, device=x.device)
        dbias = None if bias is None else torch.empty(B * NS, D, dtype=torch.float32, device=x.device)
        short_conv_bwd_kernel[(NS, triton.cdiv(D, BD_BWD), B)](
            x, past, weight, bias, pos, dy, dx, dpast, dweight, dbias, T, x.stride(1), NB, NS, D=D, W=W,
            WP=triton.next_power_of_2(W), BT=BT_BWD, BD=BD_BWD, BLOCKS=STRIP_BLOCKS, HAS_PAST=past is not None,
            HAS_BIAS=bias is not None, HAS_DOCS=pos is not None)
        dweight = dweight.sum(0).t().to(weight.dtype).reshape(D, 1, W)
        return dx, dweight, None if bias is None else dbias.sum(0).to(bias.dtype), dpast, None


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                      output_final_state: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(silu(causal depthwise conv(x)), the last W - 1 inputs): fused_reference.short_conv_silu's contract;
    (y, None) with output_final_state=False.

    Differentiable in x, weight, bias and past. The returned tail is a small torch slice (autograd follows it).
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    pos = None if cu_seqlens is None else document_positions(cu_seqlens, T).to(torch.int32)
    y = ShortConvFunction.apply(x, weight, bias, past, pos)
    if not output_final_state:
        return y, None
    past_or_zeros = x.new_zeros(B, W - 1, D) if past is None else past.to(x.dtype)
    last = torch.cat([past_or_zeros, x[:, max(0, T - (W - 1)):]], dim=1)  # at least W - 1 rows
    return y, last[:, last.shape[1] - (W - 1):]


def short_conv_step_triton(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: x [B, D] after the cached inputs conv_state [B, W - 1, D] -> (y [B, D], the new cache
    [B, W - 1, D] in x's dtype: conv_state shifted by one token, x last). Forward only."""
    B, D = x.shape
    W = weight.shape[-1]
    x, conv_state, weight = x.contiguous(), conv_state.contiguous(), weight.reshape(D, W).contiguous()
    y = torch.empty_like(x)
    new_state = torch.empty(B, W - 1, D, dtype=x.dtype, device=x.device)
    short_conv_step_kernel[(triton.cdiv(D, BD), B)](x, conv_state, weight, bias, y, new_state, D=D, W=W, BD=BD,
                                                   HAS_BIAS=bias is not None)
    return y, new_state
