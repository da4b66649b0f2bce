"""Gated RMSNorm in Triton, forward and backward: y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate).

The output norm of the GDN layer, over the last dimension (per head). fp32 inside, y in x's dtype; the
weight gradient is summed per program over its rows, then over programs. The gate may be a column slice of a
fused projection: its rows of H heads are read SG elements apart, where they lie, and with a SharedGradient
dgate is written in the gate's place in its buffer (contiguous otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials
from .shared_gradient import SharedGradient, gradient_like
from .triton_utils import row_loop_programs, sigmoid

ROWS_PER_PROGRAM = 16  # the forward's
# The backward's programs loop over row blocks as fused_norm's do (its BWD_PROGRAMS_PER_SM says why). Kernel +
# sum on an H200 (session 18, gpu-side probe, bf16, the gate a column slice): `1.3b` (16384 tokens x 6 heads of
# 512) 227.9 -> 200.5 us, `small` (32768 x 12 heads of 128) 212.4 -> 192.6; with 1 or 2 stages 2% faster at
# `small` (188.3, 189.3) and 5-10% slower at `1.3b` (220.4, 210.0). Session 29 (docs/PERFORMANCE.md, forward +
# backward + sum): 3 programs a SM instead of 8, `small` 218.3 -> 199.6 us, `1.3b` 217.1 -> 214.1 (2, 4, 6 and 12
# no faster): at `1.3b` the kernel's 157 registers a thread (4 warps) leave room for 3 programs on an SM (ncu), so 8
# a SM ran as 2.67 waves, the last two thirds full.
BWD_PROGRAMS_PER_SM, BWD_STAGES = 3, 3


def bwd_tiles(D: int) -> tuple[int, int, int]:
    """The backward's (rows per program, D rounded up to a power of two, warps): a tile of up to 4096 elements (16
    rows at most), 32 per thread, 2 warps at least. Against 16 rows and 4 warps for every D, on an H200 (session 13,
    the presets' shapes, outputs equal): heads of 128 (`small`, 16 rows, 2 warps) 133 against 166 us, heads of 512
    (`1.3b`, 8 rows, 4 warps) 155 against 180 us; 64 elements per thread or more ran slower, and spilled at 256."""
    BD = triton.next_power_of_2(D)
    rows = max(1, min(16, 4096 // BD))
    return rows, BD, max(2, min(8, rows * BD // 1024))


@triton.jit
def gate_offsets(i_r, o_d, SG, H: tl.constexpr, D: tl.constexpr):
    """[len(i_r), len(o_d)] offsets in the gate of rows i_r (token i_r // H, head i_r % H), tokens SG apart."""
    return ((i_r // H) * SG + (i_r % H) * D)[:, None] + o_d[None, :]


@triton.jit
def gated_rmsnorm_fwd_kernel(x, gate, weight, y, rstd, N, eps, SG, H: tl.constexpr, D: tl.constexpr,
                             BR: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (i_r < N)[:, None] & (o_d < D)[None, :]
    p = i_r[:, None] * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0.).to(tl.float32)  # [BR, BD]
    b_z = tl.load(gate + gate_offsets(i_r, o_d, SG, H, D), mask=m, other=0.).to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)
    b_rstd = 1. / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * (b_z * sigmoid(b_z))
    tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + i_r, b_rstd, mask=i_r < N)


@triton.jit
def gated_rmsnorm_bwd_kernel(x, gate, weight, rstd, dy, dx, dgate, dweight, N, SG, SDG, H: tl.constexpr,
                             D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, STAGES: tl.constexpr):
    """Program i takes the row blocks i, i + P, i + 2P, ... of the P programs (BWD_PROGRAMS_PER_SM) and keeps its
    part of the weight gradient in registers: one row of partial sums per program, not one per block."""
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BD)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for i_b in tl.range(i_p, tl.cdiv(N, BR), tl.num_programs(0), num_stages=STAGES):
        i_r = (i_b * BR + tl.arange(0, BR)).to(tl.int64)  # i_b * BR < N + BR; the offsets below need 64 bits
        m = (i_r < N)[:, None] & (o_d < D)[None, :]
        p = i_r[:, None] * D + o_d[None, :]
        b_x = tl.load(x + p, mask=m, other=0.).to(tl.float32)
        b_z = tl.load(gate + gate_offsets(i_r, o_d, SG, H, D), mask=m, other=0.).to(tl.float32)
        b_dy = tl.load(dy + p, mask=m, other=0.).to(tl.float32)
        b_rstd = tl.load(rstd + i_r, mask=i_r < N, other=0.)
        b_n = b_x * b_rstd[:, None]  # the normalised x
        b_sig = sigmoid(b_z)
        b_dn = b_dy * b_z * b_sig  # d(n * w)
        b_dz = b_dy * b_n * b_w[None, :] * b_sig * (1. + b_z * (1. - b_sig))
        tl.store(dgate + gate_offsets(i_r, o_d, SDG, H, D), b_dz.to(dgate.dtype.element_ty), mask=m)
        b_dw += tl.sum(b_dn * b_n, axis=0)
        b_dn = b_dn * b_w[None, :]
        b_dx = (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None]) * b_rstd[:, None]
        tl.store(dx + p, b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(dweight + i_p * D + o_d, b_dw, mask=o_d < D)


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, shared_gradient):
        shape = x.shape
        D = shape[-1]
        x = x.reshape(-1, D).contiguous()
        # gate as [tokens, H, D] with heads D apart and tokens SG apart (a column slice of a fused projection)
        gate = gate.reshape(-1, shape[-2], D) if gate.dim() > 2 else gate.reshape(-1, 1, D)
        if gate.stride(-1) != 1 or gate.stride(-2) != D:
            gate = gate.contiguous()
        N = x.shape[0]
        y = torch.empty_like(x)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        gated_rmsnorm_fwd_kernel[(triton.cdiv(N, ROWS_PER_PROGRAM),)](
            x, gate, weight, y, rstd, N, eps, gate.stride(0), H=gate.shape[1], D=D, BR=ROWS_PER_PROGRAM,
            BD=triton.next_power_of_2(D))
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.shared_gradient = shared_gradient
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        N, D = x.shape
        shape = dy.shape
        dy = dy.reshape(N, D).contiguous()
        dx = torch.empty_like(x)
        dgate = gradient_like(gate, ctx.shared_gradient)
        rows, BD, warps = bwd_tiles(D)
        grid = row_loop_programs(triton.cdiv(N, rows), x.device, BWD_PROGRAMS_PER_SM)
        dweight = torch.empty(grid, D, dtype=torch.float32, device=x.device)
        gated_rmsnorm_bwd_kernel[(grid,)](x, gate, weight, rstd, dy, dx, dgate, dweight, N, gate.stride(0),
                                          dgate.stride(0), H=gate.shape[1], D=D, BR=rows, BD=BD,
                                          STAGES=BWD_STAGES, num_warps=warps)
        return dx.view(shape), dgate.view(shape), sum_partials(dweight, torch.empty_like(weight)), None, None


def gated_rmsnorm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                         shared_gradient: SharedGradient | None = None) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dimension; differentiable in x, gate and weight. With
    shared_gradient (gate a column slice of its tensor), gate's gradient is written in gate's place in its buffer."""
    return GatedRMSNormFunction.apply(x, gate, weight, eps, shared_gradient)
