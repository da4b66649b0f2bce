"""The data-parallel engine under the training loop: one interface, two implementations.

    engine.set_lr(lr)
    for each micro batch:  loss = lm_loss(engine.model, batch, ...); engine.backward(loss)
    queued = engine.step(loss)                  # QueuedStep: the update is queued on the device
    result = queued.read()                      # StepResult: loss over DP x CP, applied?, grad norm, fp16 scale
    engine.save(root, iteration, client_state)  # collective
    state = engine.read_checkpoint(root, iteration, load_optimizer); engine.load_state(state, load_optimizer)

BuiltinDataParallel (no --zero-stage, or --zero-stage 0): every rank keeps the whole fp32 model and optimizer;
after the micro batches the gradients are summed over TP where a weight is replicated and averaged over DP x CP
(parallel/grads.py), clipped by the TP-aware global norm (inside the fused AdamW, which divides each gradient as it
reads it; fp16 clips in place after unscaling), and AdamW steps. This is ZeRO stage 0.

DeepSpeedDataParallel (--zero-stage 1, 2, 3 or --deepspeed-config): DeepSpeed's engine partitions the optimizer
state (1), also the gradients (2), also the parameters (3) over the DP x CP ranks (parallel/mpu.py), and owns
gradient accumulation, reduction, clipping and bf16/fp16 (bf16 or fp16 parameters with fp32 master weights,
fp16 dynamic loss scaling). Gradients of TP-replicated weights are summed over TP by a hook as they are produced,
before DeepSpeed reduces or partitions them.

Why stage 0 is the built-in path and not DeepSpeed's engine without ZeRO: that engine accumulates bf16 gradients
in bf16 (fp32 accumulation needs ZeRO), applies an fp32 update even when the gradient is not finite, and reports
no gradient norm; the built-in path has none of these problems and is what stage 0 means (replicated optimizer,
all-reduced gradients).

Non-finite steps: the built-in path skips the update when the loss (on any rank) or the global gradient norm is not
finite (fp16: the GradScaler skips and lowers the scale). It decides on the device: the fused AdamW takes the skip
flag as its `found_inf` tensor (the attribute GradScaler sets for fused optimizers) and leaves weights, moments and
step counts alone where it is 1. So the whole step, the update included, is queued without waiting for the GPU, and
step() returns a QueuedStep whose read() waits for it and gives the loss, the norm and the flag. The results are
copied to page-locked host memory behind the update, and read() waits on an event recorded after that copy, not
for the device's whole queue. The training loop reads an iteration's results only after it has queued the next
iteration, except where it logs, evaluates, saves or exits: so the GPU runs the next iteration while the host reads
this one and prepares the batch after. (The step used to wait twice before the update, on the loss and on the
norm, and the GPU idled while the host launched what followed each wait; until session 20 read() copied the results
when it was called, behind the next iteration's work, and the GPU idled while the host prepared the batch after.)
DeepSpeed's ZeRO optimizers skip a step whose gradient norm is not finite by themselves (fp16: loss-scale overflow;
bf16/fp32: invalid norm), and `was_step_applied()` says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import TrainingConfig
from ..models.fused_projection import (ACCUMULATE_IN_PRODUCT, CAST_BY_OPTIMIZER, OVERWRITE_IN_PRODUCT,
                                       overwritten_by_product)
from ..parallel.grads import (all_reduce_found_inf, clip_divisor, clip_grad_norm, finalize_model_grads,
                              global_grad_norm)
from ..parallel.mpu import ModelParallelUnit, mark_tensor_parallel_parameters
from ..parallel.sharding import rule_for
from ..parallel.state import ParallelGroups, group_size
from .checkpointing import (CheckpointError, begin_save, commit_save, fsync_path, iteration_dir, load_checkpoint,
                            read_tracker, save_checkpoint, tensor_parallel_mismatch)
from .optimizer import build_optimizer, optimizer_param_names, parameter_groups


@dataclass
class StepResult:
    loss: float                  # the iteration's loss averaged over DP x CP (each CP rank's: its slice's tokens)
    loss_is_finite: bool         # on every rank
    applied: bool                # the optimizer updated the weights
    grad_norm: float             # global L2 norm of the gradient before clipping (inf/nan when not finite)
    loss_scale: float | None     # the fp16 loss scale after the step, None without --fp16


@dataclass
class QueuedStep:
    """An iteration whose update is queued; read() waits for its results (a host sync) and gives them."""

    values: torch.Tensor                    # fp64 [loss, loss not finite, update skipped, gradient norm]
    loss_scale: torch.Tensor | None = None  # fp16: the loss scale after the step, else None
    copied: torch.cuda.Event | None = None  # on a GPU: recorded after values and loss_scale were copied to the host

    @classmethod
    def to_host(cls, values: torch.Tensor, loss_scale: torch.Tensor | None = None) -> QueuedStep:
        """Device results copied to page-locked host memory behind the work queued so far, with an event after the
        copies: read() then waits for this iteration only. (Read from the device, they would be copied when read()
        is called, behind whatever was queued since: the next iteration, which the device would finish and then
        idle while the host prepared the one after.) CPU tensors as they are."""
        if values.device.type != "cuda":
            return cls(values, loss_scale)
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in (values, loss_scale)]
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(values.device))
        return cls(*host, copied)

    def read(self) -> StepResult:
        if self.copied is not None:
            self.copied.synchronize()
        loss, loss_not_finite, skipped, grad_norm = self.values.tolist()
        scale = None if self.loss_scale is None else float(self.loss_scale)
        return StepResult(loss, not loss_not_finite, not skipped, grad_norm, scale)


def reduce_loss(loss: torch.Tensor, groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """On the loss's device, without a host sync: this rank's loss averaged over DP x CP (fp64), and 1.0 if any
    rank's loss is not finite, else 0.0 (fp32; the maximum over every rank, so that all of them agree)."""
    loss = loss.detach().double().clone()
    group = groups.data_context_parallel_group
    if group_size(group) > 1:
        dist.all_reduce(loss, group=group)
        loss /= group_size(group)
    not_finite = (~torch.isfinite(loss)).float()
    if group_size(None) > 1:
        dist.all_reduce(not_finite, op=dist.ReduceOp.MAX)
    return loss, not_finite


