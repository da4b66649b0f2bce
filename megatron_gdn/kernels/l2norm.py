"""Row-wise L2 normalisation in Triton: y = x * rsqrt(sum(x^2) + eps), the in-kernel q/k norm.

Forward keeps y in x's dtype and the fp32 rstd; backward is dx = (dy - (dy . y) y) * rstd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import L2NORM_EPS

ROWS_PER_PROGRAM = 16


@triton.jit
def l2norm_fwd_kernel(x, y, rstd, N, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (i_r < N)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + i_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)  # [BR, BD]
    b_rstd = tl.math.rsqrt(tl.sum(b_x * b_x, axis=1) + eps)
    tl.store(y + i_r[:, None] * D + o_d[None, :], (b_x * b_rstd[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + i_r, b_rstd, mask=i_r < N)


@triton.jit
def l2norm_bwd_kernel(y, rstd, dy, dx, N, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (i_r < N)[:, None] & (o_d < D)[None, :]
    b_y = tl.load(y + i_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + i_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_rstd = tl.load(rstd + i_r, mask=i_r < N, other=0.)
    b_dx = (b_dy - tl.sum(b_dy * b_y, axis=1)[:, None] * b_y) * b_rstd[:, None]
    tl.store(dx + i_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)


def l2norm_fwd(x: torch.Tensor, eps: float = L2NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the last dimension of a contiguous x. Returns (y in x's dtype, rstd fp32 [x.numel() // D])."""
    D = x.shape[-1]
    N = x.numel() // D
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    l2norm_fwd_kernel[(triton.cdiv(N, ROWS_PER_PROGRAM),)](x, y, rstd, N, eps, D=D, BR=ROWS_PER_PROGRAM,
                                                           BD=triton.next_power_of_2(D))
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The gradient of x from y = l2norm(x), its rstd and dy (any float dtype), computed in fp32 and returned
    in ``dtype`` (the input's dtype saves the caller a separate cast)."""
    D = y.shape[-1]
    N = y.numel() // D
    dy = dy.contiguous()
    dx = torch.empty(y.shape, dtype=dtype, device=y.device)
    l2norm_bwd_kernel[(triton.cdiv(N, ROWS_PER_PROGRAM),)](y, rstd, dy, dx, N, D=D, BR=ROWS_PER_PROGRAM,
                                                           BD=triton.next_power_of_2(D))
    return dx
