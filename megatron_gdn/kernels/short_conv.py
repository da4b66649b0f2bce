"""The GDN layer's short convolution in Triton: depthwise causal convolution over time, then SiLU.

    y[t] = silu(bias + sum_{s < W} weight[:, W-1-s] * x[t - s])       x[t < 0] comes from `past`

The semantics are fused_reference.short_conv_silu's (the ShortConvolution module's): `past` holds the W - 1
inputs before x (zeros when absent); with packed documents a tap s is cut at token t when t is fewer than s
tokens into its document (document_positions, which lets the first document start inside `past`). fp32
inside, y in x's dtype.

Every kernel loads the W taps of a block of rows as one [rows, W rounded up to a power of two, channels] tile
(x[t - s] at [t, s]: the shifted row blocks overlap, so all but one row of each is a cache hit) and sums over
the taps in registers. x may be a column slice of a wider tensor (the fused projection's output): its rows are
read SX elements apart where they lie, and with a SharedGradient its gradient is written in its place there.
Forward: one program per (block of tokens, block of channels, sequence). Backward, two kernels:
- short_conv_bwd_dpre_kernel, per strip of output rows (strip_rows): recomputes the pre-activation a,
  stores dpre = dy * silu'(a) in x's dtype ([B, T, D] scratch), and adds dpre[t] x[t - s] to the weight gradient
  in the taps' tile, summed elementwise over the strip and across rows once at the end ([B * strips, W, D]
  partial sums, channels contiguous; torch adds the strips);
- short_conv_bwd_dx_kernel, per block of *input* rows, which start W - 1 rows before x so that the first program
  also produces the gradient of `past`: dx[t] = sum_s weight[:, W-1-s] dpre[t + s] over the taps not cut at t + s.
Per token and channel that reads x, dy and dpre once and writes dpre and dx once (10 bytes in bf16). On an H100
the 36 backward calls of a `small` training step took 5.9 ms; on an H200 5.7, and 4.7 since dpre's loop over its
strip is software-pipelined (session 13). History: three kernels, the weight gradient apart
(14 bytes), 8.0 ms; one kernel that recomputed dpre at the W shifted row blocks (6 bytes, W x W loads), slower
still; an earlier version reduced across rows W times per block: 7 times the forward's time. Decoding one token
has its own kernel (short_conv_silu_step), which also shifts the cached inputs.

The GDN layer's q and k are L2-normalised per head after the convolution (l2norm_head_dim). The forward and dpre
kernels do it themselves with blocks one head wide (fewer rows, the same tile size): the forward normalises the
fp32 silu output before its one rounding, and dpre recomputes it to take dy back through the norm. That saves the
delta rule's separate L2 norm, a pass over q and k each way (2.1 ms of a `small` step on an H100, session 10).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CONV_L2NORM_HEAD_DIMS
from .fused_reference import document_positions
from .reference import L2NORM_EPS
from .shared_gradient import SharedGradient, gradient_like
from .triton_utils import sm_count

# Rows x channels per program. Each program holds [rows, WP, channels] tiles, WP being W rounded up to a power of
# two, with rows = TAP_ROWS // WP: the same tile for every width (at 16 rows, W > 4 spilled registers). The dpre
# kernel holds two (the taps and the weight gradient's products) and runs over strips of up to STRIP_ROWS rows
# (strip_rows).
TAP_ROWS, BD = 64, 128
TAP_ROWS_DPRE, BD_DPRE, STRIP_ROWS, MIN_STRIP_ROWS = 64, 64, 512, 128


def strip_rows(B: int, T: int, channel_blocks: int, sms: int) -> int:
    """Rows of a dpre program's strip: STRIP_ROWS, halved (down to MIN_STRIP_ROWS) while the grid would have fewer
    than two programs per SM. Longer strips add fewer partial sums, but the 1.3b preset's q and k (batch 4, 6 heads
    of 256 channels) gave only 192 programs of 512 rows: 109 us a call on an H200, against 79 for 384 programs of
    256 rows and 94 for 128 rows; every other preset's shape was fastest at 512 (session 16)."""
    strip = STRIP_ROWS
    while strip > MIN_STRIP_ROWS and B * triton.cdiv(T, strip) * channel_blocks < 2 * sms:
        strip //= 2
    return strip


