"""Context parallelism (CP): one sequence split across the ranks of a CP group, applied to a plain model from outside.

Each CP rank holds a contiguous slice of every sequence: rank r of C holds tokens [r L, (r + 1) L) of each row
(or, for packed documents, of the packed row; a document may span ranks). Two ways to run the gated delta rule
over such slices (--cp-comm-type):

state_passing (the default; ../DESIGN.md section 4). A slice maps the state entering it affinely,
S_out = M S_in + h. One run of the chunked op over the slice computes both at once: the value columns from
a zero state give the outputs o0 and h, extra columns with v = 0 started from the identity give M (the
transition, [K, K] per value head) and, per token, oM = scale M_t^T q_t, the part of the output that the
incoming state will add. One all-gather of (h, M) per layer (O(HV K (K + V)) per rank, independent of the
sequence length); each rank folds the summaries of the ranks before it, S = M_j S + h_j, into its true
incoming state (documents stop the chain), and its output is o = o0 + oM S_in. Backward is the transposed
chain: each rank's gradient of its incoming state (dS0) is all-gathered, and a rank folds those of the
ranks after it, dS = dS0_j + M_j^T dS, into the gradient of the state leaving its slice, which enters the
same chunked op's backward as the final-state gradient. The folds run in fp64 (no TF32 whatever the global
matmul settings; the chain is C - 1 tiny products).

all_to_all (Megatron's head-parallel scheme, the exact baseline): q, k, v, the gate and beta logits go
through an all-to-all so that each rank holds every token of 1/C of the heads, the ordinary chunked op runs
on the whole sequence, and the output comes back with a second all-to-all. It moves O(T) activations per
layer and needs the heads (per TP rank) to be divisible by C.

In both, the short convolution stays sequence-local: it receives the previous rank's last conv_size - 1
inputs (a halo) and returns their gradient in backward.

    parallelize_model(model, tp_group)                    # optional, first or after
    apply_context_parallel(model, cp_group)               # in place; the state dict keeps its keys
    inputs, targets = (split_sequence(t, cp_group) for t in (inputs, targets))   # [B, T] -> [B, T / C]
    logits = model(inputs, cu_seqlens=cu_seqlens).logits  # cu_seqlens: the WHOLE packed sequence's offsets
    loss = cross_entropy(logits, targets).mean()          # this rank's tokens; average gradients over DP x CP

Under context parallelism `cu_seqlens` stays the offsets of the whole (packed) sequence, the same tensor on
every CP rank; each layer cuts its rank's window out of it (`slice_layout`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import ProcessGroup

from ..kernels import SharedGradient, chunk_gated_delta_rule
from ..models.configuration import GatedDeltaNetConfig
from ..models.gated_deltanet import GatedDeltaNet, ShortConvolution
from .mappings import _all_gather, gather_from_sequence_parallel_region
from .state import group_rank, group_size

CP_COMM_TYPES = ("state_passing", "all_to_all")


# ----------------------------------------------------------------------------------------------------
# Where a rank's slice sits in the sequence

@dataclass(frozen=True)
class SliceLayout:
    """What a rank's layers need to know about its slice [start, start + L) of the whole sequence.

    local_cu_seqlens: offsets of the local sequences inside the slice, [0, ..., L] (None: one sequence per row,
    every row spanning all ranks). relative_cu_seqlens: the same documents' true offsets counted from the
    slice's first token (the first may be negative, the last beyond L), which the short convolution takes.
    pre_ranks / post_ranks: how many ranks before / after this one the first / last local sequence reaches
    (0: it starts / ends here). ends_here: indices of the local sequences whose last token is on this rank.
    """

    local_cu_seqlens: torch.Tensor | None
    relative_cu_seqlens: torch.Tensor | None
    pre_ranks: int
    post_ranks: int
    ends_here: list[int]


def slice_layout(cu_seqlens: torch.Tensor | None, local_len: int, rank: int, size: int,
                 num_rows: int = 1) -> SliceLayout:
    """The layout of rank's slice of L = local_len tokens, from the whole sequence's cu_seqlens (None: rows).

    Zero-length documents are dropped (they hold no token and leave no state worth passing).
    """
    if cu_seqlens is None:
        return SliceLayout(None, None, rank, size - 1 - rank, list(range(num_rows)) if rank == size - 1 else [])
    total = local_len * size
    bounds = sorted(set(cu_seqlens.tolist()))
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"under context parallelism cu_seqlens are the offsets of the whole packed sequence, from 0 "
                         f"to {total} tokens ({size} ranks x {local_len}); got {cu_seqlens.tolist()}")
    start, end = rank * local_len, (rank + 1) * local_len
    first = max(b for b in bounds if b <= start)  # where the document holding the slice's first token begins
    last = min(b for b in bounds if b >= end)  # where the document holding its last token ends
    inner = [b for b in bounds if start < b < end]
    relative = [first - start, *(b - start for b in inner), last - start]
    local = [0, *(b - start for b in inner), local_len]
    ends_here = list(range(len(local) - 1)) if last == end else list(range(len(local) - 2))
    device = cu_seqlens.device
    return SliceLayout(torch.tensor(local, dtype=torch.int32, device=device),
                       torch.tensor(relative, dtype=torch.int32, device=device),
                       math.ceil((start - first) / local_len), math.ceil((last - end) / local_len), ends_here)


def check_context_parallel_config(config: GatedDeltaNetConfig, context_parallel_size: int, comm_type: str,
                                  seq_length: int, tensor_model_parallel_size: int = 1,
                                  sequence_parallel: bool = False) -> None:
    """Raise ValueError, saying what to change, when a CP layout cannot work (before any communication).

    The slices need not be multiples of the 64-token chunk: each rank chunks its own slice, which is exact.
    """
    cp, tp = context_parallel_size, tensor_model_parallel_size
    if cp == 1:
        return
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}; got {comm_type!r}")
    if config.attn_mode != "chunk":
        raise ValueError(f"context parallelism runs the chunked delta rule; the model's attn_mode is "
                         f"{config.attn_mode!r} (the fused recurrent mode is for decoding): use attn_mode='chunk'")
    if seq_length % cp:
        raise ValueError(f"--seq-length ({seq_length}) must be divisible by --context-parallel-size ({cp}): each "
                         f"rank holds seq_length / CP tokens of every sequence")
    local = seq_length // cp
    if sequence_parallel and local % tp:
        raise ValueError(f"--sequence-parallel splits each rank's {local}-token slice across the tensor-parallel "
                         f"ranks: --seq-length must be divisible by CP x TP = {cp * tp}")
    if config.use_short_conv and local < config.conv_size - 1:
        raise ValueError(f"a context-parallel slice of {local} tokens is shorter than the short convolution's halo "
                         f"({config.conv_size - 1} tokens): use fewer context-parallel ranks or longer sequences")
    heads = {"--num-attention-heads": config.num_heads, "--num-v-heads": config.num_v_heads}
    for flag, count in heads.items():
        if comm_type == "all_to_all" and (count // tp) % cp:
            raise ValueError(f"--cp-comm-type all_to_all splits each rank's heads across the context-parallel ranks: "
                             f"{flag} ({count}) / TP ({tp}) = {count // tp} is not divisible by "
                             f"--context-parallel-size ({cp}); use --cp-comm-type state_passing (any head count)")


def split_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """This CP rank's contiguous slice of x along the sequence dimension (the data side of context parallelism)."""
    world = group_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"a sequence of {x.shape[dim]} tokens does not split evenly across {world} context-parallel "
                         f"ranks: make the (packed) sequence length a multiple of --context-parallel-size")
    return x.chunk(world, dim)[group_rank(group)]


