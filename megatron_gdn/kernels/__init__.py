"""Public gated delta rule ops, with flash-linear-attention's signatures so users can swap them in.

    chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False) -> (o, final_state)
    fused_recurrent_gated_delta_rule(...same...) -> (o, final_state)

Like flash-linear-attention's, they optionally compute the gate and beta themselves (fused on GPU):
use_gate_in_kernel=True takes the raw gate logits as ``g`` with ``A_log`` and ``dt_bias`` and computes
g = -exp(A_log) * softplus(g + dt_bias); use_beta_sigmoid_in_kernel=True takes beta logits and applies
sigmoid (times 2 with allow_neg_eigval, so that beta is in (0, 2)).

q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H); g (log decay), beta: [B, T, HV];
states: [N, HV, K, V] fp32 (fp64 for fp64 inputs); cu_seqlens: [N + 1] with B == 1 for packed documents.

backend: 'auto' runs the Triton kernels (chunk.py, recurrent.py) on CUDA tensors and the PyTorch reference
(reference.py) on CPU tensors; 'torch' always runs the reference; 'triton' always runs the kernels, on CPU
tensors through Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before the first
Triton call of the process (that is how the CPU tests check the kernels). The kernels are imported on first
use, so importing this package never initialises Triton. See docs/KERNELS.md.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .reference import chunk_gated_delta_rule_torch, gdn_gate, l2norm, recurrent_gated_delta_rule
from .reference import gated_rmsnorm as gated_rmsnorm_torch
from . import fused_reference
from .shared_gradient import SharedGradient

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "check_inputs", "gated_rmsnorm",
           "gdn_gate", "l2norm", "MAX_TRITON_HEAD_DIM", "CONV_L2NORM_HEAD_DIMS", "BACKENDS", "slice_summary",
           "fold_summaries", "rms_norm", "swiglu", "short_conv_silu", "short_conv_silu_step", "SharedGradient",
           "fp32_products_of_bf16"]

BACKENDS = ("auto", "triton", "torch")
# The Triton kernels keep a [K, BV] state tile in registers: K (the q/k head dim) is capped.
MAX_TRITON_HEAD_DIM = 256
# Head dimensions whose L2 norm the short convolution's kernels compute themselves (short_conv_silu's
# l2norm_head_dim): a block of channels is one head wide, a power of two.
CONV_L2NORM_HEAD_DIMS = (16, 32, 64, 128, 256)


@functools.cache
def fp32_products_of_bf16(device: torch.device) -> bool:
    """Whether torch.mm and torch.addmm take out_dtype=float32 for bf16 operands on this device (CUDA, torch >= 2.8):
    a weight gradient then comes out of its product in fp32, with no bf16 copy and cast."""
    try:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        return torch.addmm(torch.zeros(1, 1, device=device), one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, NotImplementedError, TypeError):  # no such kernel on this device; TypeError: no out_dtype
        return False


def check_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=None, A_log=None, dt_bias=None,
                 max_head_dim: int | None = None) -> int:
    """Validate shapes, dtypes and devices of a gated delta rule call; returns N, the number of sequences.

    Raises ValueError with a message that says what is wrong, instead of a failure deep inside a kernel.
    max_head_dim: the largest K the chosen backend supports (None: no limit).
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}; got {tuple(v.shape)}")
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"the number of value heads ({HV}) must be a multiple of the q/k heads ({H})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}; got {tuple(t.shape)}")
    if max_head_dim is not None and K > max_head_dim:
        raise ValueError(f"the Triton kernels support q/k head dims K <= {max_head_dim}; got K={K} "
                         "(use backend='torch', or fewer dims per head)")
    tensors = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state),
               ("cu_seqlens", cu_seqlens), ("A_log", A_log), ("dt_bias", dt_bias)]
    devices = {name: t.device for name, t in tensors if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device (cu_seqlens, A_log and dt_bias too); got {devices}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in tensors[3:6]:
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got {t.dtype}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B == 1; got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be an integer tensor [N + 1] of document offsets")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must rise monotonically from 0 to T={T}; got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None and initial_state.shape != (N, HV, K, v.shape[3]):
        raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, v.shape[3])}; got {tuple(initial_state.shape)}")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (HV,):
            raise ValueError(f"{name} must be [HV] = ({HV},); got {tuple(t.shape)}")
    return N


