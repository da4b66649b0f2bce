"""The GDN layer's short convolution in Triton: depthwise causal convolution over time, then SiLU.

    y[t] = silu(bias + sum_{s < W} weight[:, W-1-s] * x[t - s])       x[t < 0] comes from `past`

The semantics are fused_reference.short_conv_silu's (the ShortConvolution module's): `past` holds the W - 1
inputs before x (zeros when absent); with packed documents a tap s is cut at token t when t is fewer than s
tokens into its document (document_positions, which lets the first document start inside `past`). fp32
inside, y in x's dtype.

Each program walks a strip of rows, last row first, over a block of channels, and holds the W input rows that
the row at hand reads as a window of registers: each step loads one input row, the one W - 1 rows back, and
drops the newest. So every input row is loaded once (and W - 1 more per strip, the window's first fill), and
one row's products are W multiply-adds per channel. x may be a column slice of a wider tensor (the fused
projection's output): its rows are read SX elements apart where they lie, and with a SharedGradient its
gradient is written in its place there.
- short_conv_fwd_kernel: y[t], from the window.
- short_conv_bwd_kernel, the whole backward in one pass: row t recomputes the pre-activation a from its window
  and dpre[t] = dy[t] silu'(a); its own rows add dpre[t] x[t - s] to the weight gradient's partial sums (one
  [W, channels] per strip, torch adds the strips) and dpre[t] to the bias's; and a second window, of the dpre
  rows t..t+W-1, gives dx[t] = sum_s weight[:, W-1-s] dpre[t + s]. dpre never leaves registers: per token and
  channel the backward reads x and dy and writes dx (6 bytes in bf16). The strip's last W - 1 dpre rows of the
  window belong to the next strip and are recomputed; the first strip goes on to row -(W - 1) to write the
  gradient of `past`.
The loops are unrolled 4 times and software-pipelined (tl.range's loop_unroll_factor and num_stages): a step
waits for its row's loads, and only so are the next rows' loads in flight while it computes. On an H200 (session 17,
torch.profiler, x a column slice of the fused projection) a `1.3b` v convolution (4 x 4096 tokens, 3072
channels) took 63.6 us forward and 129.2 us backward, against 74.8 and 181.6 (dpre 124.0 + dx 57.6) for the
kernels before, which loaded the W shifted row blocks of a [rows, W, channels] tile (the overlapping rows cache
hits) and stored dpre for a second backward kernel (10 bytes a token and channel); `small`'s q with its norm
(8 x 4096, heads of 64) 38.1 + 84.3 against 42.7 + 101.7. Not unrolled, the same walk was slower than those
(1.3b v: 109 / 152 us). Session 23 (same card and method): with the fast sigmoid, inputs converted to fp32 once
as they enter the window, and 8 channels a thread, 1.3b v 56.9 forward and 100.2 backward, 1.3b q (heads of 256)
32.9 + 79.4 against 38.7 + 113.1 (details in docs/PERFORMANCE.md). Decoding one token has its own kernel
(short_conv_silu_step), which also shifts the cached inputs.

The GDN layer's q and k are L2-normalised per head after the convolution (l2norm_head_dim). The kernels do it
themselves with blocks of whole heads (an [R, head dim] tile, R heads): the forward normalises the fp32 silu
output before its one rounding, and the backward recomputes it to take dy back through the norm. That saves the
delta rule's separate L2 norm, a pass over q and k each way (2.1 ms of a `small` step on an H100, session 10).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import CONV_L2NORM_HEAD_DIMS
from .fused_reference import document_positions
from .reference import L2NORM_EPS
from .partial_sums import sum_partials
from .shared_gradient import SharedGradient, gradient_like
from .triton_utils import sigmoid, sm_count


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a kernel's programs are cut: channels_per_thread x 32 x warps channels each, strips of rows for whole
    waves of programs_per_sm programs on every SM (strip_rows), and the walk's loop unrolled `unroll` times and
    software-pipelined in `stages` stages (tl.range)."""

    channels_per_thread: int
    warps: int
    unroll: int
    programs_per_sm: int
    stages: int = 3