def _gather_ranks(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[C, *x.shape]: every rank's x, in rank order."""
    return _all_gather(x.contiguous().unsqueeze(0), group, 0)


# ----------------------------------------------------------------------------------------------------
# State passing

def _fold(Ms: list[torch.Tensor], hs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """S = M_j S + h_j over the pairs in order, from S = 0, in fp64 (returned in like's dtype)."""
    S = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    for M, h in zip(Ms, hs):
        S = M.double() @ S + h.double()
    return S.to(like.dtype)


class _StatePassing(torch.autograd.Function):
    """carried [Nc, HV, K, V + K] = (h | M) of the sequences that continue on the next rank -> S_in [Nc, HV, K, V],
    the state entering this rank's first sequences. Backward: the transposed chain (module docstring)."""

    @staticmethod
    def forward(ctx, carried: torch.Tensor, pre_ranks: int, post_ranks: int, carried_is_first: bool,
                group: ProcessGroup | None) -> torch.Tensor:
        rank = group_rank(group)
        V = carried.shape[-1] - carried.shape[-2]
        gathered = _gather_ranks(carried, group)  # [C, Nc, HV, K, V + K]
        chain = range(rank - pre_ranks, rank)
        S_in = _fold([gathered[j, ..., V:] for j in chain], [gathered[j, ..., :V] for j in chain], carried[..., :V])
        # Backward needs the transitions of the ranks after this one, and the state the carried sequence started
        # from (zero unless it is also the first sequence, continuing from the ranks before).
        later = gathered[rank + 1: rank + 1 + post_ranks, ..., V:].clone()  # not a view: frees the rest
        ctx.save_for_backward(later, S_in if carried_is_first else torch.zeros_like(S_in))
        ctx.group, ctx.post_ranks = group, post_ranks
        return S_in

    @staticmethod
    def backward(ctx, dS_in: torch.Tensor):
        later, S_start = ctx.saved_tensors
        rank = group_rank(ctx.group)
        dS0 = _gather_ranks(dS_in, ctx.group)  # [C, Nc, HV, K, V]: each rank's gradient of its incoming state
        chain = range(rank + ctx.post_ranks, rank, -1)  # from the rank where the sequence ends, back to rank + 1
        dS_end = _fold([later[j - rank - 1].mT for j in chain], [dS0[j] for j in chain], dS_in)
        dM = (dS_end.double() @ S_start.double().mT).to(dS_in.dtype)
        return torch.cat([dS_end, dM], dim=-1), None, None, None, None


class _AddIncomingState(torch.autograd.Function):
    """o0 + oM S_in per token and head ([K] @ [K, V]): the output's part that the incoming state adds.

    The products run in the inputs' dtype (on GPU: the tensor cores, fp32 accumulation), as the kernels' own
    products with the state do; the gradient of S_in, a sum over every token of the slice, is formed in fp32.
    """

    @staticmethod
    def forward(ctx, o0: torch.Tensor, oM: torch.Tensor, S_in: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(oM, S_in)
        incoming = torch.einsum("bthk,bhkv->bthv", oM, S_in.to(oM.dtype))
        return (o0.float() + incoming.float()).to(o0.dtype)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        oM, S_in = ctx.saved_tensors
        d_oM = torch.einsum("bthv,bhkv->bthk", do, S_in.to(do.dtype))
        dS_in = torch.einsum("bthk,bthv->bhkv", oM.float(), do.float())
        return do, d_oM, dS_in.to(S_in.dtype)


def _state_passing_rule(q, k, v, g, beta, layout: SliceLayout, group, scale, output_final_state, options):
    B, T, HV, V = v.shape
    K = k.shape[-1]
    cu = layout.local_cu_seqlens
    N = B if cu is None else len(cu) - 1
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    # Columns :V run the slice from a zero state; columns V: (v = 0, starting from the identity) give M and oM.
    v_ext = torch.cat([v, v.new_zeros(B, T, HV, K)], dim=-1)
    h0 = torch.zeros(N, HV, K, V + K, dtype=state_dtype, device=v.device)
    h0[..., V:] = torch.eye(K, dtype=state_dtype, device=v.device)
    o_ext, ht = chunk_gated_delta_rule(q, k, v_ext, g, beta, scale=scale, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu, **options)
    # Rows: every row continues from the previous rank and into the next. Packed: the first local sequence
    # receives the incoming state, the last one carries its summary on.
    carried = ht if cu is None else ht[-1:]
    S_in = _StatePassing.apply(carried, layout.pre_ranks, layout.post_ranks, cu is None or N == 1, group)
    o0, oM = o_ext[..., :V], o_ext[..., V:]
    # Always applied, even where S_in is zero (rank 0): every rank must reach _StatePassing's backward.
    n0 = T if cu is None else int(cu[1])  # tokens of the first local sequence (S_in: one row per batch row)
    o = torch.cat([_AddIncomingState.apply(o0[:, :n0], oM[:, :n0], S_in), o0[:, n0:]], dim=1)
    if not output_final_state:
        return o, None
    h_first, M_first = ht[: len(S_in), ..., :V], ht[: len(S_in), ..., V:]
    final_first = (M_first.double() @ S_in.double() + h_first.double()).to(state_dtype)
    final = torch.cat([final_first, ht[len(S_in):, ..., :V]])
    return o, final[layout.ends_here]


# ----------------------------------------------------------------------------------------------------
# All-to-all (head parallel)

def _sequence_to_heads(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[B, L, X, D] (this rank's tokens, all heads) -> [B, C L, X / C, D] (all tokens, this rank's heads)."""
    C = group_size(group)
    B, L, X, D = x.shape
    send = x.reshape(B, L, C, X // C, D).permute(2, 0, 1, 3, 4).contiguous()  # [dest rank, B, L, X / C, D]
    recv = torch.empty_like(send)  # [source rank, B, L, X / C, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, C * L, X // C, D)


def _heads_to_sequence(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """The inverse of _sequence_to_heads: [B, C L, X / C, D] -> [B, L, X, D]."""
    C = group_size(group)
    B, T, Xc, D = x.shape
    send = x.reshape(B, C, T // C, Xc, D).transpose(0, 1).contiguous()  # [dest rank (time block), B, L, X / C, D]
    recv = torch.empty_like(send)  # [source rank (head group), B, L, X / C, D]
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // C, C * Xc, D)


class _AllToAll(torch.autograd.Function):
    """Sequence-sharded -> head-sharded (to_heads=True) or back; the backward is the other direction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return _sequence_to_heads(x, group) if to_heads else _heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return back(grad.contiguous(), ctx.group), None, None


def _all_to_all_rule(q, k, v, g, beta, cu_seqlens, layout: SliceLayout, group, scale, output_final_state, options):
    C, rank = group_size(group), group_rank(group)
    L, H, HV = q.shape[1], q.shape[2], v.shape[2]
    if H % C or HV % C:
        raise ValueError(f"--cp-comm-type all_to_all splits the heads across the {C} context-parallel ranks: the "
                         f"q/k heads ({H}) and value heads ({HV}) of a rank must be divisible by {C}; use "
                         "--cp-comm-type state_passing (any number of heads)")
    q, k, v = (_AllToAll.apply(t, group, True) for t in (q, k, v))
    g, beta = (_AllToAll.apply(t.unsqueeze(-1), group, True).squeeze(-1) for t in (g, beta))
    heads = slice(rank * HV // C, (rank + 1) * HV // C)
    options = {**options, **{name: options[name][heads] for name in ("A_log", "dt_bias")
                             if options.get(name) is not None}}
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, output_final_state=output_final_state,
                                      cu_seqlens=cu_seqlens, **options)
    o = _AllToAll.apply(o, group, False)
    if not output_final_state:
        return o, None
    # [N, HV / C, K, V] per rank -> every document's state over all heads; keep those ending on this rank.
    final = gather_from_sequence_parallel_region(final, group, dim=1)
    if cu_seqlens is None:
        return o, final[layout.ends_here]
    bounds = cu_seqlens.tolist()  # the non-empty documents whose last token is on this rank, as state passing does
    return o, final[[n for n in range(len(bounds) - 1)
                     if bounds[n] < bounds[n + 1] and rank * L < bounds[n + 1] <= (rank + 1) * L]]


# ----------------------------------------------------------------------------------------------------
# The op, the short convolution, and applying both to a model

def context_parallel_chunk_gated_delta_rule(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        group: ProcessGroup | None, comm_type: str = "state_passing", scale: float | None = None,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """chunk_gated_delta_rule over a sequence split across the CP group; this rank passes its slice.

    q, k: [B, L, H, K]; v: [B, L, HV, V]; g, beta: [B, L, HV] (the rank's L tokens of every row, or of the packed
    row with B == 1); cu_seqlens: the WHOLE packed sequence's offsets (0 ... C L), the same on every rank;
    options: those of chunk_gated_delta_rule (fused gate and beta, L2 norm, backend). Returns (o [B, L, HV, V],
    final_state): with output_final_state, the final state [n, HV, K, V] of each of the n sequences that end on
    this rank (rows end on the last rank). Every rank of the group must call it (it communicates).
    """
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}; got {comm_type!r}")
    if initial_state is not None:
        raise ValueError("context parallelism does not take an initial state: it is for training on long sequences; "
                         "continue a sequence from a cache (generation) with a single-process model")
    layout = slice_layout(cu_seqlens, q.shape[1], group_rank(group), group_size(group), q.shape[0])
    if comm_type == "all_to_all":
        return _all_to_all_rule(q, k, v, g, beta, cu_seqlens, layout, group, scale, output_final_state, options)
    return _state_passing_rule(q, k, v, g, beta, layout, group, scale, output_final_state, options)


class ContextParallelDeltaRule(nn.Module):
    """The delta-rule op a GatedDeltaNet layer runs under context parallelism (its `context_parallel_op`)."""

    def __init__(self, group: ProcessGroup | None, comm_type: str = "state_passing") -> None:
        super().__init__()
        if comm_type not in CP_COMM_TYPES:
            raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}; got {comm_type!r}")
        self.group, self.comm_type = group, comm_type

    def forward(self, q, k, v, g, beta, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        return context_parallel_chunk_gated_delta_rule(q, k, v, g, beta, self.group, self.comm_type, **kwargs)

    def extra_repr(self) -> str:
        return f"size={group_size(self.group)}, comm_type={self.comm_type}"


class _HaloExchange(torch.autograd.Function):
    """Forward: the previous rank's tail (its last W - 1 inputs; zeros on the first rank).
    Backward: the gradient of the halo goes back to the previous rank, onto its tail."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        rank = group_rank(group)
        gathered = _gather_ranks(tail, group)  # tiny (W - 1 tokens): an all-gather is as fast as a send/recv pair
        return gathered[rank - 1] if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, world = group_rank(ctx.group), group_size(ctx.group)
        gathered = _gather_ranks(grad, ctx.group)
        return (gathered[rank + 1] if rank < world - 1 else torch.zeros_like(grad)), None


class ContextParallelShortConvolution(ShortConvolution):
    """The short convolution of a rank's slice: the previous rank's last conv_size - 1 inputs are its `past`.

    Holds the same parameters as the convolution it replaces (names and tensors), so state dicts and the
    optimizer see no difference.
    """

    @classmethod
    def replacing(cls, conv: ShortConvolution, group: ProcessGroup | None) -> "ContextParallelShortConvolution":
        new = cls(conv.weight.shape[0], conv.kernel_size, bias=False, backend=conv.backend,
                  l2norm_head_dim=conv.l2norm_head_dim)
        new.weight, new.bias, new.group = conv.weight, conv.bias, group
        return new

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                output_final_state: bool = True,
                shared_gradient: SharedGradient | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if past is not None:
            raise ValueError("context parallelism cannot continue from a cache (generation): generate with a "
                             "single-process model")
        B, L, D = x.shape
        W = self.kernel_size
        if L < W - 1:
            raise ValueError(f"a context-parallel slice of {L} tokens is shorter than the short convolution's "
                             f"halo ({W - 1} tokens): use fewer context-parallel ranks or longer sequences")
        layout = slice_layout(cu_seqlens, L, group_rank(self.group), group_size(self.group), B)
        halo = _HaloExchange.apply(x[:, L - (W - 1):], self.group) if W > 1 else None
        # The relative offsets start the first document where it truly starts (up to W - 1 tokens back in the
        # halo); taps that reach before it are cut, as at any document start.
        return super().forward(x, halo, layout.relative_cu_seqlens, output_final_state, shared_gradient)


def _refuse_generation_and_labels(module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    if call.get("use_cache") or call.get("past_key_values") is not None:
        raise ValueError("context parallelism splits a sequence for training: generation (use_cache, a cache, the "
                         "fused recurrent decoding) runs on a single-process model")
    if call.get("labels") is not None:
        raise ValueError("a context-parallel model holds a slice of the sequence, so it cannot shift labels itself: "
                         "call it without labels and compute the loss with the targets of the same slice")


def apply_context_parallel(model: nn.Module, group: ProcessGroup | None,
                           comm_type: str = "state_passing") -> nn.Module:
    """Make every GatedDeltaNet layer of a plain (or tensor-parallel) model run across the CP group, in place.

    The layers' short convolutions become ContextParallelShortConvolution (same parameters) and their delta rule
    becomes ContextParallelDeltaRule; the model then refuses labels and generation. Raises ValueError for
    a layer configured for the fused recurrent mode.
    """
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {CP_COMM_TYPES}; got {comm_type!r}")
    layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    for layer in layers:
        if layer.mode != "chunk":
            raise ValueError(f"context parallelism runs the chunked delta rule, but a layer is in mode {layer.mode!r}: "
                             "train with attn_mode='chunk' (the fused recurrent mode is for decoding)")
    for layer in layers:
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            if isinstance(getattr(layer, name, None), ShortConvolution):
                setattr(layer, name, ContextParallelShortConvolution.replacing(getattr(layer, name), group))
        layer.context_parallel_op = ContextParallelDeltaRule(group, comm_type)
    model.register_forward_pre_hook(_refuse_generation_and_labels, with_kwargs=True)
    return model
