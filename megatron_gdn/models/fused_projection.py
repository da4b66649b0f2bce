"""Several bias-free projections of one input as one matrix product.

The GDN mixer projects its input six times (q, k, v, the decay and beta inputs a and b, the gate g) and the MLP
twice (gate, up). As separate linears, the forward reads the input once per projection, the two 1-wide-per-head
projections a and b run as thin, slow products, and backward adds one input gradient per projection to a
[tokens, hidden] buffer. Here the weights are concatenated (a copy of a few MB, cast to the product's dtype on the
way: FusedLinearFunction) and multiplied once: the input is read once each way and its gradient is one product,
so a mixer runs 3 products where it ran 18 (6 of them thin).
On an H100 a `small` step's products went from 41.7 to 36.8 ms (docs/PERFORMANCE.md, session 9). An earlier
version kept the products apart and summed the input gradients inside them with addmm.

The parameters, their names and their gradients are those of the separate layers, so state dicts,
tensor-parallel sharding and optimizers see no difference; what does change is that the layers' own forward (and
any hook on it) does not run.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import SharedGradient, fp32_products_of_bf16

# Elements: 64 bf16 are 128 bytes. A GDN mixer's a and b are one column per head, which leaves the sum of its
# widths (q, k, v, g, a, b) odd in general: unpadded, the Triton kernels' loads of strided rows ran 1.8x slower.
ROW_ALIGNMENT = 64


def _plain_projection(layer: nn.Module) -> bool:
    """Whether layer(x) is F.linear(x, layer.weight): a bias-free nn.Linear, or a column-parallel layer that
    neither brings its input into the tensor-parallel region nor gathers its output (parallel/layers.py)."""
    if isinstance(layer, nn.Linear):
        return layer.bias is None
    return getattr(layer, "communicate_input", True) is False and getattr(layer, "gather_output", True) is False


def _fusable(layers: tuple[nn.Module, ...]) -> bool:
    """Plain projections whose weights are all here: not under ZeRO-3, whose hooks gather a partitioned weight
    (marked ds_id) only for its own module's forward."""
    return all(_plain_projection(layer) and not hasattr(layer.weight, "ds_id") for layer in layers)


