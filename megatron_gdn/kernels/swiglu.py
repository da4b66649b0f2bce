"""SwiGLU's activation in Triton: y = silu(gate) * up, one elementwise kernel each way.

fp32 inside, y in the inputs' dtype. Saves gate and up (the unfused form also keeps silu(gate)).
Backward: dgate = dy up s (1 + gate (1 - s)) with s = sigmoid(gate), dup = dy gate s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def swiglu_fwd_kernel(gate, up, y, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_g = tl.load(gate + o, mask=m, other=0.).to(tl.float32)  # [BLOCK]
    b_u = tl.load(up + o, mask=m, other=0.).to(tl.float32)
    tl.store(y + o, (b_g * tl.sigmoid(b_g) * b_u).to(y.dtype.element_ty), mask=m)


@triton.jit
def swiglu_bwd_kernel(gate, up, dy, dgate, dup, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_g = tl.load(gate + o, mask=m, other=0.).to(tl.float32)  # [BLOCK]
    b_u = tl.load(up + o, mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + o, mask=m, other=0.).to(tl.float32)
    b_s = tl.sigmoid(b_g)
    tl.store(dgate + o, (b_dy * b_u * b_s * (1. + b_g * (1. - b_s))).to(dgate.dtype.element_ty), mask=m)
    tl.store(dup + o, (b_dy * b_g * b_s).to(dup.dtype.element_ty), mask=m)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        N = gate.numel()
        swiglu_fwd_kernel[(triton.cdiv(N, BLOCK),)](gate, up, y, N, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        N = gate.numel()
        swiglu_bwd_kernel[(triton.cdiv(N, BLOCK),)](gate, up, dy, dgate, dup, N, BLOCK=BLOCK)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype; differentiable in both."""
    return SwiGLUFunction.apply(gate, up)
