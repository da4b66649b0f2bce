"""The Gated DeltaNet token mixer (flash-linear-attention's `GatedDeltaNet` layer API).

Per token, per value head, with state S [K, V] in fp32 (../DESIGN.md section 2):
    q, k, v = silu(conv(Wq x)), silu(conv(Wk x)), silu(conv(Wv x))     # depthwise causal conv
    q, k    = l2norm(q), l2norm(k)
    g       = -exp(A_log) * softplus(Wa x + dt_bias)                     # log decay, fp32
    beta    = sigmoid(Wb x)    (x 2 with allow_neg_eigval)
    S       = exp(g) S;  S = S + k (beta (v - S^T k))^T;  o = K^-1/2 S^T q
    y       = Wo(rmsnorm(o) * w * silu(Wg x))                             # per-head gated RMSNorm
The gate, beta's sigmoid and the L2 norm are handed to the delta-rule op, which fuses them on GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import (CONV_L2NORM_HEAD_DIMS, SharedGradient, chunk_gated_delta_rule,
                       fused_recurrent_gated_delta_rule, gated_rmsnorm, rms_norm, short_conv_silu)
from .fused_projection import fused_projection, fused_projections
from .utils import Cache, LayerState

# Prompts (or decode steps) this short run token by token in eval; longer ones use the chunked form.
RECURRENT_MAX_TOKENS = 64


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in fp32.

    forward(x, residual) fuses the pre-norm residual add: it returns (norm(x + residual), x + residual);
    forward(x, prenorm=True) returns (norm(x), x), as fla's RMSNorm does (see kernels.rms_norm).
    backend ('auto' | 'triton' | 'torch', as in megatron_gdn.kernels) picks the fused Triton kernel or the
    PyTorch reference; 'auto' runs Triton on CUDA tensors.
    """

    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                prenorm: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual, prenorm, backend=self.backend)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time, then SiLU. weight: [D, 1, W] as in nn.Conv1d.

    `past` holds the W - 1 inputs before x ([B, W - 1, D]; zeros when None). With cu_seqlens
    (packed documents, B == 1) no input leaks across a document start. cu_seqlens[0] may be negative: the
    first document then began -cu_seqlens[0] tokens before x, and its taps reach into `past` (context
    parallelism passes a slice's offsets this way, with the previous rank's last inputs as `past`).
    Returns (y, the last W - 1 inputs), or (y, None) with output_final_state=False. x may be a column slice of a
    fused projection, whose shared_gradient then receives x's gradient in place. backend as RMSNorm's: the
    Triton kernels of kernels/short_conv.py (training and one-token decoding) or the PyTorch reference
    (kernels/fused_reference.py). l2norm_head_dim: y is L2-normalised per head of that many channels (the GDN
    layer's q and k; one of kernels.CONV_L2NORM_HEAD_DIMS on the Triton path).
    """

    def __init__(self, dim: int, kernel_size: int, bias: bool = False, backend: str = "auto",
                 l2norm_head_dim: int | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.backend = backend
        self.l2norm_head_dim = l2norm_head_dim
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                output_final_state: bool = True,
                shared_gradient: SharedGradient | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return short_conv_silu(x, self.weight, self.bias, past, cu_seqlens, backend=self.backend,
                               output_final_state=output_final_state, shared_gradient=shared_gradient,
                               l2norm_head_dim=self.l2norm_head_dim)


class GatedDeltaNet(nn.Module):
    """The GDN token mixer. Returns (output, None, past_key_values) like flash-linear-attention's layer."""

    def __init__(
        self,
        hidden_size: int = 2048,
        expand_v: float = 2.0,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        mode: str = "chunk",
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads})")
        head_v_dim = head_dim * expand_v
        if head_v_dim != int(head_v_dim):
            raise ValueError(f"head_dim x expand_v must be an integer; got {head_dim} x {expand_v}")
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"mode must be 'chunk' or 'fused_recurrent', got {mode!r}")
        self.hidden_size = hidden_size
        self.mode = mode
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.layer_idx = layer_idx
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_v_dim)
        self.key_dim = num_heads * head_dim
        self.value_dim = num_v_heads * self.head_v_dim

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        # Decay parameters stay fp32 and get no weight decay (training/optimizer.py).
        self.A_log = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32))
        # q and k are L2-normalised before the delta rule: by the convolution's kernels where they take the head
        # dim (one pass less over q and k each way), else by the delta rule's (use_qk_l2norm_in_kernel). Before
        # session 17 this stopped at heads of 64: that convolution's backward cut its blocks' rows for wide heads
        # (heads of 256: 4 rows), and at `1.3b` it went from 7.7 to 11.4 ms a step on an H100 (session 11), more
        # than the norm it saved. The walking kernels take heads of 256 at 39 + 111 us a q or k call on an H200,
        # against 33 + 67 without the norm plus about 25 + 38 for the delta rule's; end to end at `1.3b` the two
        # rules were equal within the noise (session 18, docs/KERNELS.md), and this one is the simpler.
        self.qk_l2norm_in_conv = use_short_conv and head_dim in CONV_L2NORM_HEAD_DIMS
        qk_norm = head_dim if self.qk_l2norm_in_conv else None
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, l2norm_head_dim=qk_norm)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias, l2norm_head_dim=qk_norm)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, conv_bias)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        # The hook of context parallelism (parallel/context_parallel.py puts its op here): the delta rule over a
        # sequence split across ranks needs process groups, which a plain model does not know about.
        self.context_parallel_op = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, initializer_range: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Weights N(0, initializer_range); A_log = log U(0, 16); dt_bias = softplus^-1(dt), dt ~ logU(1e-3, 1e-1)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, ShortConvolution)):
                module.weight.normal_(0.0, initializer_range, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
        self.o_norm.weight.fill_(1.0)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16, generator=generator).log())
        dt_min, dt_max = 1e-3, 1e-1
        u = torch.rand(self.dt_bias.shape, generator=generator)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        """hidden_states: [B, T, hidden]. cu_seqlens packs documents (B == 1) and restarts the state per document.

        attention_mask is accepted for API compatibility and must be None or all ones: pack
        variable-length sequences with cu_seqlens instead of padding them.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding masks are not supported: pack the sequences and pass cu_seqlens instead")
        if use_cache and cu_seqlens is not None:
            raise ValueError("use_cache with cu_seqlens is not supported: generate one batch of equal-length prompts")
        B, T, _ = hidden_states.shape
        mode = "fused_recurrent" if (T <= RECURRENT_MAX_TOKENS and not self.training) else self.mode
        last = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError("a GatedDeltaNet layer used with a cache needs layer_idx")
            last = past_key_values[self.layer_idx]

        # Column slices of one product (the kernels read them in place and write their gradients in place through
        # `shared`); the thin a and b last, so that q, k, v and the gate start aligned.
        (q, k, v, *gate, a, b), shared = fused_projections(
            hidden_states, self.q_proj, self.k_proj, self.v_proj, *([self.g_proj] if self.use_gate else []),
            self.a_proj, self.b_proj)
        conv_state = None
        if self.use_short_conv:
            past_q, past_k, past_v = last.conv_state if last is not None else (None, None, None)
            q, tail_q = self.q_conv1d(q, past_q, cu_seqlens, output_final_state=use_cache, shared_gradient=shared)
            k, tail_k = self.k_conv1d(k, past_k, cu_seqlens, output_final_state=use_cache, shared_gradient=shared)
            v, tail_v = self.v_conv1d(v, past_v, cu_seqlens, output_final_state=use_cache, shared_gradient=shared)
            conv_state = (tail_q, tail_k, tail_v)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        # -1 heads: under tensor parallelism the projections hold only this rank's heads.
        q = q.view(B, T, -1, self.head_k_dim)
        k = k.view(B, T, -1, self.head_k_dim)
        v = v.view(B, T, -1, self.head_v_dim)

        delta_rule = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
        if self.context_parallel_op is not None:  # the chunked rule across ranks, whatever the slice's length
            delta_rule = self.context_parallel_op
        o, recurrent_state = delta_rule(
            q, k, v, g=a, beta=b,
            initial_state=last.recurrent_state if last is not None else None,
            output_final_state=use_cache, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=not self.qk_l2norm_in_conv,
            use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
            use_beta_sigmoid_in_kernel=True, allow_neg_eigval=self.allow_neg_eigval)
        if use_cache:
            if past_key_values is None:
                raise ValueError("use_cache=True needs a Cache passed as past_key_values")
            past_key_values.update(self.layer_idx, LayerState(recurrent_state, conv_state), T)

        if self.use_gate:
            o = gated_rmsnorm(o, gate[0].view(B, T, -1, self.head_v_dim), self.o_norm.weight, self.o_norm.eps,
                              shared_gradient=shared)
        else:
            o = self.o_norm(o)
        return fused_projection(o.reshape(B, T, -1), self.o_proj), None, past_key_values