def fused_projection(x: torch.Tensor, *layers: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """torch.cat([layer(x) for layer in layers], -1) (plus residual), computed as one matrix product where the
    layers allow it (bias-free, not ZeRO-3 partitioned; otherwise it is exactly that cat, or layer(x) for one
    layer, and the residual added to it). Under autocast the product runs in its dtype, as each F.linear would.
    One layer is the model's plain linear (an MLP's down projection, a mixer's output projection): its weight
    gradient then comes out of the product in the weight's dtype too (FusedLinearFunction). A residual of the
    product's dtype is added by the product itself (the block's last residual add: cuBLAS adds it in fp32 before
    the one rounding, where a separate add read and wrote the hidden-sized stream once more)."""
    if not _fusable(layers):
        out = layers[0](x) if len(layers) == 1 else torch.cat([layer(x) for layer in layers], -1)
        return out if residual is None else residual + out
    return fused_linear(x, [layer.weight for layer in layers], pad=0, residual=residual)


class FusedLinearFunction(torch.autograd.Function):
    """x @ W^T with W = torch.cat(weights) cast to dtype and `pad` zero rows after it.

    Forward writes W in one pass (compute_weight, which may hand out the copy the optimizer keeps current instead):
    under autocast the fp32 weights are read once and the bf16 W written once (a cat
    in fp32 and then autocast's cast wrote and read an fp32 copy besides: 8 more bytes per weight; a profiled 1.3b
    step's copies went from 7.7 to 5.9 ms on an H100). The values are those of autocast's cast (both round to
    nearest) and of F.linear in that dtype. Backward computes the weights' gradient in their own dtype where the
    product can write it (fp32 from bf16 operands: cuBLAS accumulates in fp32 either way, and F.linear's path
    wrote it in bf16 and cast it, a 4.3 ms pass over every weight gradient of a 1.3b step), and splits it. Weights
    marked for gradient accumulation fusion (accumulation_buffer) get it in their .grad from the product itself,
    and autograd gets None for them: torch.autograd.grad cannot ask for those weights' gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor | None, dtype: torch.dtype, pad: int,
                *weights: torch.Tensor) -> torch.Tensor:
        ctx.sizes, ctx.dtype = [w.shape[0] for w in weights], weights[0].dtype  # one model, one dtype
        ctx.weights = weights  # the parameters themselves, for gradient accumulation fusion
        rows = sum(ctx.sizes)
        w = compute_weight(weights, dtype, pad)
        x_in = x.to(dtype)  # as autocast casts F.linear's input
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x_in, w)
        if residual is None:
            return F.linear(x_in, w)
        out = torch.addmm(residual.reshape(-1, rows + pad), x_in.reshape(-1, x_in.shape[-1]), w.t())
        return out.view(residual.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_in, w = ctx.saved_tensors
        rows = sum(ctx.sizes)
        dx = (dy @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = [None] * len(ctx.sizes)
        if any(ctx.needs_input_grad[4:]):
            # Over the padded width (aligned rows), the pad's rows dropped after: for the fp32 product of a 1.3b
            # mixer's 9228 unpadded rows cuBLAS picks an sm80 kernel, 1.25 ms against 0.81 over the 9280 padded
            # rows (H100, session 11; 12 ms of a step).
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x_in.reshape(-1, x_in.shape[-1])
            in_weight_dtype = x2.dtype == ctx.dtype or (
                ctx.dtype == torch.float32 and x2.dtype == torch.bfloat16 and fp32_products_of_bf16(x2.device))
            out_dtype = {"out_dtype": ctx.dtype} if x2.dtype != ctx.dtype else {}
            found = accumulation_buffer(ctx.weights, dy2.shape[1]) if in_weight_dtype else None
            if found is not None:  # into the weights' .grad, inside the product; None for AccumulateGrad
                buffer, fresh = found
                torch.addmm(buffer, dy2.t(), x2, beta=0 if fresh else 1, out=buffer, **out_dtype)
            else:
                dw_all = torch.mm(dy2.t(), x2, **out_dtype) if in_weight_dtype else (dy2.t() @ x2).to(ctx.dtype)
                dw = dw_all[:rows].split(ctx.sizes)
        return (dx, dy if ctx.needs_input_grad[1] else None, None, None, *dw)


# Set by the training engine on parameters whose optimizer keeps their compute-dtype copy current (TritonAdamW's
# kernel writes the updated weight in bf16 into the copy as it writes the fp32 weight; training/optimizer.py).
CAST_BY_OPTIMIZER = "cast_by_optimizer"
# The attribute of such a parameter that holds its rows of the copy: where the optimizer writes it.
COMPUTE_COPY = "compute_copy"


@dataclasses.dataclass
class CastCopy:
    """The bf16 weight of a fused product, and the (pad, (address, version) of each weight) it was cast from."""

    buffer: torch.Tensor
    snapshot: tuple


def compute_weight(weights: tuple[torch.Tensor, ...], dtype: torch.dtype, pad: int) -> torch.Tensor:
    """torch.cat(weights) cast to dtype, with pad zero rows after it: one pass that reads the fp32 weights and writes
    W (4 + 2 bytes a weight in bf16; at `1.3b` 2.3 ms of a step on an H200, session 22, for every micro batch).

    fp32 weights marked CAST_BY_OPTIMIZER, cast to bf16, are cast once instead: the result is kept (a CastCopy on
    the first weight), each weight's rows of it become its COMPUTE_COPY, which the optimizer overwrites as it
    updates the weight, and it is handed out again while every weight is the same tensor, unchanged by torch since
    (its _version). The optimizer's kernel writes weight and copy through their addresses, which leaves the versions
    alone; anything else that writes a weight through torch (a checkpoint's load, an in-place op, torch's fused AdamW,
    after which TritonAdamW bumps the versions itself since that step does not) makes the next call cast again,
    into a new buffer: an earlier product may have saved the old one for its backward."""
    rows = sum(w.shape[0] for w in weights)
    cached = dtype == torch.bfloat16 and all(getattr(w, CAST_BY_OPTIMIZER, False) and w.dtype == torch.float32
                                             for w in weights)
    if cached:
        snapshot = (pad, *((w.data_ptr(), w._version) for w in weights))
        copy = getattr(weights[0], "_cast_copy", None)
        if copy is not None and copy.snapshot == snapshot:
            return copy.buffer
    w = weights[0].new_empty((rows + pad, weights[0].shape[1]), dtype=dtype)
    torch.cat(weights, out=w[:rows])
    w[rows:].zero_()
    if cached:
        weights[0]._cast_copy = CastCopy(w, snapshot)
        start = 0
        for weight in weights:
            setattr(weight, COMPUTE_COPY, w[start:start + weight.shape[0]])
            start += weight.shape[0]
    return w


# Set by the training engine on the parameters whose gradient it only reads from .grad (the built-in engine, not
# DeepSpeed, whose hooks on the parameters' gradient accumulation must see every micro batch's gradient).
ACCUMULATE_IN_PRODUCT = "accumulate_grad_in_product"
# Set by the built-in engine as well where every backward is a step's only one and the gradients are kept between
# steps (--cuda-graph with one micro batch a step): the products then write their gradient over .grad (C = A B)
# instead of adding it, and the engine leaves those gradients unzeroed (overwritten_by_product). Zeroing them and
# reading the zeros back in the products moved 2 x 5.5 GB a `1.3b` step.
OVERWRITE_IN_PRODUCT = "overwrite_grad_in_product"
# Marks the buffers that accumulation_buffer makes: the .grad views of one are its product's to write.
PRODUCT_BUFFER = "written_by_product"


def accumulation_buffer(weights: tuple[torch.Tensor, ...], rows: int) -> tuple[torch.Tensor, bool] | None:
    """Gradient accumulation fusion (Megatron-LM's): the [rows, in] buffer whose leading row blocks are the
    weights' .grad, in order, and whether it is new (its values are to be overwritten, not added to), or None where
    the product must hand its gradient to autograd instead.

    Every weight must be marked with ACCUMULATE_IN_PRODUCT and need a gradient. Where none has a .grad, a new
    buffer becomes their .grad (views of it); where each .grad is such a view, in place, of one buffer, that buffer
    is found again (and is new when every weight is marked OVERWRITE_IN_PRODUCT). Anything else (a .grad from
    autograd, or replaced) is left to autograd, which adds the new gradient into .grad: one more read and write of
    every gradient per micro batch, which the product's epilogue does instead here (C = A B + C)."""
    if not all(getattr(w, ACCUMULATE_IN_PRODUCT, False) and w.requires_grad for w in weights):
        return None
    grads = [w.grad for w in weights]
    if all(g is None for g in grads):
        buffer = torch.empty(rows, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
        setattr(buffer, PRODUCT_BUFFER, True)
        start = 0
        for w in weights:
            w.grad = buffer[start:start + w.shape[0]]
            start += w.shape[0]
        return buffer, True
    buffer = getattr(grads[0], "_base", None)
    cols = weights[0].shape[1]
    if buffer is None or buffer.shape != (rows, cols) or not buffer.is_contiguous():
        return None
    # Checked on every backward: storage offsets, not views of the buffer (an eager small step is bound by the host)
    start = buffer.storage_offset()
    for w, g in zip(weights, grads):
        if g is None or g._base is not buffer or g.storage_offset() != start or not g.is_contiguous():
            return None
        start += w.shape[0] * cols
    return buffer, all(getattr(w, OVERWRITE_IN_PRODUCT, False) for w in weights)


def overwritten_by_product(param: torch.Tensor) -> bool:
    """Whether param's .grad is written whole by its fused product at every backward (OVERWRITE_IN_PRODUCT, and
    .grad a view of the product's buffer): then nothing needs to zero it before the next backward."""
    grad = param.grad
    return (getattr(param, OVERWRITE_IN_PRODUCT, False) and grad is not None
            and getattr(grad._base, PRODUCT_BUFFER, False))


def fused_linear(x: torch.Tensor, weights: list[torch.Tensor], pad: int,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ torch.cat(weights)^T (and `pad` zero columns), plus residual, in the dtype F.linear(x, w) computes
    in: autocast's where it is on for x's device and would cast the weights, else theirs. A residual of another
    dtype (an fp32 residual stream, --fp32-residual-connection) is added apart, as `residual + y` promotes."""
    dtype = weights[0].dtype
    if torch.is_autocast_enabled(x.device.type) and dtype == torch.float32:
        dtype = torch.get_autocast_dtype(x.device.type)
    if residual is not None and residual.dtype != dtype:
        return residual + FusedLinearFunction.apply(x, None, dtype, pad, *weights)
    return FusedLinearFunction.apply(x, residual, dtype, pad, *weights)


class ColumnSlicesFunction(torch.autograd.Function):
    """y.split(sizes, -1), with backward taking the slices' gradients from one SharedGradient buffer."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, sizes: list[int], shared: SharedGradient) -> tuple[torch.Tensor, ...]:
        ctx.sizes, ctx.shared = sizes, shared
        return y.split(sizes, -1)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        return ctx.shared.gather(grads, ctx.sizes), None, None


def fused_projections(x: torch.Tensor, *layers: nn.Module) -> tuple[tuple[torch.Tensor, ...], SharedGradient | None]:
    """((layer(x) for each layer), where the consumers may write the slices' gradients).

    The outputs are column slices of one product, or the layers' own outputs where they cannot be fused (then no
    SharedGradient, nor without autograd). The product's width is padded with zero weights to a multiple of
    ROW_ALIGNMENT, so that every row of every slice starts 16-byte aligned where the slices' widths are multiples
    of 8 (head dimensions are): the Triton kernels that read them in place load whole vectors, and cuBLAS picks its
    aligned kernels. Pass the SharedGradient to the Triton ops that consume the slices (short_conv_silu,
    gated_rmsnorm): they write their input gradients in place and no copy joins them.
    """
    if not _fusable(layers):
        return tuple(layer(x) for layer in layers), None
    weights = [layer.weight for layer in layers]
    sizes = [w.shape[0] for w in weights]
    pad = -sum(sizes) % ROW_ALIGNMENT
    y = fused_linear(x, weights, pad)
    if not y.requires_grad:
        return y.split(sizes + [pad], -1)[:len(layers)], None
    shared = SharedGradient(y)
    return ColumnSlicesFunction.apply(y, sizes + [pad], shared)[:len(layers)], shared
