"""SwiGLU's activation in Triton: y = silu(gate) * up with x = [..., gate | up], one elementwise kernel each way.

x is the MLP's fused gate and up projection ([..., 2 I], models/fused_projection.py), read where it lies; the
gradient comes back as one [..., 2 I] tensor, which is what the fused projection's backward multiplies (two
halves would need a copy to join them). fp32 inside, y in x's dtype; saves x (the unfused form also keeps
silu(gate)). Backward: dgate = dy up s (1 + gate (1 - s)) with s = sigmoid(gate), dup = dy gate s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import sigmoid

BLOCK = 1024


@triton.jit
def swiglu_fwd_kernel(x, y, N, I: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # y's elements, [N rows, I]
    m = o < N
    p = o + (o // I) * I  # gate's place in x's rows of 2 I; up is I further
    b_g = tl.load(x + p, mask=m, other=0.).to(tl.float32)  # [BLOCK]
    b_u = tl.load(x + p + I, mask=m, other=0.).to(tl.float32)
    tl.store(y + o, (b_g * sigmoid(b_g) * b_u).to(y.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd_kernel(x, dy, dx, N, I: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    p = o + (o // I) * I
    b_g = tl.load(x + p, mask=m, other=0.).to(tl.float32)  # [BLOCK]
    b_u = tl.load(x + p + I, mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0.).to(tl.float32)
    b_s = sigmoid(b_g)
    tl.store(dx + p, (b_dy * b_u * b_s * (1. + b_g * (1. - b_s))).to(dx.dtype.element_ty), mask=m)
    tl.store(dx + p + I, (b_dy * b_g * b_s).to(dx.dtype.element_ty), mask=m)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        I = x.shape[-1] // 2
        y = x.new_empty(*x.shape[:-1], I)
        N = y.numel()
        swiglu_fwd_kernel[(triton.cdiv(N, BLOCK),)](x, y, N, I=I, BLOCK=BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        N = dy.numel()
        swiglu_bwd_kernel[(triton.cdiv(N, BLOCK),)](x, dy, dx, N, I=x.shape[-1] // 2, BLOCK=BLOCK)
        return dx


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2 I]; differentiable in x."""
    return SwiGLUFunction.apply(x)
