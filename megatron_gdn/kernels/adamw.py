"""AdamW's update of every fp32 parameter of a group in one Triton launch (training/optimizer.py, TritonAdamW).

Why: torch's fused AdamW (multi_tensor_apply) took 13.5 ms of a 1.3b step on an H200 (session 15), 44 GB of reads
and writes at 3.3 TB/s: it reads the parameter, gradient and both moments (16 bytes a parameter), writes the
parameter and moments back (12), and, given a grad_scale (the clip divisor the built-in engine hands it), writes
the divided gradient back too (4), which nothing reads. This kernel reads 16 and writes 12 bytes a parameter.

Each program updates BLOCK elements of one parameter. The parameters' addresses come from int64 tables (one per
tensor kind), the program's parameter and first element from a block table built once per parameter list. The
math is torch's fused AdamW's (decoupled weight decay, bias corrections from each parameter's own step count,
found_inf skipping the update, grad_scale dividing the gradient); fp32 throughout. A parameter may have a bf16
compute copy (models/fused_projection.py, compute_weight), which the kernel overwrites with the updated weight, so
that the forward need not cast it again: 2 bytes a parameter written here for 6 read and written there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1024 elements a program of 4 warps, 8 a thread: at the `1.3b` preset's 1.387B parameters on an H200 the kernel
# took 9.92 ms against 11.60 with 2048 (16 a thread; other choices of 16 a thread were as slow, blocks of 256 to
# 1024 with 4 to 8 within 1%), and the training step 284.5 against 287.5 ms in one process (session 28).
BLOCK = 1024


@triton.jit
def to_bf16_rtne(x):
    """fp32 x rounded to the nearest bf16, ties to even, as torch's cast rounds (bit for bit): by integer arithmetic
    on its bits, as the compiled .to(tl.bfloat16) rounds too, because Triton's interpreter truncates there."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # +-inf stay +-inf; a NaN could carry into the sign: kept apart
    return tl.where(x == x, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))


@triton.jit
def update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, c_addr, o, numel, step, grad_scale, lr, beta1, beta2, eps,
                 weight_decay, HAS_GRAD_SCALE: tl.constexpr, HAS_COPIES: tl.constexpr, MASKED: tl.constexpr):
    """AdamW on the elements o of one parameter; MASKED: some of o lie past its numel elements. HAS_COPIES: where
    c_addr is not 0, the updated weight is also stored there in bf16 (its compute copy)."""
    m = (o < numel) if MASKED else None
    other = 0. if MASKED else None
    b_p = tl.load(p_ptr + o, mask=m, other=other)
    b_g = tl.load(g_ptr + o, mask=m, other=other)
    b_m1 = tl.load(m1_ptr + o, mask=m, other=other)
    b_m2 = tl.load(m2_ptr + o, mask=m, other=other)
    if HAS_GRAD_SCALE:
        b_g = tl.div_rn(b_g, tl.load(grad_scale))
    b_p = b_p - lr * weight_decay * b_p
    b_m1 = beta1 * b_m1 + (1. - beta1) * b_g
    b_m2 = beta2 * b_m2 + (1. - beta2) * b_g * b_g
    bias_correction1 = 1. - tl.exp2(step * tl.log2(beta1))
    bias_correction2 = 1. - tl.exp2(step * tl.log2(beta2))
    denom = tl.div_rn(tl.sqrt_rn(b_m2), tl.sqrt_rn(bias_correction2)) + eps
    b_p = b_p - tl.div_rn((lr / bias_correction1) * b_m1, denom)  # IEEE division and roots, as torch
    tl.store(p_ptr + o, b_p, mask=m)
    tl.store(m1_ptr + o, b_m1, mask=m)
    tl.store(m2_ptr + o, b_m2, mask=m)
    if HAS_COPIES:
        if c_addr != 0:
            # Told 8-byte aligned, not the 16 that holds (compute_copy checks): the compiler then stores 4 bf16 a
            # thread (8 bytes), as the fp32 values lie. Told 16 it stored 8 a thread and moved the values there
            # through shared memory, a barrier each 1024 of them: 13.0 against 12.5 ms for the `1.3b` preset's
            # weights on an H200, the same bits (9.8 without copies; session 27).
            c_ptr = tl.multiple_of(c_addr.to(tl.pointer_type(tl.bfloat16)), 8)
            tl.store(c_ptr + o, to_bf16_rtne(b_p), mask=m)