class BuiltinDataParallel:
    """ZeRO stage 0 without DeepSpeed (see the module docstring)."""

    zero_stage = 0

    def __init__(self, model: nn.Module, cfg: TrainingConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.model = self.module = model
        self.cfg, self.groups = cfg, groups
        # This engine reads the gradients only from .grad, after backward: the plain projections' weight-gradient
        # products may add each micro batch's gradient into .grad themselves (models/fused_projection.py).
        # Its optimizer (TritonAdamW) also keeps the bf16 copies of the weights that the fused products cast
        # current, so that the forward reuses them instead of casting every weight for every micro batch.
        # Under --cuda-graph the gradients stay allocated between steps (the graph writes them); with one micro batch
        # a step the products may write theirs over the last step's, which then need no zeroing.
        self.num_micro_batches = cfg.global_batch_size // (cfg.micro_batch_size * groups.data_parallel_size)
        overwrite = cfg.cuda_graph and self.num_micro_batches == 1
        for param in model.parameters():
            setattr(param, ACCUMULATE_IN_PRODUCT, not cfg.no_gradient_accumulation_fusion)
            setattr(param, OVERWRITE_IN_PRODUCT, overwrite)
            setattr(param, CAST_BY_OPTIMIZER, True)
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                         cfg.adam_eps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's mean loss, scaled to its share of the global batch."""
        self.scaler.scale(loss / self.num_micro_batches).backward()

    def step(self, loss: torch.Tensor) -> QueuedStep:
        """loss: this rank's loss of the iteration, on the device. Queues the reductions, the clipping and the
        update without waiting for the device."""
        tp_group = self.groups.tensor_model_parallel_group
        # Sum the partial gradients of replicated weights over TP, average everything over DP x CP (each CP
        # rank's gradients are those of its slice's tokens).
        finalize_model_grads(self.model, tp_group, self.groups.data_context_parallel_group, self.cfg.sequence_parallel)
        loss, loss_not_finite = reduce_loss(loss, self.groups)
        self.scaler.unscale_(self.optimizer)
        all_reduce_found_inf(self.scaler, self.optimizer, tp_group)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        if self.scaler.is_enabled():  # fp16: GradScaler.step sets the optimizer's grad_scale itself: clip in place
            grad_norm = clip_grad_norm(self.model, max_norm, tp_group)
        else:
            grad_norm = global_grad_norm(self.model, tp_group)
        grad_norm = grad_norm.to(loss.device)
        # Skip the update rather than poison the weights (fp16: the scaler also lowers the scale).
        skip = torch.maximum(loss_not_finite, (~torch.isfinite(grad_norm)).float())
        if self.scaler.is_enabled():  # fp16: the scaler hands its overflow flags to the fused AdamW as found_inf
            for found_inf in self.scaler._found_inf_per_device(self.optimizer).values():
                torch.maximum(found_inf, skip.to(found_inf.device), out=found_inf)
            self.scaler.step(self.optimizer)
        else:
            # The fused AdamW skips the update where found_inf is 1, and divides each gradient by grad_scale as it
            # reads it: the clipping costs no pass of its own over the gradients.
            self.optimizer.found_inf = skip
            self.optimizer.grad_scale = clip_divisor(grad_norm, max_norm) if max_norm < math.inf else None
            self.optimizer.step()
            del self.optimizer.found_inf, self.optimizer.grad_scale
        self.scaler.update()
        if self.cfg.cuda_graph:  # the captured backward writes into these very tensors (training/cuda_graph.py)
            stale = [p.grad for p in self.model.parameters() if p.grad is not None and not overwritten_by_product(p)]
            if stale:
                torch._foreach_zero_(stale)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        values = torch.stack([loss, loss_not_finite.double(), skip.double(), grad_norm.double()])
        # fp16 (a GPU): the scaler updates its scale tensor in place at every step; the copy to the host, queued now,
        # takes this step's value (get_scale() would sync)
        scale = self.scaler._get_scale_async() if self.cfg.fp16 else None
        return QueuedStep.to_host(values, scale)

    def save(self, root: str, iteration: int, client_state: dict) -> None:
        """Every rank calls it; DP (and CP) rank 0 of each TP rank writes that rank's file."""
        save_checkpoint(root, iteration, {
            **client_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "optimizer_param_names": optimizer_param_names(self.model, self.optimizer)},
            tensor_parallel_rank=self.groups.tensor_model_parallel_rank,
            write=self.groups.data_parallel_rank == 0 and self.groups.context_parallel_rank == 0)

    def read_checkpoint(self, root: str, iteration: int | None, load_optimizer: bool) -> dict | None:
        """This TP rank's checkpoint state (a ZeRO checkpoint is consolidated into the same format)."""
        return load_checkpoint(root, iteration, self.groups.tensor_model_parallel_rank,
                               self.groups.tensor_model_parallel_size)

    def load_state(self, state: dict, load_optimizer: bool) -> None:
        load_model_state(self.model, state["model"], state.get("iteration"))
        if load_optimizer:
            saved = optimizer_state(state)
            # A checkpoint's param groups carry the implementation flags of the optimizer that wrote it (an older
            # run's unfused AdamW, a consolidated ZeRO state), and load_state_dict would take them over: keep ours,
            # fused, which step() relies on to skip an update on the device (and which puts AdamW's step counts on
            # the parameters' device as they load).
            flags = [{key: group[key] for key in ("fused", "foreach")} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict({**saved, "param_groups": [
                {**group, **flag} for group, flag in zip(saved["param_groups"], flags)]})
            if "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])


def optimizer_state(state: dict) -> dict:
    if "optimizer" not in state:
        raise CheckpointError(f"the checkpoint of iteration {state.get('iteration')} holds no optimizer state (a "
                              f"converted or exported model?): start from it with --finetune or --no-load-optim")
    return state["optimizer"]


def load_model_state(model: nn.Module, weights: dict, iteration) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint of iteration {iteration} does not fit the model: "
                              f"{str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO 1-3

def _sum_over_tensor_parallel(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


class _DictOutput(dict):
    """The model's output as a dict, still read as out.logits. DeepSpeed hooks its backward pre-processing (which,
    among others, clears the bf16 optimizer's gradients between micro batches) onto the tensors of the forward's
    output, and it looks inside tensors, tuples, lists and dicts only, not inside our CausalLMOutput dataclass."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _output_as_dict(module: nn.Module, args, output):
    return _DictOutput((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))


class DeepSpeedDataParallel:
    """ZeRO stage 1-3 through DeepSpeed's engine (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainingConfig, groups: ParallelGroups, device: torch.device,
                 ds_config: dict) -> None:
        import deepspeed

        self.cfg, self.groups, self.ds_config = cfg, groups, ds_config
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.mpu = ModelParallelUnit(groups)
        mark_tensor_parallel_parameters(model)
        if groups.tensor_model_parallel_size > 1:
            # Each TP rank computes only its heads' (or tokens') part of a replicated weight's gradient. The sum
            # must happen before DeepSpeed reduces and partitions the gradient, so it is a hook on the parameter
            # (it runs before the gradient is accumulated into .grad, on every micro batch).
            for name, param in model.named_parameters():
                if rule_for(name).needs_grad_all_reduce(cfg.sequence_parallel):
                    param.register_hook(partial(_sum_over_tensor_parallel, group=groups.tensor_model_parallel_group))
        model.register_forward_hook(_output_as_dict)
        param_groups = parameter_groups(model, cfg.weight_decay)
        if "optimizer" in ds_config:  # DeepSpeed builds it (e.g. FusedAdam) from our two parameter groups
            optimizer = None
            ds_config["optimizer"].setdefault("params", {}).update(
                lr=cfg.lr, betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        else:
            fused = device.type == "cuda" or None
            optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                          eps=cfg.adam_eps, fused=fused)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=param_groups if optimizer is None else None,
            config=ds_config, mpu=self.mpu, dist_init_required=False)
        self.model = self.engine  # forward through the engine: ZeRO-3 gathers parameters in its hooks
        self.module = model
        # What must match for DeepSpeed's own loader to take a checkpoint as it is (else it is consolidated).
        self.layout = {"zero_stage": self.zero_stage, "data_parallel_size": self.mpu.get_data_parallel_world_size(),
                       "precision": "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"}

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's mean loss (DeepSpeed divides it by the accumulation steps). DeepSpeed
        counts micro batches in step(): before the last one of the iteration, step() only advances the count."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, loss: torch.Tensor) -> QueuedStep:
        """DeepSpeed's optimizers wait for the device inside their step: the results are read here already."""
        loss, loss_not_finite = (x.item() for x in reduce_loss(loss, self.groups))
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        skipped = not self.engine.was_step_applied()
        scale = torch.tensor(float(self.engine.optimizer.cur_scale)) if self.cfg.fp16 else None
        return QueuedStep(torch.tensor([loss, loss_not_finite, skipped, norm], dtype=torch.float64), scale)

    # Checkpoints ----------------------------------------------------------------------------------

    def save(self, root: str, iteration: int, client_state: dict) -> None:
        """Collective. DeepSpeed writes every rank's partition into the temporary directory, each rank flushes
        its files, and checkpointing.commit_save renames the directory into place and writes the tracker."""
        partial_path = begin_save(root, iteration)
        self.engine.save_checkpoint(str(partial_path.parent), tag=partial_path.name, save_latest=False,
                                    client_state={**client_state, "deepspeed_layout": self.layout})
        tp, dp = self.groups.tensor_model_parallel_rank, self.mpu.get_data_parallel_rank()
        for path in partial_path.iterdir():  # the files this rank wrote: its partition, and DP rank 0 the module
            if f"mp_rank_{tp:02d}" in path.name and (f"zero_pp_rank_{dp}_" in path.name or
                                                     (dp == 0 and not path.name.startswith(("zero", "bf16")))):
                fsync_path(path)
        commit_save(root, iteration)

    def read_checkpoint(self, root: str, iteration: int | None, load_optimizer: bool) -> dict | None:
        """This TP rank's checkpoint state. A ZeRO checkpoint of this run's layout (stage, DP x CP size,
        precision) is left to DeepSpeed's loader (its own partition only); anything else (another layout, a
        built-in checkpoint, --finetune / --no-load-optim) is consolidated to full fp32 state first."""
        from .zero_checkpoint import check_deepspeed_pickles, deepspeed_layout, is_deepspeed_checkpoint, \
            read_client_state

        if iteration is None:
            iteration = read_tracker(root)
            if iteration is None:
                return None
        directory = iteration_dir(root, iteration)
        tp_rank, tp = self.groups.tensor_model_parallel_rank, self.groups.tensor_model_parallel_size
        if is_deepspeed_checkpoint(directory):
            saved_tp = deepspeed_layout(directory)["tensor_parallel_size"]
            if saved_tp != tp:
                raise CheckpointError(tensor_parallel_mismatch(root, saved_tp, tp))
            client = read_client_state(directory, tp_rank)
            if load_optimizer and client.get("deepspeed_layout") == self.layout:
                check_deepspeed_pickles(directory)
                return {"iteration": iteration, **client, "deepspeed_checkpoint": str(directory)}
        return load_checkpoint(root, iteration, tp_rank, tp)

    def load_state(self, state: dict, load_optimizer: bool) -> None:
        if "deepspeed_checkpoint" in state:  # same layout: DeepSpeed reads this rank's partition as it wrote it
            directory = Path(state["deepspeed_checkpoint"])
            path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {directory}")
            return
        self._load_full_state(state, load_optimizer)

    def _load_full_state(self, state: dict, load_optimizer: bool) -> None:
        """Put a full (unpartitioned) fp32 state into the partitioned engine: the working weights (bf16/fp16 or
        fp32) into the module, the fp32 master weights and the Adam moments into this rank's partitions."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        weights = state["model"]
        params = dict(self.module.named_parameters())  # tied weights appear once
        missing = sorted(set(params) - set(weights))
        unexpected = sorted(set(weights) - set(self.module.state_dict()))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint of iteration {state.get('iteration')} does not fit the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, param in params.items():
            if tuple(weights[name].shape) != tuple(getattr(param, "ds_shape", param.shape)):
                raise CheckpointError(f"checkpoint of iteration {state.get('iteration')} does not fit the model: "
                                      f"{name} is {tuple(weights[name].shape)} there and "
                                      f"{tuple(getattr(param, 'ds_shape', param.shape))} here")
        self._set_working_weights(params, weights)
        moments, step = {}, None
        if load_optimizer:
            names = state["optimizer_param_names"]
            for index, entry in optimizer_state(state)["state"].items():
                moments[names[int(index)]] = entry
                step = entry["step"]
            if step is not None:
                self._create_adam_state(float(step))
        for name, param in params.items():
            safe_set_full_fp32_param(param, weights[name].float().to(self.engine.device))
            for key in ("exp_avg", "exp_avg_sq"):
                if name in moments:
                    safe_set_full_optimizer_state(param, moments[name][key].float().to(self.engine.device), key)

    def _set_working_weights(self, params: dict[str, nn.Parameter], weights: dict) -> None:
        import deepspeed

        with torch.no_grad():
            if self.zero_stage == 3:  # gather, overwrite identically on every rank, re-partition from DP rank 0
                with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    for name, param in params.items():
                        param.copy_(weights[name])
            else:
                for name, param in params.items():
                    param.copy_(weights[name])

    def _create_adam_state(self, step: float) -> None:
        """AdamW creates its state at the first step; a resumed partitioned optimizer needs it before that, to
        receive the moments. Zeros here, filled by safe_set_full_optimizer_state."""
        zero_optimizer = self.engine.optimizer
        inner = zero_optimizer.optimizer
        if self.zero_stage == 3:
            flats = list(zero_optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [p for group in inner.param_groups for p in group["params"]]
        on_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
        for flat in flats:
            inner.state[flat] = {"step": torch.tensor(step, dtype=torch.float32,
                                                      device=flat.device if on_device else "cpu"),
                                 "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        if self.zero_stage != 3:
            # ZeRO 1/2 link each parameter to its slice of the flat optimizer state lazily, after the first
            # step (DeepSpeed's private hook; safe_set_full_optimizer_state needs the link).
            zero_optimizer._lazy_init_hp_params_optimizer_state()