def tile_rows(W: int, tap_rows: int) -> int:
    """Rows per block for width W: tap_rows // WP (a power of two, at least 1)."""
    return max(1, tap_rows // triton.next_power_of_2(W))


@triton.jit
def tap_weights(weight, o_d, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """[WP, BD] fp32 weight[:, W-1-s] for tap s (zero for s >= W)."""
    o_s = tl.arange(0, WP)
    return tl.load(weight + o_d[None, :] * W + W - 1 - o_s[:, None], mask=(o_s < W)[:, None] & (o_d < D)[None, :],
                   other=0.).to(tl.float32)


@triton.jit
def load_taps(x, past, pos, i_b, o_t, o_d, T, SX, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
              HAS_PAST: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[len(o_t), WP, len(o_d)] fp32 x[t - s]: what tap s brings to output row t, zero for s >= W and where the
    tap is cut (t fewer than s tokens into its document). x's rows are SX elements apart; rows < 0 come from past
    (zero without it). The W shifted row blocks overlap: all but one row of each is a cache hit."""
    o_s = tl.arange(0, WP)
    o_r = o_t[:, None] - o_s[None, :]  # [BT, WP] source rows
    m = ((o_s < W)[None, :] & (o_r >= 0) & (o_r < T))[:, :, None] & (o_d < D)[None, None, :]
    b_x = tl.load(x + (i_b * T + o_r)[:, :, None] * SX + o_d[None, None, :], mask=m, other=0.).to(tl.float32)
    if HAS_PAST:  # past is [B, W - 1, D]: row -1 is its last
        m = ((o_s < W)[None, :] & (o_r < 0) & (o_r >= 1 - W))[:, :, None] & (o_d < D)[None, None, :]
        b_x += tl.load(past + (i_b * (W - 1) + o_r + W - 1)[:, :, None] * D + o_d[None, None, :], mask=m,
                       other=0.).to(tl.float32)
    if HAS_DOCS:
        b_x = tl.where(taps_kept(pos, o_t, T, WP)[:, :, None], b_x, 0.)
    return b_x


@triton.jit
def taps_kept(pos, o_u, T, WP: tl.constexpr):
    """[len(o_u), WP] whether output rows u keep tap s: u is at least s tokens into its document (rows outside
    [0, T) read position 0)."""
    return tl.load(pos + o_u, mask=(o_u >= 0) & (o_u < T), other=0)[:, None] >= tl.arange(0, WP)[None, :]


@triton.jit
def conv_preact(b_x, b_w, bias, o_d, D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """[BT, BD] fp32 bias + sum_s weight[:, W-1-s] x[t - s] from load_taps' and tap_weights' tiles."""
    b_a = tl.sum(b_x * b_w[None, :, :], axis=1)
    if HAS_BIAS:
        b_a += tl.load(bias + o_d, mask=o_d < D, other=0.).to(tl.float32)[None, :]
    return b_a


@triton.jit
def head_rstd(b_y, eps):
    """[BT] 1 / sqrt(sum(y^2) + eps) over each row of a [BT, head dim] tile: kernels/l2norm.py's rule."""
    return 1. / tl.sqrt(tl.sum(b_y * b_y, axis=1) + eps)


@triton.jit
def short_conv_fwd_kernel(x, past, weight, bias, pos, y, T, SX, eps, D: tl.constexpr, W: tl.constexpr,
                          WP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_PAST: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr, L2NORM: tl.constexpr):
    """L2NORM: BD is the head dimension, and each row of the tile (one token's head) is L2-normalised."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    b_x = load_taps(x, past, pos, i_b, o_t, o_d, T, SX, D, W, WP, HAS_PAST, HAS_DOCS)
    b_a = conv_preact(b_x, tap_weights(weight, o_d, D, W, WP), bias, o_d, D, HAS_BIAS)
    b_y = b_a * tl.sigmoid(b_a)
    if L2NORM:
        b_y = b_y * head_rstd(b_y, eps)[:, None]
    tl.store(y + (i_b * T + o_t)[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty),
             mask=(o_t < T)[:, None] & (o_d < D)[None, :])


@triton.jit
def short_conv_bwd_dpre_kernel(x, past, weight, bias, pos, dy, dpre, dweight, dbias, T, SX, NS, eps,
                               D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr,
                               BD: tl.constexpr, BLOCKS: tl.constexpr, HAS_PAST: tl.constexpr,
                               HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr, L2NORM: tl.constexpr):
    """Per strip of BLOCKS blocks of output rows: dpre = dy * silu'(a) (a recomputed), stored in dpre's dtype, and
    this strip's partial sums of the weight and bias gradients: row t adds dpre[t] x[t - s] to weight[:, W-1-s]
    (nothing where tap s is cut) and dpre[t] to the bias. The products are summed elementwise over the strip in
    the [BT, WP, BD] tile that the taps were loaded in, and across rows once at the end. L2NORM (BD the head
    dimension): dy is the gradient of the normalised output n = silu(a) rstd, and goes back through the norm
    first: d silu(a) = (dy - n (dy . n)) rstd, with silu(a) and rstd recomputed as the forward computed them."""
    i_s, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_w = tap_weights(weight, o_d, D, W, WP)
    b_dw = tl.zeros([BT, WP, BD], dtype=tl.float32)
    b_db = tl.zeros([BT, BD], dtype=tl.float32)
    # Software-pipelined, 3 stages: the next blocks' loads are in flight while this one computes. The plain loop
    # waited on each block's loads (session 13, H200: 104 -> 76 us for `small`'s q, 146 -> 126 for its v)
    for j in tl.range(BLOCKS, num_stages=3):
        o_t = (i_s * BLOCKS + j) * BT + tl.arange(0, BT)
        b_x = load_taps(x, past, pos, i_b, o_t, o_d, T, SX, D, W, WP, HAS_PAST, HAS_DOCS)
        b_a = conv_preact(b_x, b_w, bias, o_d, D, HAS_BIAS)
        m = (o_t < T)[:, None] & m_d[None, :]
        b_dy = tl.load(dy + (i_b * T + o_t)[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
        b_s = tl.sigmoid(b_a)
        if L2NORM:
            b_y = b_a * b_s
            b_rstd = head_rstd(b_y, eps)
            b_n = b_y * b_rstd[:, None]
            b_dy = (b_dy - b_n * tl.sum(b_dy * b_n, axis=1)[:, None]) * b_rstd[:, None]
        b_dpre = b_dy * b_s * (1. + b_a * (1. - b_s))  # silu'(a); zero beyond T
        tl.store(dpre + (i_b * T + o_t)[:, None] * D + o_d[None, :], b_dpre.to(dpre.dtype.element_ty), mask=m)
        b_dw += b_dpre[:, None, :] * b_x
        b_db += b_dpre
    i_p = i_b * NS + i_s
    o_s = tl.arange(0, WP)
    tl.store(dweight + (i_p * W + W - 1 - o_s[:, None]) * D + o_d[None, :], tl.sum(b_dw, axis=0),
             mask=(o_s < W)[:, None] & m_d[None, :])
    if HAS_BIAS:
        tl.store(dbias + i_p * D + o_d, tl.sum(b_db, axis=0), mask=m_d)


@triton.jit
def short_conv_bwd_dx_kernel(weight, pos, dpre, dx, dpast, T, SDX, D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                             BT: tl.constexpr, BD: tl.constexpr, HAS_PAST: tl.constexpr, HAS_DOCS: tl.constexpr):
    """dx[t] = sum_s weight[:, W-1-s] dpre[t + s] over the taps s not cut at output t + s. The input rows start
    W - 1 rows before x, so the first program also writes the gradient of `past`."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT - (W - 1) + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_s = tl.arange(0, WP)
    o_u = o_t[:, None] + o_s[None, :]  # [BT, WP] the output rows that tap s feeds
    m_u = (o_s < W)[None, :] & (o_u >= 0) & (o_u < T)
    if HAS_DOCS:
        m_u &= tl.load(pos + o_u, mask=m_u, other=0) >= o_s[None, :]
    b_dpre = tl.load(dpre + (i_b * T + o_u)[:, :, None] * D + o_d[None, None, :],
                     mask=m_u[:, :, None] & m_d[None, None, :], other=0.).to(tl.float32)  # [BT, WP, BD]
    b_dx = tl.sum(b_dpre * tap_weights(weight, o_d, D, W, WP)[None, :, :], axis=1)
    tl.store(dx + (i_b * T + o_t)[:, None] * SDX + o_d[None, :], b_dx.to(dx.dtype.element_ty),
             mask=((o_t >= 0) & (o_t < T))[:, None] & m_d[None, :])
    if HAS_PAST:
        tl.store(dpast + (i_b * (W - 1) + o_t + W - 1)[:, None] * D + o_d[None, :], b_dx.to(dpast.dtype.element_ty),
                 mask=(o_t < 0)[:, None] & m_d[None, :])


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


def tiles(W: int, tap_rows: int, channels: int, head_dim: int | None) -> tuple[int, int]:
    """(rows, channels) of a block: `channels` wide, or one head wide when the output is L2-normalised per head,
    with the rows scaled so that the [rows, WP, channels] tile keeps its number of elements."""
    if head_dim is None:
        return tile_rows(W, tap_rows), channels
    return tile_rows(W, tap_rows * channels // head_dim), head_dim


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, past, pos, shared_gradient, head_dim):
        B, T, D = x.shape
        W = weight.shape[-1]
        if x.stride(-1) != 1 or (B > 1 and x.stride(0) != T * x.stride(1)):
            x = x.contiguous()  # rows a constant stride apart (a column slice of a fused projection is kept)
        weight = weight.reshape(D, W).contiguous()
        past = None if past is None else past.contiguous()
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        rows, channels = tiles(W, TAP_ROWS, BD, head_dim)
        short_conv_fwd_kernel[(triton.cdiv(T, rows), triton.cdiv(D, channels), B)](
            x, past, weight, bias, pos, y, T, x.stride(1), L2NORM_EPS, D=D, W=W, WP=triton.next_power_of_2(W),
            BT=rows, BD=channels, HAS_PAST=past is not None, HAS_BIAS=bias is not None, HAS_DOCS=pos is not None,
            L2NORM=head_dim is not None)
        ctx.save_for_backward(x, weight, bias, past, pos)
        ctx.shared_gradient, ctx.head_dim = shared_gradient, head_dim
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, past, pos = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[-1]
        WP = triton.next_power_of_2(W)
        dy = dy.contiguous()
        dpre = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        dx = gradient_like(x, ctx.shared_gradient)
        dpast = None if past is None else torch.empty_like(past)
        flags = dict(HAS_PAST=past is not None, HAS_DOCS=pos is not None)
        BT = tile_rows(W, TAP_ROWS)
        rows, channels = tiles(W, TAP_ROWS_DPRE, BD_DPRE, ctx.head_dim)
        BLOCKS = max(1, strip_rows(B, T, triton.cdiv(D, channels), sm_count(x.device)) // rows)
        NS = triton.cdiv(T, BLOCKS * rows)
        dweight = torch.empty(B * NS, W, D, dtype=torch.float32, device=x.device)
        dbias = None if bias is None else torch.empty(B * NS, D, dtype=torch.float32, device=x.device)
        short_conv_bwd_dpre_kernel[(NS, triton.cdiv(D, channels), B)](
            x, past, weight, bias, pos, dy, dpre, dweight, dbias, T, x.stride(1), NS, L2NORM_EPS, D=D, W=W, WP=WP,
            BT=rows, BD=channels, BLOCKS=BLOCKS, HAS_BIAS=bias is not None, L2NORM=ctx.head_dim is not None,
            **flags)
        short_conv_bwd_dx_kernel[(triton.cdiv(T + W - 1, BT), triton.cdiv(D, BD), B)](  # past's rows too
            weight, pos, dpre, dx, dpast, T, dx.stride(1), D=D, W=W, WP=WP, BT=BT, BD=BD, **flags)
        dweight = dweight.sum(0).t().to(weight.dtype).reshape(D, 1, W)
        return dx, dweight, None if bias is None else dbias.sum(0).to(bias.dtype), dpast, None, None, None


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                      output_final_state: bool = True, shared_gradient: SharedGradient | None = None,
                      l2norm_head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(silu(causal depthwise conv(x)), the last W - 1 inputs): fused_reference.short_conv_silu's contract;
    (y, None) with output_final_state=False. With shared_gradient (x a column slice of its tensor), x's gradient
    is written in x's place in its buffer. With l2norm_head_dim (one of CONV_L2NORM_HEAD_DIMS) y is L2-normalised
    per head.

    Differentiable in x, weight, bias and past. The returned tail is a small torch slice (autograd follows it).
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    pos = None if cu_seqlens is None else document_positions(cu_seqlens, T).to(torch.int32)
    if l2norm_head_dim is not None and l2norm_head_dim not in CONV_L2NORM_HEAD_DIMS:
        raise ValueError(f"the short convolution L2-normalises heads of 16-256 channels (a power of two), not "
                         f"{l2norm_head_dim}: normalise after it")
    y = ShortConvFunction.apply(x, weight, bias, past, pos, shared_gradient, l2norm_head_dim)
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