def _triton_module(name: str, x: torch.Tensor, backend: str):
    """The kernel module kernels/<name>.py if this call should run Triton, else None."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch" or (backend == "auto" and (not x.is_cuda or x.dtype == torch.float64)):
        return None
    if x.dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32, bf16 or fp16 inputs; use backend='torch' for fp64")
    from . import triton_utils
    if not x.is_cuda and not triton_utils.INTERPRET:
        raise RuntimeError("backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 in "
                           "the environment before the process first uses a Triton kernel (or pass CUDA tensors)")
    return importlib.import_module(f".{name}", __name__)


def _fused_options(use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    """Check the fused gate/beta options; returns (A_log, dt_bias, beta_scale) as the kernels take them."""
    if use_gate_in_kernel and (A_log is None or dt_bias is None):
        raise ValueError("use_gate_in_kernel=True needs A_log and dt_bias")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval needs use_beta_sigmoid_in_kernel=True (or pass beta already in (0, 2))")
    beta_scale = (2.0 if allow_neg_eigval else 1.0) if use_beta_sigmoid_in_kernel else None
    return (A_log, dt_bias) if use_gate_in_kernel else (None, None), beta_scale


def _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    """Turn raw gate/beta logits into the log decay and beta (the PyTorch path of the fused options)."""
    (A_log, dt_bias), beta_scale = _fused_options(use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                                                  allow_neg_eigval)
    if A_log is not None:
        g = gdn_gate(g, A_log, dt_bias)
    if beta_scale is not None:
        beta = beta.to(torch.promote_types(beta.dtype, torch.float32)).sigmoid() * beta_scale
    return g, beta


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule by the chunked algorithm (training and prefill). Returns (o, final_state)."""
    chunk = _triton_module("chunk", q, backend)
    if chunk is not None and q.is_cuda and q.dtype == torch.float32 and q.shape[-1] > chunk.FP32_MAX_HEAD_DIM:
        if backend == "triton":
            raise ValueError(f"the Triton chunk kernels take fp32 inputs on GPUs up to K={chunk.FP32_MAX_HEAD_DIM} "
                             f"(got K={q.shape[-1]}: its fp32 tiles need more shared memory than an SM has); pass "
                             "bf16/fp16 inputs (e.g. under autocast), or backend='torch' (what 'auto' falls back to)")
        chunk = None  # auto: the PyTorch chunked path (fp32 training at K > 64 is rare; autocast runs Triton)
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                 MAX_TRITON_HEAD_DIM if chunk else None)
    if chunk is not None:
        (A_log, dt_bias), beta_scale = _fused_options(use_gate_in_kernel, A_log, dt_bias,
                                                      use_beta_sigmoid_in_kernel, allow_neg_eigval)
        return chunk.chunk_gated_delta_rule_triton(
            q, k, v, g, beta, q.shape[-1] ** -0.5 if scale is None else scale, initial_state, output_final_state,
            cu_seqlens, use_qk_l2norm_in_kernel, A_log, dt_bias, beta_scale)
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule token by token (decoding a few tokens from a cached state).

    The Triton kernel is forward-only: when autograd needs gradients, the call runs the chunked kernels,
    which compute the same function.
    """
    recurrent = _triton_module("recurrent", q, backend)
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, A_log, dt_bias,
                 MAX_TRITON_HEAD_DIM if recurrent else None)
    if recurrent is not None:
        args = (q, k, v, g, beta, A_log, dt_bias, initial_state)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                          use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                          use_beta_sigmoid_in_kernel, allow_neg_eigval, backend)
        (A_log, dt_bias), beta_scale = _fused_options(use_gate_in_kernel, A_log, dt_bias,
                                                      use_beta_sigmoid_in_kernel, allow_neg_eigval)
        return recurrent.fused_recurrent_fwd(
            q, k, v, g, beta, q.shape[-1] ** -0.5 if scale is None else scale, initial_state, output_final_state,
            cu_seqlens, use_qk_l2norm_in_kernel, A_log, dt_bias, beta_scale)
    g, beta = _gate_and_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)


def gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                  backend: str = "auto", shared_gradient: SharedGradient | None = None) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(gate) over the last dimension (the GDN output norm), in fp32 inside.

    x, gate: [..., D]; weight: [D]. Triton (rmsnorm.py) on CUDA tensors with backend='auto'. The gate may be a
    column slice of a wider tensor (read in place); with that tensor's shared_gradient (kernels/shared_gradient.py)
    the Triton backward writes the gate's gradient in its place there.
    """
    rmsnorm = _triton_module("rmsnorm", x, backend)
    if rmsnorm is None:
        return gated_rmsnorm_torch(x, gate, weight, eps)
    return rmsnorm.gated_rmsnorm_triton(x, gate, weight, eps, shared_gradient)



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             prenorm: bool = False, backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension (fp32 inside), with the residual add fused when residual is given.

    Returns y = rmsnorm(x) * weight, or (rmsnorm(h) * weight, h) with h = x + residual (the pre-norm block's
    `h = x + mixed; y = norm(h)`); y in h's dtype. prenorm (fla's RMSNorm flag) returns (y, h) without a residual
    too, h being x: where x also goes on as the residual stream, its gradient from there then joins the norm's in
    the norm's backward kernel instead of in a separate add. Triton (fused_norm.py) on CUDA tensors with
    backend='auto'.
    """
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    fused_norm = _triton_module("fused_norm", x, backend)
    if fused_norm is None:
        return fused_reference.rms_norm(x, weight, eps, residual, prenorm)
    return fused_norm.rms_norm_triton(x, weight, eps, residual, prenorm)


def swiglu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up with x = [..., gate | up] ([..., 2 I]: the MLP's fused gate and up projection, as
    Megatron-LM's swiglu takes it); one Triton kernel each way (fused_swiglu.py) on CUDA tensors."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension ([..., gate | up]); got {tuple(x.shape)}")
    kernel = _triton_module("fused_swiglu", x, backend)
    if kernel is None:
        return fused_reference.swiglu(x)
    return kernel.swiglu_triton(x)


def short_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
               backend: str = "auto", output_final_state: bool = True,
               shared_gradient: SharedGradient | None = None,
               l2norm_head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution then SiLU: (y [B, T, D], the last W - 1 inputs [B, W - 1, D]), or (y, None)
    with output_final_state=False (training: the cache is not needed, and assembling it costs launches).

    x: [B, T, D]; weight: [D, 1, W]; bias: [D]; past: the W - 1 inputs before x (zeros when None);
    cu_seqlens: packed documents (no tap crosses a document start; cu_seqlens[0] may be negative: the first
    document then starts inside past). Triton (short_conv.py) on CUDA tensors with backend='auto'; a single
    token with a cache and no gradient to record runs the decoding kernel (short_conv_silu_step). x may be a
    column slice of a wider tensor (read in place); with that tensor's shared_gradient
    (kernels/shared_gradient.py) the Triton backward writes x's gradient in its place there. l2norm_head_dim
    L2-normalises y per head of that many channels (a power of two from 16 to 256 on the Triton path: inside the
    kernels, forward and backward), as the GDN layer's q and k before the delta rule.
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[::2] != (x.shape[2], weight.shape[2]):
        raise ValueError(f"short_conv_silu takes x [B, T, D] and weight [D, 1, W]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    kernel = _triton_module("short_conv", x, backend)
    if kernel is None:
        y, tail = fused_reference.short_conv_silu(x, weight, bias, past, cu_seqlens, l2norm_head_dim)
        return y, tail if output_final_state else None
    decoding = x.shape[1] == 1 and past is not None and cu_seqlens is None and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, past)))
    if decoding:
        y, new_past = short_conv_silu_step(x[:, 0], past, weight, bias, backend, l2norm_head_dim)
        return y[:, None], new_past if output_final_state else None
    return kernel.short_conv_triton(x, weight, bias, past, cu_seqlens, output_final_state, shared_gradient,
                                    l2norm_head_dim)


def short_conv_silu_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, backend: str = "auto",
                         l2norm_head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of short_conv_silu: x [B, D] after the cached inputs conv_state [B, W - 1, D].

    Returns (y [B, D], the new cache [B, W - 1, D]: conv_state shifted by one token, x last). Forward only on
    the Triton path, whose L2 norm (l2norm_head_dim) runs in PyTorch after the kernel (one token).
    """
    kernel = _triton_module("short_conv", x, backend)
    if kernel is None:
        y, new_state = fused_reference.short_conv_silu(x[:, None], weight, bias, conv_state,
                                                        l2norm_head_dim=l2norm_head_dim)
        return y[:, 0], new_state
    y, new_state = kernel.short_conv_step_triton(x, conv_state, weight, bias)
    if l2norm_head_dim is not None:
        y = fused_reference.l2norm_heads(y, l2norm_head_dim)
    return y, new_state

# The context-parallel API builds on the public ops above (it needs them defined first).
from .slice_summary import fold_summaries, slice_summary  # noqa: E402
