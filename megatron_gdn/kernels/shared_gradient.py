"""One gradient buffer for the column slices of a tensor, written in place by the ops that consume the slices.

The GDN mixer's fused projection (models/fused_projection.py) gives one [..., width] product whose column slices
are q, k, v, the gate, a and b. Its backward multiplies one [..., width] gradient. Were each consumer to return
its slice's gradient as a tensor of its own, joining them would copy the whole width once more per layer (on an
H100, 0.26 ms per `small` mixer: 3.1 ms of a 93 ms step). Instead the Triton consumers (the short convolution's
dx, the gated RMSNorm's dgate) ask SharedGradient.slice_like for where to write, which is the slice's place in
one buffer, and the projection's backward (gather) finds those gradients already in place. A gradient that
arrives elsewhere (a torch consumer, the small a and b gradients of the delta rule) is copied into its slice;
a missing one is zero.
"""

from __future__ import annotations

import torch


class SharedGradient:
    """The gradient buffer of y ([..., width], contiguous), made on the first slice_like and handed over by gather."""

    def __init__(self, y: torch.Tensor) -> None:
        if not y.is_contiguous():
            raise ValueError("SharedGradient needs a contiguous tensor (the slices' strides are its strides)")
        self.shape, self.dtype, self.device = y.shape, y.dtype, y.device
        self.storage, self.offset = y.untyped_storage().data_ptr(), y.storage_offset()
        self.buffer: torch.Tensor | None = None

    def slice_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uninitialised memory for the gradient of x, a view of y: x's place in the buffer, with x's shape and
        strides."""
        if x.untyped_storage().data_ptr() != self.storage:
            raise ValueError("slice_like takes a view of the SharedGradient's tensor")
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffer.as_strided(x.shape, x.stride(), x.storage_offset() - self.offset)

    def gather(self, grads: tuple[torch.Tensor | None, ...], sizes: list[int]) -> torch.Tensor:
        """y's gradient from the gradients of its consecutive column slices of these widths (which must cover y):
        the buffer, with the gradients that are not in their place yet copied there and missing ones zeroed."""
        buffer = self.buffer if self.buffer is not None else torch.empty(self.shape, dtype=self.dtype,
                                                                         device=self.device)
        self.buffer = None  # a second backward (retain_graph) starts from a new buffer
        start = 0
        for grad, size in zip(grads, sizes):
            place = buffer[..., start:start + size]
            start += size
            if grad is None:
                place.zero_()
            elif grad.data_ptr() != place.data_ptr() or grad.stride() != place.stride():
                place.copy_(grad)
        if start != self.shape[-1]:
            raise ValueError(f"slices of widths {sizes} do not cover the last dimension of {tuple(self.shape)}")
        return buffer


def gradient_like(x: torch.Tensor, shared: SharedGradient | None) -> torch.Tensor:
    """Uninitialised memory for x's gradient: x's place in shared's buffer where x is a view of shared's tensor
    (not, say, a contiguous copy of it), else a new contiguous tensor shaped like x."""
    if shared is not None and x.untyped_storage().data_ptr() == shared.storage:
        return shared.slice_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
