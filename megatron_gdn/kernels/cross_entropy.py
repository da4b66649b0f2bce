"""Linear + cross entropy without the logits of the whole batch ("fused linear cross entropy"), in Triton.

The loss of hidden states [N, h] through this rank's rows of the lm head [V, h] (V = vocab / TP). Tokens are
processed in chunks; per chunk:

    logits = hidden[chunk] @ W^T                     [n, V] in the compute dtype: the only logits that exist
    ce_stats_kernel: per row max m, sum exp(l - m), and the target's logit if this rank owns it
    (TP > 1: all-reduce MAX of m, then SUM of the rescaled sums and of the target logits: Megatron's algorithm,
    as parallel/cross_entropy.py, with the three all-reduces made two)
    loss_row = log sum exp - target logit
    ce_grad_kernel: logits <- (softmax - onehot(target)) * row_scale, in place
    d hidden[chunk] = dlogits @ W,   d W += dlogits^T @ hidden[chunk]   (fp32 out of the product, on CUDA)

With the whole vocabulary on this rank (no all-reduce between the two passes) one kernel, ce_loss_grad_kernel,
makes both passes over each row: the second reads the row its program has just read (likely still in L2), where
two kernels read every chunk's logits from memory twice. With the fp32-accumulating product below, a `small` batch's
lm head and loss (fwd+bwd) went from 10.15 to 9.5-9.6 ms on an H100 (docs/PERFORMANCE.md, session 11).

So the gradients are computed in the forward and backward only multiplies them by the (scalar) grad_output:
this is why the op returns the reduced loss ('sum' or 'mean' over the non-ignored tokens) and not per-token
losses, whose gradient could weight tokens differently. d hidden is this rank's partial gradient (its
vocabulary slice's share); the caller's tensor-parallel region sums it, as for the lm head's input.
The compute dtype is autocast's when it is on (like F.linear under autocast), else that of hidden and W; the
statistics are fp32, and the weight gradient accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.distributed import ProcessGroup

from . import fp32_products_of_bf16
from .triton_utils import exp

# Logit elements per chunk (2^27: 256 MB in bf16; 4194 tokens of a 32000-word vocabulary).
CHUNK_ELEMENTS = 2 ** 27
MAX_BV = 4096


@triton.jit
def row_stats(p_row, i_v, V, BV: tl.constexpr):
    """(max, sum exp(l - max), the logit at i_v or 0 where i_v is outside [0, V)) of the row of V logits at p_row,
    in one online pass."""
    b_m = tl.full([], float("-inf"), tl.float32)
    b_s = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        b_l = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)  # [BV]
        b_m_new = tl.maximum(b_m, tl.max(b_l, axis=0))
        b_s = b_s * exp(b_m - b_m_new) + tl.sum(exp(b_l - b_m_new), axis=0)
        b_m = b_m_new
    b_z = tl.load(p_row + i_v, mask=(i_v >= 0) & (i_v < V), other=0.).to(tl.float32)
    return b_m, b_s, b_z


@triton.jit
def store_row_gradient(p_row, i_v, b_lse, b_c, V, BV: tl.constexpr):
    """Overwrite the row of logits at p_row by (softmax - onehot(i_v)) * b_c."""
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        b_l = tl.load(p_row + o_v, mask=o_v < V, other=0.).to(tl.float32)  # [BV]
        b_g = exp(b_l - b_lse) - (o_v == i_v).to(tl.float32)
        tl.store(p_row + o_v, (b_g * b_c).to(p_row.dtype.element_ty), mask=o_v < V)


@triton.jit
def ce_stats_kernel(logits, target, row_max, sums, V, vocab_start, BV: tl.constexpr):
    """Per row: the max of the logits, sum exp(l - max) and the target's logit (0 if the target is outside this
    rank's vocabulary slice or ignored). sums is [rows, 2]: (sum exp, target logit)."""
    i_r = tl.program_id(0).to(tl.int64)
    b_m, b_s, b_z = row_stats(logits + i_r * V, tl.load(target + i_r) - vocab_start, V, BV)
    tl.store(row_max + i_r, b_m)
    tl.store(sums + i_r * 2, b_s)
    tl.store(sums + i_r * 2 + 1, b_z)


@triton.jit
def ce_grad_kernel(logits, target, lse, row_scale, V, vocab_start, BV: tl.constexpr):
    """Overwrite each row of logits by (softmax - onehot(target)) * row_scale, the loss's gradient."""
    i_r = tl.program_id(0).to(tl.int64)
    store_row_gradient(logits + i_r * V, tl.load(target + i_r) - vocab_start, tl.load(lse + i_r),
                       tl.load(row_scale + i_r), V, BV)


