"""Several bias-free projections of one input, with the input's gradient summed inside the matrix products.

The GDN mixer projects its input six times (q, k, v, the gate g, and the decay and beta inputs a, b) and the MLP
twice (gate, up). As separate linears, backward gives one input gradient per projection and autograd adds them
pairwise: five extra passes over a [tokens, hidden] tensor per mixer and one per MLP. Here backward accumulates
them in one buffer with addmm, whose epilogue adds the product to what the buffer holds. On an H100 the bf16
additions of a `1.3b` training step went from 10.9 ms to under the 4.5 ms of the last row of the profile's top 40,
and the step from 381.8 to 373.2 ms (`small`: 4.7 ms of additions, 128.2 -> 127.5 ms; docs/PERFORMANCE.md). The
parameters, their names and their gradients are those of the separate layers, so state dicts, tensor-parallel
sharding and optimizers see no difference; what does change is that the layers' own forward (and any hook on it)
does not run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedInputLinearFunction(torch.autograd.Function):
    """(x W_1^T, ..., x W_n^T); backward: dx = sum_i dy_i W_i accumulated in place, dW_i = dy_i^T x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, dweights = None, []
        for i, (dy, w) in enumerate(zip(grads, weights)):
            dy2 = dy.reshape(-1, dy.shape[-1])
            if ctx.needs_input_grad[0]:
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
            dweights.append(dy2.t() @ x2 if ctx.needs_input_grad[i + 1] else None)
        return (None if dx is None else dx.view(x.shape)), *dweights


def _plain_projection(layer: nn.Module) -> bool:
    """Whether layer(x) is F.linear(x, layer.weight): a bias-free nn.Linear, or a column-parallel layer that
    neither brings its input into the tensor-parallel region nor gathers its output (parallel/layers.py)."""
    if isinstance(layer, nn.Linear):
        return layer.bias is None
    return getattr(layer, "communicate_input", True) is False and getattr(layer, "gather_output", True) is False


def shared_input_projections(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """(layer(x) for each layer), with one gradient buffer for x in backward.

    Under autocast the input and the weights are cast to its dtype first, as F.linear would. Falls back to calling
    each layer when one is not a plain projection, and under ZeRO-3, whose hooks gather a partitioned weight
    (marked ds_id) only for its own module's forward.
    """
    weights = [layer.weight for layer in layers]
    if not all(_plain_projection(layer) for layer in layers) or any(hasattr(w, "ds_id") for w in weights):
        return tuple(layer(x) for layer in layers)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
    return SharedInputLinearFunction.apply(x, *weights)