# The fastest of sweeps on an H200 (session 17: 4 or 8 channels a thread, 1 / 2 / 4 warps, unrolled 1 / 2 / 4
# times, 3 stages, at the two presets' q, k and v; session 23, gpu/probe23_conv.py, after the fast sigmoid and the
# fp32 windows cut the backward's instructions from 47 to 39 an element: 1 to 16 channels a thread). The walks are
# bound by issuing instructions and by latency (one warp a program), so 8 channels a thread pay in the backward too:
# its per-row work (addresses, row conditions) spreads over twice the channels, 32 instructions an element. The
# unrolling pays only with the stages: unrolled without them, the walks took as long as not unrolled (1.3b v:
# 108.9 / 181.1 us).
# programs_per_sm is a wave: the backward's 228-239 registers a thread leave room for 8 one-warp programs on an SM
# (ncu, Triton 3.6, session 29), the forward's 96 for 20; forward waves of 12 ran v fastest (56.0 us at 1.3b; 61.1
# at 16, 61.9 at 20) and q within 1.4 us of waves of 16. Before, strips were halved down to 64 rows until the grid
# had 16 backward programs per SM: the 1.3b q backward (4 x 4096 rows, 6 blocks) got 1536 programs for 1056
# places, 1.45 waves, and took 84 us where one wave of 94-row strips takes 58.
# Forward and backward, kernel times summed by torch.profiler (docs/PERFORMANCE.md, session 29): 1.3b q 117.2 ->
# 91.8 us, v 162.3 -> 141.1; small q 109.4 -> 92.5, v 162.2 -> 145.4.
FORWARD, BACKWARD = Launch(8, 1, 4, 12), Launch(8, 1, 4, 8)
STRIP_WAVES, MIN_STRIP_ROWS = 8, 32
STEP_CHANNELS = 128  # decoding: channels per program


