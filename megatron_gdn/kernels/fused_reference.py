"""The model's small ops in plain PyTorch: the CPU path and the oracle of the fused Triton kernels.

    rms_norm(x, weight, eps, residual=None, prenorm)     RMSNorm, optionally of x + residual   (fused_norm.py)
    swiglu(x)                                            silu(gate) * up, x = [..., gate | up] (fused_swiglu.py)
    short_conv_silu(x, weight, bias, past, cu_seqlens,   depthwise causal convolution, SiLU,   (short_conv.py)
                    l2norm_head_dim)                     optionally L2-normalised per head

Each is differentiable through autograd in every tensor input. The linear + cross entropy op's reference is
the logits followed by parallel/cross_entropy.py's vocab-parallel cross entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import l2norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             prenorm: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """h / rms(h) * weight over the last dimension in fp32, with h = x (+ residual); y in h's dtype.

    Returns y, or (y, h) when a residual is given or prenorm is set: the pre-norm block's `h = x + mixed;
    y = norm(h)`, whose h goes on as the residual stream.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(h.dtype)
    return (y, h) if residual is not None or prenorm else y


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with x = [..., gate | up], the SwiGLU MLP's activation."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def document_positions(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Each token's position inside its document ([T] int64), counted from the document's first token.

    cu_seqlens[0] may be negative (the first document began before this sequence), and its last entry may
    lie beyond T: only the inner offsets split the sequence.
    """
    t = torch.arange(seqlen, device=cu_seqlens.device)
    bounds = cu_seqlens.long()
    doc = torch.searchsorted(bounds[1:-1].contiguous(), t, right=True)
    return t - bounds[doc]


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
               l2norm_head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(depthwise causal conv(x) + bias) and the last W - 1 inputs (the next call's `past`).

    x: [B, T, D]; weight: [D, 1, W] as in nn.Conv1d; past: the W - 1 inputs before x ([B, W - 1, D], zeros
    when None). With cu_seqlens (packed documents, B == 1) no tap reaches across a document start; a negative
    cu_seqlens[0] starts the first document that many tokens before x, inside `past`. With l2norm_head_dim the
    output is L2-normalised per head of that many channels (reference.l2norm, in fp32), as the GDN layer's q and k
    are before the delta rule.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if past is None:
        past = x.new_zeros(B, W - 1, D)
    x_ext = torch.cat([past.to(x.dtype), x], dim=1)  # [B, W - 1 + T, D]
    if cu_seqlens is not None:
        pos_in_doc = document_positions(cu_seqlens, T)  # a tap that reaches further back than this is cut
    weight = weight.to(x.dtype)
    y = 0
    for shift in range(W):  # output t sums weight[:, W-1-shift] * x[t - shift]
        tap = x_ext[:, W - 1 - shift: W - 1 - shift + T] * weight[:, 0, W - 1 - shift]
        if cu_seqlens is not None:
            tap = torch.where((pos_in_doc >= shift)[None, :, None], tap, 0)
        y = y + tap
    if bias is not None:
        y = y + bias.to(x.dtype)
    y = F.silu(y)
    if l2norm_head_dim is not None:
        y = l2norm_heads(y, l2norm_head_dim)
    return y, x_ext[:, T:]


def l2norm_heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """y [..., D] L2-normalised per head of head_dim channels, in fp32, returned in y's dtype."""
    return l2norm(y.float().unflatten(-1, (-1, head_dim))).flatten(-2).to(y.dtype)