@triton.jit
def adamw_kernel(block_param, block_start, param_addrs, grad_addrs, exp_avg_addrs, exp_avg_sq_addrs, step_addrs,
                 copy_addrs, numels, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_COPIES: tl.constexpr,
                 BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    i_p = tl.load(block_param + i_b)
    start = tl.multiple_of(tl.load(block_start + i_b), BLOCK)
    o = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + i_p)
    if HAS_FOUND_INF:  # a skipped step leaves weights and moments alone (and the step counts: the caller's)
        numel = tl.where(tl.load(found_inf) == 0, numel, 0)
    # The addresses are 16-byte aligned (TritonAdamW takes this kernel only then) and the blocks of a parameter
    # start at multiples of BLOCK: told so, the compiler loads and stores 16 bytes a thread and instruction (it
    # cannot know it of addresses read from memory), where it otherwise moved 4 (2.5 TB/s on an H200, session 16).
    p_ptr = tl.multiple_of(tl.load(param_addrs + i_p).to(tl.pointer_type(tl.float32)), 16)
    g_ptr = tl.multiple_of(tl.load(grad_addrs + i_p).to(tl.pointer_type(tl.float32)), 16)
    m1_ptr = tl.multiple_of(tl.load(exp_avg_addrs + i_p).to(tl.pointer_type(tl.float32)), 16)
    m2_ptr = tl.multiple_of(tl.load(exp_avg_sq_addrs + i_p).to(tl.pointer_type(tl.float32)), 16)
    step = tl.load(tl.load(step_addrs + i_p).to(tl.pointer_type(tl.float32)))
    c_addr = tl.load(copy_addrs + i_p) if HAS_COPIES else 0
    if start + BLOCK <= numel:  # a whole block: unmasked (a mask against a size read from memory splits accesses)
        update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, c_addr, o, numel, step, grad_scale, lr, beta1, beta2, eps,
                     weight_decay, HAS_GRAD_SCALE, HAS_COPIES, False)
    else:
        update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, c_addr, o, numel, step, grad_scale, lr, beta1, beta2, eps,
                     weight_decay, HAS_GRAD_SCALE, HAS_COPIES, True)


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host table on the device, copied from pinned memory without waiting for the device (a copy from pageable
    memory waits for the work queued before it, here the whole backward)."""
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def addresses(tensors: list[torch.Tensor | None], device: torch.device | None = None) -> torch.Tensor:
    """The tensors' addresses (0 for None), an int64 table on their device (or the given one)."""
    device = device or tensors[0].device
    return to_device(torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64), device)


def group_tables(params: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 steps: list[torch.Tensor], copies: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
    """What adamw_step reads besides the gradients: the parameter of each BLOCK-element block and the block's first
    element, the addresses of the parameters, moments, step counts and bf16 compute copies (None: the parameter
    has none; all None: no table), and the parameters' sizes."""
    device = params[0].device
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    counts = (numels + BLOCK - 1) // BLOCK
    block_param = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), counts)
    first_block = torch.cumsum(counts, 0) - counts  # each parameter's first block
    block_start = (torch.arange(len(block_param), dtype=torch.int64) - first_block[block_param.long()]) * BLOCK
    return (to_device(block_param, device), to_device(block_start, device), addresses(params), addresses(exp_avgs),
            addresses(exp_avg_sqs), addresses(steps),
            None if all(c is None for c in copies) else addresses(copies, device), to_device(numels, device))


def adamw_step(tables: tuple[torch.Tensor, ...], grads: torch.Tensor, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None):
    """One update of a group: tables from group_tables, grads the gradients' addresses (addresses). The step counts
    are the caller's to advance."""
    block_param, block_start, params, exp_avgs, exp_avg_sqs, steps, copies, numels = tables
    unused = numels  # a pointer argument the kernel does not read when its flag is off
    adamw_kernel[(len(block_param),)](
        block_param, block_start, params, grads, exp_avgs, exp_avg_sqs, steps,
        copies if copies is not None else unused, numels, grad_scale if grad_scale is not None else unused,
        found_inf if found_inf is not None else unused, lr, beta1, beta2, eps, weight_decay,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, HAS_COPIES=copies is not None,
        BLOCK=BLOCK)