def strip_rows(B: int, T: int, channel_blocks: int, sms: int, programs_per_sm: int, overlap: int) -> int:
    """Rows of a program's strip. Every program walks its strip one row at a time, so the walks take about
    waves x (rows + overlap) row steps: a wave is programs_per_sm programs on every SM, and overlap the rows a strip
    reads besides its own (the window's fill: W - 1 forward, 2 W - 2 backward). Of the strip counts that fill 1 to
    STRIP_WAVES waves, the one with the fewest steps; strips of MIN_STRIP_ROWS rows at least (fewer when T is)."""
    programs = B * channel_blocks  # per strip of each sequence
    slots = programs_per_sm * sms
    best = None
    for waves in range(1, STRIP_WAVES + 1):
        rows = max(1, triton.cdiv(T, max(1, min(waves * slots // programs, T // MIN_STRIP_ROWS))))
        steps = triton.cdiv(programs * triton.cdiv(T, rows), slots) * (rows + overlap)
        if best is None or steps < best[0]:
            best = (steps, rows)
    return best[1]


def channel_block(D: int, head_dim: int | None, launch: Launch) -> tuple[int, int]:
    """(R, C): a program's channels as an [R, C] tile, R heads of C channels when the output is L2-normalised per
    head (whole heads: the norm sums over C; one head where a head is wider than the launch's width), else one row
    of C."""
    width = launch.channels_per_thread * 32 * launch.warps
    if head_dim is not None:
        return max(1, width // head_dim), head_dim
    return 1, min(width, triton.next_power_of_2(D))


@triton.jit
def channel_tile(i_d, D: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """[R, C] channel indices of block i_d, and which are < D."""
    o_d = (i_d * R + tl.arange(0, R))[:, None] * C + tl.arange(0, C)[None, :]
    return o_d, o_d < D


@triton.jit
def weight_columns(weight, o_d, m_d, W: tl.constexpr):
    """(weight[:, 0], ..., weight[:, W - 1]) as fp32 tiles: column c multiplies x[t - (W - 1 - c)]."""
    ws = ()
    for c in tl.static_range(W):
        ws = ws + (tl.load(weight + o_d * W + c, mask=m_d, other=0.).to(tl.float32),)
    return ws


@triton.jit
def zero_window(R: tl.constexpr, C: tl.constexpr, W: tl.constexpr):
    """A window of W zero fp32 [R, C] tiles (the rows before a walk's first load)."""
    zs = ()
    for c in tl.static_range(W):
        zs = zs + (tl.zeros([R, C], tl.float32),)
    return zs


@triton.jit
def where_row(m_d, cond):
    """The channel mask m_d where the row condition cond holds, else all False: m_d & cond, which Triton's
    interpreter (3.9) turns into int32 for a scalar cond, and then refuses as a mask."""
    return tl.where(cond, m_d, False)


@triton.jit
def load_row(x, past, i_b, r, o_d, m_d, T, SX, D: tl.constexpr, W: tl.constexpr, HAS_PAST: tl.constexpr):
    """Input row r of sequence i_b in fp32 (converted once as it enters a window, not at each of its W uses
    there): x's (rows SX elements apart) for 0 <= r < T, past's for -(W - 1) <= r < 0 (zeros without past), zeros
    elsewhere."""
    b_x = tl.load(x + (i_b * T + r) * SX + o_d, mask=where_row(m_d, (r >= 0) & (r < T)), other=0.).to(tl.float32)
    if HAS_PAST:  # one of the two is zero: the sum is exact
        b_x += tl.load(past + (i_b * (W - 1) + r + W - 1) * D + o_d, mask=where_row(m_d, (r < 0) & (r >= 1 - W)),
                       other=0.).to(tl.float32)
    return b_x


@triton.jit
def preactivation(xs, ws, b_bias, p, W: tl.constexpr, HAS_DOCS: tl.constexpr):
    """bias + sum_c weight[:, c] x[t - (W - 1 - c)] from the window xs of row t; with documents, tap s = W - 1 - c
    only where row t is at least s tokens into its document (p: its position there)."""
    b_a = b_bias
    for c in tl.static_range(W):
        if HAS_DOCS:
            b_a += tl.where(p >= W - 1 - c, ws[c] * xs[c], 0.)
        else:
            b_a += ws[c] * xs[c]
    return b_a


@triton.jit
def row_position(pos, t, T, HAS_DOCS: tl.constexpr):
    """Row t's position in its document (0 outside [0, T), and without documents: then unread)."""
    p = 0
    if HAS_DOCS:
        p = tl.load(pos + t, mask=(t >= 0) & (t < T), other=0)
    return p


@triton.jit
def head_rstd(b_y, eps):
    """[R] rsqrt(sum(y^2) + eps) over each row of an [R, head dim] tile: kernels/l2norm.py's rule."""
    return tl.math.rsqrt(tl.sum(b_y * b_y, axis=1) + eps)


@triton.jit
def program_strip(weight, bias, T, S, D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """This program's strip i_s of sequence i_b, its channels (o_d, m_d: channel_tile) with their weight columns
    and bias, and the strip's rows lo..hi-1."""
    i_s, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_d, m_d = channel_tile(i_d, D, R, C)
    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)
    else:
        b_bias = tl.zeros([R, C], tl.float32)
    lo = i_s * S
    return i_s, i_b, o_d, m_d, weight_columns(weight, o_d, m_d, W), b_bias, lo, tl.minimum(lo + S, T)


@triton.jit
def short_conv_fwd_kernel(x, past, weight, bias, pos, y, T, SX, S, eps, D: tl.constexpr, W: tl.constexpr,
                          R: tl.constexpr, C: tl.constexpr, HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_DOCS: tl.constexpr, L2NORM: tl.constexpr, UNROLL: tl.constexpr,
                          STAGES: tl.constexpr):
    """Rows lo..hi-1 of a strip of S, last first (the first W - 1 steps only fill the window). L2NORM: each row
    of the [R, C] tile is one head, L2-normalised."""
    i_s, i_b, o_d, m_d, ws, b_bias, lo, hi = program_strip(weight, bias, T, S, D, W, R, C, HAS_BIAS)
    xs = zero_window(R, C, W)  # xs[c]: x[t - (W - 1 - c)]
    for i in tl.range(hi + W - 1 - lo, num_stages=STAGES, loop_unroll_factor=UNROLL):
        t = hi + W - 2 - i
        xs = (load_row(x, past, i_b, t - (W - 1), o_d, m_d, T, SX, D, W, HAS_PAST),) + xs[:W - 1]
        b_a = preactivation(xs, ws, b_bias, row_position(pos, t, T, HAS_DOCS), W, HAS_DOCS)
        b_y = b_a * sigmoid(b_a)
        if L2NORM:
            b_y = b_y * head_rstd(b_y, eps)[:, None]
        tl.store(y + (i_b * T + t) * D + o_d, b_y.to(y.dtype.element_ty), mask=where_row(m_d, t < hi))


@triton.jit
def short_conv_bwd_kernel(x, past, weight, bias, pos, dy, dx, dpast, dweight, dbias, T, SX, SDX, S, NS, eps,
                          D: tl.constexpr, W: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                          HAS_PAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
                          L2NORM: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr):
    """The backward of rows lo..hi-1 of a strip of S, last first (the module docstring). L2NORM: dy is the
    gradient of the normalised output n = silu(a) rstd and goes back through the norm first,
    d silu(a) = (dy - n (dy . n)) rstd, computed as rstd dy - rstd^3 (dy . y) y with y = silu(a) (fewer
    operations, and the two sums over the head side by side). The walk starts at row hi + 2 W - 3: the window's
    dpre rows hi..hi+W-2 (the next strip's) need x rows up to hi + W - 2, loaded W - 1 steps before their own."""
    i_s, i_b, o_d, m_d, ws, b_bias, lo, hi = program_strip(weight, bias, T, S, D, W, R, C, HAS_BIAS)
    first = hi + 2 * W - 3
    last = lo
    if HAS_PAST:
        last = tl.where(i_s == 0, 1 - W, lo)
    xs = zero_window(R, C, W)   # xs[c]: x[t - (W - 1 - c)]
    es = zero_window(R, C, W)   # es[c]: dpre[t + W - 1 - c]
    dws = zero_window(R, C, W)  # dws[c]: the strip's sum for weight[:, c]'s gradient
    b_db = tl.zeros([R, C], tl.float32)
    ps = ()                     # ps[c]: the document position of row t + W - 1 - c
    if HAS_DOCS:
        for c in tl.static_range(W):
            ps = ps + (tl.full([], 0, tl.int32),)
    for i in tl.range(first - last + 1, num_stages=STAGES, loop_unroll_factor=UNROLL):
        t = first - i
        xs = (load_row(x, past, i_b, t - (W - 1), o_d, m_d, T, SX, D, W, HAS_PAST),) + xs[:W - 1]
        p = row_position(pos, t, T, HAS_DOCS)
        b_a = preactivation(xs, ws, b_bias, p, W, HAS_DOCS)
        b_dy = tl.load(dy + (i_b * T + t) * D + o_d, mask=where_row(m_d, (t >= 0) & (t < T)),
                       other=0.).to(tl.float32)
        b_s = sigmoid(b_a)
        if L2NORM:
            b_y = b_a * b_s
            b_rstd = head_rstd(b_y, eps)
            b_dot = tl.sum(b_dy * b_y, axis=1)  # beside rstd's sum: the two reductions overlap
            b_dy = b_dy * b_rstd[:, None] - (b_rstd * b_rstd * b_rstd * b_dot)[:, None] * b_y
        b_dpre = b_dy * b_s * (1. + b_a * (1. - b_s))  # silu'(a); zero outside [0, T)
        b_own = tl.where((t >= lo) & (t < hi), b_dpre, 0.)
        new_dws = ()
        for c in tl.static_range(W):
            if HAS_DOCS:
                new_dws = new_dws + (dws[c] + tl.where(p >= W - 1 - c, b_own * xs[c], 0.),)
            else:
                new_dws = new_dws + (dws[c] + b_own * xs[c],)
        dws = new_dws
        b_db += b_own
        es = es[1:] + (b_dpre,)
        b_dx = tl.zeros([R, C], tl.float32)
        if HAS_DOCS:
            ps = ps[1:] + (p,)
            for c in tl.static_range(W):  # tap s = W - 1 - c of output row t + s
                b_dx += tl.where(ps[c] >= W - 1 - c, ws[c] * es[c], 0.)
        else:
            for c in tl.static_range(W):
                b_dx += ws[c] * es[c]
        tl.store(dx + (i_b * T + t) * SDX + o_d, b_dx.to(dx.dtype.element_ty),
                 mask=where_row(m_d, (t >= 0) & (t < hi)))
        if HAS_PAST:
            tl.store(dpast + (i_b * (W - 1) + t + W - 1) * D + o_d, b_dx.to(dpast.dtype.element_ty),
                     mask=where_row(m_d, t < 0))
    i_p = i_b * NS + i_s
    for c in tl.static_range(W):
        tl.store(dweight + (i_p * W + c) * D + o_d, dws[c], mask=m_d)
    if HAS_BIAS:
        tl.store(dbias + i_p * D + o_d, b_db, mask=m_d)


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
    tl.store(y + i_b * D + o_d, (b_acc * sigmoid(b_acc)).to(y.dtype.element_ty), mask=m_d)


def grid_of(B: int, T: int, D: int, head_dim: int | None, launch: Launch, overlap: int,
            device: torch.device) -> tuple[int, ...]:
    """(R, C, strip rows S, strips NS, channel blocks) of a launch whose strips read overlap rows more."""
    R, C = channel_block(D, head_dim, launch)
    blocks = triton.cdiv(D, R * C)
    S = strip_rows(B, T, blocks, sm_count(device), launch.programs_per_sm, overlap)
    return R, C, S, max(1, triton.cdiv(T, S)), blocks  # T = 0: one strip still writes past's gradient (zeros)


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
        R, C, S, NS, blocks = grid_of(B, T, D, head_dim, FORWARD, W - 1, x.device)
        short_conv_fwd_kernel[(NS, blocks, B)](
            x, past, weight, bias, pos, y, T, x.stride(1), S, L2NORM_EPS, D=D, W=W, R=R, C=C,
            HAS_PAST=past is not None, HAS_BIAS=bias is not None, HAS_DOCS=pos is not None,
            L2NORM=head_dim is not None, UNROLL=FORWARD.unroll, STAGES=FORWARD.stages,
            num_warps=FORWARD.warps)
        ctx.save_for_backward(x, weight, bias, past, pos)
        ctx.shared_gradient, ctx.head_dim = shared_gradient, head_dim
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, past, pos = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[-1]
        dy = dy.contiguous()
        dx = gradient_like(x, ctx.shared_gradient)
        dpast = None if past is None else torch.empty_like(past)
        R, C, S, NS, blocks = grid_of(B, T, D, ctx.head_dim, BACKWARD, 2 * (W - 1), x.device)
        dweight = torch.empty(B * NS, W, D, dtype=torch.float32, device=x.device)
        dbias = None if bias is None else torch.empty(B * NS, D, dtype=torch.float32, device=x.device)
        short_conv_bwd_kernel[(NS, blocks, B)](
            x, past, weight, bias, pos, dy, dx, dpast, dweight, dbias, T, x.stride(1), dx.stride(1), S, NS,
            L2NORM_EPS, D=D, W=W, R=R, C=C, HAS_PAST=past is not None, HAS_BIAS=bias is not None,
            HAS_DOCS=pos is not None, L2NORM=ctx.head_dim is not None, UNROLL=BACKWARD.unroll,
            STAGES=BACKWARD.stages, num_warps=BACKWARD.warps)
        dweight_sum = torch.empty(D, 1, W, dtype=weight.dtype, device=x.device)
        sum_partials(dweight, dweight_sum.view(D, W).t())  # the partials are [W, D] per strip
        dbias = None if bias is None else sum_partials(dbias, torch.empty_like(bias))
        return dx, dweight_sum, dbias, dpast, None, None, None


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
    short_conv_step_kernel[(triton.cdiv(D, STEP_CHANNELS), B)](
        x, conv_state, weight, bias, y, new_state, D=D, W=W, BD=STEP_CHANNELS, HAS_BIAS=bias is not None)
    return y, new_state