@triton.jit
def ce_loss_grad_kernel(logits, target, loss, row_scale, V, BV: tl.constexpr, GRAD: tl.constexpr):
    """The whole vocabulary on this rank: per row, the loss log sum exp - target logit and (GRAD) the row
    overwritten by its gradient, as ce_stats_kernel and ce_grad_kernel compute them."""
    i_r = tl.program_id(0).to(tl.int64)
    p_row = logits + i_r * V
    i_v = tl.load(target + i_r)
    b_m, b_s, b_z = row_stats(p_row, i_v, V, BV)
    b_lse = b_m + tl.log(b_s)
    tl.store(loss + i_r, b_lse - b_z)
    if GRAD:
        store_row_gradient(p_row, i_v, b_lse, tl.load(row_scale + i_r), V, BV)


def _log_sum_exp_and_target(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group: ProcessGroup,
                            BV: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sum exp over the whole vocabulary, the target's logit), fp32 [n], for a chunk of logits [n, V], this
    rank's slice of the vocabulary: the other slices' statistics come from the group's ranks."""
    n, V = logits.shape
    row_max = torch.empty(n, dtype=torch.float32, device=logits.device)
    sums = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    ce_stats_kernel[(n,)](logits, target, row_max, sums, V, vocab_start, BV=BV)
    local_max = row_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sums[:, 0] *= torch.exp(local_max - row_max)  # each rank's sum, relative to the global max
    dist.all_reduce(sums, group=group)
    return row_max + sums[:, 0].log(), sums[:, 1]


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, group, ignore_index, reduction, chunk_size, dtype,
                grad_enabled):
        N, V = hidden.shape[0], weight.shape[0]
        # needs_input_grad ignores no_grad (evaluation): then no gradient is computed.
        grad_hidden, grad_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        valid = target != ignore_index
        row_scale = valid.float()
        if reduction == "mean":
            row_scale /= valid.sum().clamp(min=1)
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        BV = min(MAX_BV, triton.next_power_of_2(V))
        # d W accumulates in fp32 inside the product where cuBLAS can (bf16 operands, CUDA): a bf16 product and an
        # add wrote, read and added a [V, h] copy per chunk.
        fp32_product = dtype == torch.bfloat16 and fp32_products_of_bf16(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtype is chosen explicitly
            w = weight.to(dtype)
            for c0 in range(0, N, chunk_size):
                c1 = min(N, c0 + chunk_size)
                h = hidden[c0:c1].to(dtype)
                logits = h @ w.t()  # [n, V]
                if group is None:
                    ce_loss_grad_kernel[(c1 - c0,)](logits, target[c0:c1], losses[c0:c1], row_scale[c0:c1], V,
                                                    BV=BV, GRAD=grad_hidden or grad_weight)
                else:
                    lse, target_logit = _log_sum_exp_and_target(logits, target[c0:c1], vocab_start, group, BV)
                    losses[c0:c1] = lse - target_logit
                    if grad_hidden or grad_weight:
                        ce_grad_kernel[(c1 - c0,)](logits, target[c0:c1], lse, row_scale[c0:c1], V, vocab_start,
                                                   BV=BV)
                if grad_hidden and d_hidden.dtype == dtype:  # straight into its rows, no copy
                    torch.mm(logits, w, out=d_hidden[c0:c1])
                elif grad_hidden:
                    d_hidden[c0:c1] = logits @ w
                if grad_weight and fp32_product:
                    torch.addmm(d_weight, logits.t(), h, out_dtype=torch.float32, out=d_weight)
                elif grad_weight:
                    d_weight += logits.t() @ h
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return (losses * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        d_hidden = None if d_hidden is None else d_hidden * grad_loss.to(d_hidden.dtype)
        d_weight = None if d_weight is None else (d_weight * grad_loss).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                group: ProcessGroup | None, ignore_index: int = -100, reduction: str = "mean",
                                chunk_size: int | None = None) -> torch.Tensor:
    """The cross entropy of hidden [N, h] @ weight[V, h]^T against target [N] (global token ids; this rank owns
    ids vocab_start .. vocab_start + V), reduced over tokens ('sum', or 'mean' over the non-ignored ones).

    group: the tensor-parallel group whose ranks hold the other vocabulary slices (None: the whole vocabulary
    is here). chunk_size: tokens per chunk (default: CHUNK_ELEMENTS logits).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, target.contiguous(), vocab_start, group,
                                            ignore_index, reduction, chunk_size, dtype, torch.is_grad_enabled())
