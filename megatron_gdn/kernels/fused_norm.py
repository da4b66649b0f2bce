"""RMSNorm with the residual add fused, in Triton: (y, h) = (rmsnorm(x + residual) * weight, x + residual).

The pre-norm block's `h = x + mixed; y = norm(h)` in one pass over memory instead of three. h is rounded to
its dtype (the promotion of x's and the residual's, as `x + residual` would be) before the statistics, so the
norm sees exactly the tensor the PyTorch reference (fused_reference.rms_norm) sees; the statistics and y are
computed in fp32 and y is stored in h's dtype. Without a residual this is the plain RMSNorm of x.
Backward: dh = (w dy - n mean(w dy n)) rstd + (the gradient of the h output), with n = h rstd; dx and
dresidual are dh in their dtypes; the weight gradient is summed per program over its rows, then over programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials
from .triton_utils import row_loop_programs

# Rows per program such that a [rows, D] fp32 tile stays within this many elements (at least one row).
TILE_ELEMENTS = 8192
# The backward's programs loop over row blocks, BWD_PROGRAMS_PER_SM a streaming multiprocessor, their loads
# pipelined BWD_STAGES deep. One program a block wrote a row of weight-gradient partial sums per block (at
# `1.3b`, 33.5 MB, as much as dh itself) for torch's sum to read back. Kernel + sum on an H200
# (session 18, gpu-side probe, bf16, with dh_out): `1.3b` (16384 x 2048) 95.8 -> 77.6 us, `small` (32768 x 768)
# 68.3 -> 63.8; of 1-16 programs a SM and 1-3 stages, (1, 3) was faster at `1.3b` (72.5) but slower at `small`.
# Pipelined, the kernel takes up to 255 registers (benchmarks/kernel_resources.py): no spills up to D = 5632,
# 108 B at 8192.
BWD_PROGRAMS_PER_SM, BWD_STAGES = 2, 2


@triton.jit
def rms_norm_fwd_kernel(x, residual, weight, y, h, rstd, N, eps, D: tl.constexpr, BR: tl.constexpr,
                        BD: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (i_r < N)[:, None] & (o_d < D)[None, :]
    p = i_r[:, None] * D + o_d[None, :]
    b_h = tl.load(x + p, mask=m, other=0.).to(tl.float32)  # [BR, BD]
    if HAS_RESIDUAL:
        b_h += tl.load(residual + p, mask=m, other=0.).to(tl.float32)
        # Round the sum as PyTorch's add would, and normalise that rounded value.
        b_h = b_h.to(h.dtype.element_ty)
        tl.store(h + p, b_h, mask=m)
        b_h = b_h.to(tl.float32)
    b_w = tl.load(weight + o_d, mask=o_d < D, other=0.).to(tl.float32)  # [BD]
    b_rstd = 1. / tl.sqrt(tl.sum(b_h * b_h, axis=1) / D + eps)  # [BR]
    tl.store(y + p, (b_h * b_rstd[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + i_r, b_rstd, mask=i_r < N)


@triton.jit
def rms_norm_bwd_kernel(h, weight, rstd, dy, dh_out, dh, dweight, N, D: tl.constexpr, BR: tl.constexpr,
                        BD: tl.constexpr, HAS_DH_OUT: tl.constexpr, STAGES: tl.constexpr):
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
        b_h = tl.load(h + p, mask=m, other=0.).to(tl.float32)  # [BR, BD]
        b_dy = tl.load(dy + p, mask=m, other=0.).to(tl.float32)
        b_rstd = tl.load(rstd + i_r, mask=i_r < N, other=0.)  # [BR]
        b_n = b_h * b_rstd[:, None]  # the normalised h
        b_dw += tl.sum(b_dy * b_n, axis=0)
        b_dn = b_dy * b_w[None, :]
        b_dh = (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None]) * b_rstd[:, None]
        if HAS_DH_OUT:  # h is also an output (the residual stream): its own gradient adds here
            b_dh += tl.load(dh_out + p, mask=m, other=0.).to(tl.float32)
        tl.store(dh + p, b_dh.to(dh.dtype.element_ty), mask=m)
    tl.store(dweight + i_p * D + o_d, b_dw, mask=o_d < D)


def _rows_per_program(D: int) -> tuple[int, int]:
    BD = triton.next_power_of_2(D)
    return max(1, min(16, TILE_ELEMENTS // BD)), BD


class RMSNormFunction(torch.autograd.Function):
    """Returns y for residual None (without prenorm), else (y, h). With prenorm and no residual h is x itself (a
    view of it), so that the gradient of x's use as the residual stream arrives here as dh_out and is added in
    the backward kernel."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, prenorm):
        shape, D = x.shape, x.shape[-1]
        x = x.reshape(-1, D).contiguous()
        N = x.shape[0]
        if residual is None:
            h = x
        else:
            residual = residual.reshape(N, D).contiguous()
            h = torch.empty(N, D, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        y = torch.empty_like(h)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        BR, BD = _rows_per_program(D)
        rms_norm_fwd_kernel[(triton.cdiv(N, BR),)](x, residual, weight, y, h, rstd, N, eps, D=D, BR=BR, BD=BD,
                                                    HAS_RESIDUAL=residual is not None)
        ctx.save_for_backward(h, weight, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        if residual is None and not prenorm:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        N, D = h.shape
        shape = dy.shape
        dy = dy.reshape(N, D).contiguous()
        if dh_out is not None:
            dh_out = dh_out.reshape(N, D).contiguous()
        dh = torch.empty_like(h)
        BR, BD = _rows_per_program(D)
        grid = row_loop_programs(triton.cdiv(N, BR), h.device, BWD_PROGRAMS_PER_SM)
        dweight = torch.empty(grid, D, dtype=torch.float32, device=h.device)
        rms_norm_bwd_kernel[(grid,)](h, weight, rstd, dy, dh_out, dh, dweight, N, D=D, BR=BR, BD=BD,
                                     HAS_DH_OUT=dh_out is not None, STAGES=BWD_STAGES)
        x_dtype, residual_dtype = ctx.dtypes
        dresidual = None if residual_dtype is None else dh.to(residual_dtype).view(shape)
        return dh.to(x_dtype).view(shape), dresidual, sum_partials(dweight, torch.empty_like(weight)), None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    prenorm: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(x (+ residual)) * weight; returns y, or (y, x + residual) (with prenorm and no residual: (y, x)).
    Differentiable in every tensor."""
    return RMSNormFunction.apply(x, residual, weight, eps, prenorm)
