"""AdamW with Megatron's weight-decay rule."""

from __future__ import annotations

import torch

# Parameters that are never decayed besides vectors: the GDN decay parameters are vectors too, but
# they are named here so that the rule survives any future change of their shape.
NO_DECAY_NAMES = ("A_log", "dt_bias")


def is_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases (all 1-D parameters) and A_log / dt_bias get no weight decay."""
    return param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two parameter groups: decayed weights, then the never-decayed ones (the order checkpoints use)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (no_decay if is_no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    # Fused on CPU too: the built-in engine skips a non-finite step through the fused kernel's found_inf
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=True)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each index of optimizer.state_dict() (its ids number the parameters of the
    groups in order). Saved in checkpoints so tools can split and merge optimizer state by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
