"""AdamW with Megatron's weight-decay rule."""

from __future__ import annotations

import torch

from ..models.fused_projection import COMPUTE_COPY

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


class TritonAdamW(torch.optim.AdamW):
    """torch's fused AdamW, whose step runs kernels/adamw.py where every parameter and gradient of a group is a
    contiguous, 16-byte aligned fp32 CUDA tensor (the built-in engine's: fp32 weights and gradients): one launch per
    group, no write of the divided gradient. Elsewhere (CPU, other dtypes, amsgrad, maximize, a tensor lr) torch's
    fused step.

    Same state (step, exp_avg, exp_avg_sq per parameter, created as torch's fused AdamW creates them) and state_dict,
    so checkpoints go both ways; it honours found_inf and grad_scale as torch's fused step does (the attributes
    the engine and GradScaler set). use_triton: None decides by the above, True forces the kernel (the CPU tests
    run it in Triton's interpreter).

    A parameter with a bf16 compute copy (models/fused_projection.py, COMPUTE_COPY) gets it overwritten by the
    kernel with the updated weight; torch's step does not update it, so there the parameter's version is bumped and
    the forward casts the weight again."""

    def __init__(self, params, use_triton: bool | None = None, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.use_triton = use_triton
        self._tables: dict[int, tuple] = {}  # group index -> (key, kernel tables)
        self._grad_tables: dict[int, tuple] = {}

    def _takes_triton(self) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        # 16-byte aligned: the kernel loads and stores 16 bytes at a time (a view at an odd offset is not)
        return all(p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() and p.data_ptr() % 16 == 0 and
                   (p.grad is None or (p.grad.dtype == torch.float32 and p.grad.is_contiguous() and
                                       p.grad.data_ptr() % 16 == 0 and not p.grad.is_sparse)) and
                   all(t.data_ptr() % 16 == 0 for t in self.state.get(p, {}).values() if t.ndim > 0) and
                   not group["amsgrad"] and not group["maximize"] and not isinstance(group["lr"], torch.Tensor)
                   for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._takes_triton():
            result = super().step(closure)
            # torch's fused step writes the weights without bumping their versions: bumped here, so that the
            # compute copies it did not update are cast again (models/fused_projection.py, compute_weight)
            for group in self.param_groups:
                for p in group["params"]:
                    if getattr(p, COMPUTE_COPY, None) is not None:
                        torch.autograd.graph.increment_version(p)
            return result
        from ..kernels import adamw
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        grad_scale = grad_scale.float() if grad_scale is not None else None  # the kernel divides in fp32
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:  # as torch's fused AdamW creates it: the step count an fp32 tensor on the device
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            copies = [compute_copy(p) for p in params]
            key = tuple((p.numel(), *(t.data_ptr() for t in (p, s["exp_avg"], s["exp_avg_sq"], s["step"])),
                         c.data_ptr() if c is not None else 0) for p, s, c in zip(params, states, copies))
            if self._tables.get(index, (None,))[0] != key:  # new parameters, state (a load) or copies: new tables
                self._tables[index] = (key, adamw.group_tables(params, [s["exp_avg"] for s in states],
                                                               [s["exp_avg_sq"] for s in states], steps, copies))
            grad_key = tuple(p.grad.data_ptr() for p in params)  # new when the gradients were set to None
            if self._grad_tables.get(index, (None,))[0] != grad_key:
                self._grad_tables[index] = (grad_key, adamw.addresses([p.grad for p in params]))
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            adamw.adamw_step(self._tables[index][1], self._grad_tables[index][1], group["lr"], beta1, beta2,
                             group["eps"], group["weight_decay"], grad_scale, found_inf)
            if found_inf is not None:  # a skipped step does not count (torch's fused AdamW undoes it the same way)
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
        return None


def compute_copy(p: torch.Tensor) -> torch.Tensor | None:
    """p's bf16 compute copy for the kernel to write (COMPUTE_COPY), if it has a usable one: as many elements, 16-byte
    aligned. One it cannot write is made stale (p's version bumped), so the forward casts p again."""
    copy = getattr(p, COMPUTE_COPY, None)
    if copy is None:
        return None
    if (copy.dtype == torch.bfloat16 and copy.is_contiguous() and copy.numel() == p.numel()
            and copy.data_ptr() % 16 == 0):
        return copy
    torch.autograd.graph.increment_version(p)
    return None


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    # Fused on CPU too: the built-in engine skips a non-finite step through the fused kernel's found_inf
    return TritonAdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each index of optimizer.state_dict() (its ids number the parameters of the
    groups in order). Saved in checkpoints so tools can split and merge optimizer state by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
