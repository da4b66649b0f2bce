"""Cross entropy over vocabulary-sharded logits, without ever forming the full logits (Megatron's algorithm).

Each rank holds logits [..., V / TP] for its contiguous vocabulary range. Per token:
    m    = max over all ranks of the local max                   (all-reduce MAX)
    z_t  = logit of the target, from the rank whose range has it (all-reduce SUM, zeros elsewhere)
    s    = sum over all ranks of sum exp(logit - m)              (all-reduce SUM)
    loss = log s - (z_t - m)
Backward: softmax on every rank, minus one at the target on the rank that owns it. Three all-reduces
of [...]-sized tensors per call. It is exact, not an approximation.

fused_linear_cross_entropy goes one step further and never forms the logits of the whole batch: it takes the
hidden states and the lm head's rows and works through the tokens in chunks (kernels/cross_entropy.py, on GPU).
lm_head_cross_entropy applies it to a model's lm head, plain or column-parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from ..kernels import _triton_module
from .layers import ColumnParallelLinear, enter_tensor_parallel_region
from .state import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None,
                ignore_index: int) -> torch.Tensor:
        logits = logits.float()
        local_vocab = logits.shape[-1]
        vocab_start = group_rank(group) * local_vocab
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        owned = (local_target >= 0) & (local_target < local_vocab)  # ignore_index (< 0) is never owned
        local_target = local_target.masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, owned, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, owned, valid = ctx.saved_tensors
        grad_loss = grad_loss.masked_fill(~valid, 0.0)
        grad = softmax * grad_loss.unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(grad_loss * owned).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy (fp32, shape of target; 0 where target == ignore_index).

    logits: [..., V / TP], this rank's contiguous slice of the vocabulary; target: [...] global token ids.
    On a group of one this is F.cross_entropy (its fused kernel), so single-GPU runs are unchanged.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on the leading dims")
    if group_size(group) == 1:
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none")
        return flat.view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               group: ProcessGroup | None = None, ignore_index: int = -100, reduction: str = "mean",
                               chunk_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """The cross entropy of the logits hidden @ weight^T, reduced to a scalar: 'sum' over the tokens, or 'mean'
    over the non-ignored ones (0 when all are ignored). Ignored tokens (target == ignore_index) add nothing.

    hidden: [..., h], the full sequence on every rank of the TP group (inside its TP region); weight: this rank's
    contiguous vocabulary rows [V / TP, h]; target: [...] global token ids; group: the TP group holding the other
    rows (None: weight is the whole vocabulary, nothing is communicated). With backend 'auto' on CUDA tensors
    the chunked Triton op (kernels/cross_entropy.py): no fp32 logits, and at most chunk_size tokens' logits at a
    time; it computes the gradients in the forward, hence the scalar. Otherwise the reference: F.linear, then
    F.cross_entropy (vocab_parallel_cross_entropy over a group of several ranks). The gradient of hidden is this rank's partial one (enter the TP region first,
    as lm_head_cross_entropy does).
    """
    if hidden.shape[:-1] != target.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden [..., h] {tuple(hidden.shape)}, weight [V, h] {tuple(weight.shape)} and target "
                         f"[...] {tuple(target.shape)} do not fit together")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (the op computes its gradients in the forward); "
                         f"got {reduction!r}")
    kernel = _triton_module("cross_entropy", hidden, backend)
    world = 1 if group is None else group_size(group)
    if kernel is None:
        logits = F.linear(hidden, weight)
        if world == 1:
            loss = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                                   reduction="sum")
        else:
            loss = vocab_parallel_cross_entropy(logits, target, group, ignore_index).sum()
        return loss if reduction == "sum" else loss / (target != ignore_index).sum().clamp(min=1)
    return kernel.linear_cross_entropy_triton(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                              group_rank(group) * weight.shape[0] if world > 1 else 0,
                                              group if world > 1 else None, ignore_index, reduction, chunk_size)


def lm_head_cross_entropy(lm_head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """fused_linear_cross_entropy through a model's lm head: an nn.Linear, or the ColumnParallelLinear that
    parallelize_model puts there (a plain head holds the whole vocabulary: no communication). The latter's input
    enters its TP region as the layer's own forward would (a copy, or the all-gather of the sequence under
    sequence parallelism), so the ranks' partial gradients of hidden are summed in backward.
    target: [...] for the full sequence, as for the logits lm_head(hidden).
    """
    group = None
    if isinstance(lm_head, ColumnParallelLinear):
        if lm_head.gather_output:
            raise ValueError("lm_head_cross_entropy needs the vocabulary-parallel lm head (gather_output=False)")
        group = lm_head.group
        if lm_head.communicate_input:
            hidden = enter_tensor_parallel_region(hidden, group, lm_head.sequence_parallel)
    return fused_linear_cross_entropy(hidden, lm_head.weight, target, group, ignore_index, reduction,
                                      backend=backend)
