"""The sum over programs of per-program partial sums (the weight gradients of the norms and the short convolution,
the gate's dA_log and ddt_bias), in Triton.

Each backward kernel that produces a parameter's gradient keeps one partial sum per program ([P, ...] fp32) and
the sum over P finishes it. torch's sum did that with a memset of its output (or of its reduction semaphores) and a
reduce kernel, 5.1-5.4 us a call in a CUDA graph, and a `small` step runs 97 of these sums, a `1.3b` step 127.
This kernel writes every output element once, in the gradient's dtype and layout (no memset, and no cast or
transposing copy after it), 2.0-2.5 us a call (BLOCK_ROWS below).
Its order of summation is fixed (tiles of rows, then across the tile), so results repeat run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A program sums BLOCK_COLS columns over all rows, BLOCK_ROWS rows a step, WARPS warps, the loads of STAGES steps in
# flight. One step covers the partials of every call in the presets (264 rows for the norms: 2 programs a SM; 256 for
# the short convolution; 512 chunks for the gate). 200 calls in a CUDA graph on an H200 (session 22,
# gpu/probe22_sums.py), us a call, torch's sum(0) against (512, 16, 8, 1): [264, 768] 5.13 / 2.04, [264, 128]
# 5.19 / 1.95, [256, 3072] 5.22 / 2.46, [512, 24] 2.88 / 2.03, [264, 2048] 5.38 / 2.23; (256, 32, 8, 2) took 22.7
# at [512, 24], (32, 128, 4, 1) about 10 everywhere (a chain of dependent loads in one program).
BLOCK_ROWS, BLOCK_COLS, WARPS, STAGES = 512, 16, 8, 1


@triton.jit
def sum_partials_kernel(x, out, P, M, C, stride_r, stride_c, BP: tl.constexpr, BM: tl.constexpr,
                        STAGES: tl.constexpr):
    """out[m // C, m % C] (at strides stride_r, stride_c) = sum_p x[p, m], for x a contiguous [P, M]."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = o_m < M
    b_s = tl.zeros([BM], dtype=tl.float32)
    for p0 in tl.range(0, P, BP, num_stages=STAGES):
        o_p = p0 + tl.arange(0, BP)
        b_x = tl.load(x + o_p[:, None].to(tl.int64) * M + o_m[None, :], mask=(o_p < P)[:, None] & m_m[None, :],
                      other=0.)
        b_s += tl.sum(b_x.to(tl.float32), axis=0)
    tl.store(out + (o_m // C) * stride_r + (o_m % C) * stride_c, b_s.to(out.dtype.element_ty), mask=m_m)


def sum_partials(partials: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = partials.sum(0), written into out (any strides, 1 or 2 dimensions; its dtype, rounded once) and
    returned. partials: contiguous [P, *out.shape]."""
    if partials.shape[1:] != out.shape or out.dim() not in (1, 2) or not partials.is_contiguous():
        raise ValueError(f"sum_partials takes contiguous [P, *out.shape] partials and a 1- or 2-d out; got "
                         f"{tuple(partials.shape)} and {tuple(out.shape)}")
    M = out.numel()
    C = out.shape[-1]
    stride_r, stride_c = (out.stride(0), out.stride(1)) if out.dim() == 2 else (0, out.stride(0))
    sum_partials_kernel[(triton.cdiv(M, BLOCK_COLS),)](partials, out, partials.shape[0], M, max(C, 1), stride_r,
                                                       stride_c, BP=BLOCK_ROWS, BM=BLOCK_COLS, STAGES=STAGES,
                                                       num_warps=WARPS)
    return out
