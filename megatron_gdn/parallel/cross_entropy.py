"""Cross entropy over vocabulary-sharded logits, without ever forming the full logits (Megatron's algorithm).

Each rank holds logits [..., V / TP] for its contiguous vocabulary range. Per token:
    m    = max over all ranks of the local max                   (all-reduce MAX)
    z_t  = logit of the target, from the rank whose range has it (all-reduce SUM, zeros elsewhere)
    s    = sum over all ranks of sum exp(logit - m)              (all-reduce SUM)
    loss = log s - (z_t - m)
Backward: softmax on every rank, minus one at the target on the rank that owns it. Three all-reduces
of [...]-sized tensors per call. It is exact, not an approximation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

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
