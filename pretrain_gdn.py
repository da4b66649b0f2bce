"""Pretrain a Gated DeltaNet language model: parse flags, build data and model, run the training loop.

Examples (see README.md and examples/ for more):

    # CPU smoke test on synthetic data
    python pretrain_gdn.py --model-size tiny --mock-data --vocab-size 1024 --seq-length 256 \
        --micro-batch-size 4 --train-iters 50 --lr 1e-3 --log-interval 1

    # one GPU, a preprocessed corpus (tools/preprocess_data.py), checkpoints every 1000 steps
    python pretrain_gdn.py --model-size small --bf16 --seq-length 4096 --micro-batch-size 8 \
        --global-batch-size 64 --train-iters 20000 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 500 \
        --data-path data/corpus_text_document --tokenizer-model tok.model \
        --save ckpt --load ckpt --save-interval 1000 --tensorboard-dir runs/small

    # tensor parallelism with sequence parallelism on 2 GPUs of one node (docs/PARALLELISM.md)
    torchrun --nproc-per-node 2 pretrain_gdn.py --model-size small --bf16 --tensor-model-parallel-size 2 \
        --sequence-parallel --mock-data --vocab-size 32000 --seq-length 4096 --micro-batch-size 4 --train-iters 100

    # data parallelism with DeepSpeed ZeRO-2 on 8 GPUs; the same under mpirun/srun (docs/DISTRIBUTED.md)
    torchrun --nproc-per-node 8 pretrain_gdn.py --model-size small --bf16 --zero-stage 2 ...
    mpirun -np 8 python pretrain_gdn.py --model-size small --bf16 --zero-stage 2 ...

Exit codes: 0 when training finished or saved and exited on request (SIGTERM/SIGUSR1, --exit-interval,
--exit-duration-in-mins); 2 for bad input (a one-line "error: ..." on stderr); 3 when --max-skipped-steps
consecutive steps had a non-finite loss or gradient; 4 when another rank died or stopped answering.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_gdn.config import TrainingConfig, parse_args
from megatron_gdn.data.mock_dataset import MockGPTDataset
from megatron_gdn.data.sampler import MegatronPretrainingSampler, collate, to_device
from megatron_gdn.data.tokenizer import padded_vocab_size
from megatron_gdn.kernels.tuned_configs import agree_on_tuned_configs, install_tuned_configs, tuned_configs
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.parallel import (ParallelGroups, all_reduce_scalar, barrier, check_tensor_parallel_config, get_rank,
                                   get_world_size, initialize_distributed, initialize_model_parallel, is_rank_zero,
                                   launched_world_size, model_parallel_rng_tracker, parallelize_model,
                                   lm_head_cross_entropy, print_rank_0, rank_grid, shutdown_distributed,
                                   vocab_parallel_cross_entropy)
from megatron_gdn.parallel.context_parallel import apply_context_parallel, check_context_parallel_config, split_sequence
from megatron_gdn.parallel.launch import consume_launcher_arguments, describe_topology, discover_launch_environment
from megatron_gdn.training.checkpointing import CheckpointError, check_model_config, saved_tensor_parallel_size
from megatron_gdn.training.cuda_graph import WARMUP_ITERATIONS, CudaGraphStep
from megatron_gdn.training.deepspeed_config import deepspeed_config_for, read_deepspeed_config, resolve_zero_stage
from megatron_gdn.training.engine import BuiltinDataParallel, DeepSpeedDataParallel, QueuedStep, StepResult
from megatron_gdn.training.flops import peak_flops, training_flops_per_token
from megatron_gdn.training.logging import (TensorBoardLogger, format_iteration_line, format_memory_line,
                                           format_validation_line)
from megatron_gdn.training.lr_schedule import LRSchedule
from megatron_gdn.training.recompute import apply_activation_recompute


# ----------------------------------------------------------------------------------------------------
# Data

def build_datasets(cfg: TrainingConfig) -> tuple[int, torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(tokenizer vocabulary size, train dataset, validation dataset) for --mock-data or --data-path.
    The model's vocabulary is this padded to a multiple of --make-vocab-size-divisible-by x TP (train()).

    Every rank calls this. With --data-path, rank 0 checks that the token ids of the .bin files fit the tokenizer,
    then builds the index cache (gpt_dataset.py) while the other ranks wait at a barrier and then load it."""
    num_train = cfg.train_iters * cfg.global_batch_size
    num_valid = (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * cfg.global_batch_size
    if cfg.mock_data:
        train = MockGPTDataset(num_train, cfg.seq_length, cfg.vocab_size, cfg.seed)
        valid = MockGPTDataset(num_valid, cfg.seq_length, cfg.vocab_size, cfg.seed, split=1)
        return cfg.vocab_size, train, valid
    from megatron_gdn.data.errors import DataError
    from megatron_gdn.data.gpt_dataset import build_train_valid_test_datasets, check_data_vocab
    from megatron_gdn.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(cfg.tokenizer_model)
    vocab_size = tokenizer.vocab_size
    # Data made with another tokenizer holds ids past the embedding table: an index error deep in the model on a
    # CPU, a device-side assert or a silent wrong row on a GPU. One pass over the .bin files on rank 0 says which
    # file instead. Rank 0 sends its verdict to every rank, so that all of them fail with its message and none
    # waits for it in a later collective.
    problem = [None]
    if is_rank_zero():
        print_rank_0(f"> checking that the token ids of --data-path fit the tokenizer's vocabulary of {vocab_size}")
        try:
            check_data_vocab(cfg.data_path, vocab_size)
        except DataError as error:
            problem = [str(error)]
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise DataError(problem[0])
    train, valid, _ = build_train_valid_test_datasets(
        cfg.data_path, cfg.split, cfg.seq_length, cfg.seed, (num_train, num_valid, 0),
        cfg.reset_state_at_eod, tokenizer.eod, is_rank_zero=is_rank_zero(), barrier=barrier)
    if train is None:
        raise ValueError(f"--split {cfg.split} leaves no training documents")
    return vocab_size, train, valid


def batches(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int = 0,
            data_parallel_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro batches (the ranks of a TP group share one and read the same)."""
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                         data_parallel_size)
    for indices in sampler:
        yield collate([dataset[i] for i in indices])


# ----------------------------------------------------------------------------------------------------
# Loss

def lm_loss(model: GatedDeltaNetForCausalLM, batch: dict[str, torch.Tensor], device: torch.device,
            autocast_dtype: torch.dtype | None, tensor_parallel_group=None, context_parallel_group=None,
            autocast_cache: bool = True) -> torch.Tensor:
    """Mean next-token cross entropy of one micro batch. Inputs are tokens[:, :-1], targets tokens[:, 1:];
    with document offsets the batch is packed into one row and the state restarts per document.
    Under tensor parallelism the logits are this rank's vocabulary slice (never gathered). Under context
    parallelism this rank takes its contiguous slice of every row (or of the packed row) of inputs and targets,
    the model gets the whole row's document offsets, and the loss is the mean over the slice: every rank holds
    as many tokens, so averaging it over the CP ranks gives the token-weighted mean of the whole batch.
    On GPUs the lm head is applied inside the fused cross entropy, chunk by chunk, so the logits of the whole batch
    never exist (kernels/cross_entropy.py); not under ZeRO-3, which gathers the partitioned head weight only for
    the head's own forward (DeepSpeed marks such parameters with ds_id). autocast_cache=False casts a weight at
    each use instead of caching its copy for the forward (what a CUDA graph needs: training/cuda_graph.py)."""
    tokens = to_device(batch["tokens"], device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        inputs, targets, cu_seqlens = inputs.reshape(1, -1), targets.reshape(1, -1), to_device(cu_seqlens, device)
    inputs, targets = split_sequence(inputs, context_parallel_group), split_sequence(targets, context_parallel_group)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                        cache_enabled=autocast_cache):
        if device.type == "cuda" and not hasattr(model.lm_head.weight, "ds_id"):
            hidden = model(inputs, cu_seqlens=cu_seqlens, return_hidden=True).last_hidden_state
            return lm_head_cross_entropy(model.lm_head, hidden, targets, reduction="sum") / targets.numel()
        logits = model(inputs, cu_seqlens=cu_seqlens).logits
    return vocab_parallel_cross_entropy(logits, targets.reshape(logits.shape[:-1]), tensor_parallel_group).mean()


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainingConfig, device, autocast_dtype, groups: ParallelGroups) -> float:
    """Mean validation loss over the first eval_iters global batches (the same batches every time)."""
    model.eval()
    losses = []
    dp = groups.data_parallel_size
    for step, batch in enumerate(batches(dataset, 0, cfg.micro_batch_size, groups.data_parallel_rank, dp)):
        if step == cfg.eval_iters * (cfg.global_batch_size // (cfg.micro_batch_size * dp)):
            break
        losses.append(lm_loss(model, batch, device, autocast_dtype, groups.tensor_model_parallel_group,
                              groups.context_parallel_group).item())
    model.train()
    cp = groups.context_parallel_size
    return all_reduce_scalar(sum(losses) / len(losses), groups.data_context_parallel_group) / (dp * cp)


# ----------------------------------------------------------------------------------------------------
# Random state (saved in every checkpoint so that a resumed run continues bit for bit)

def get_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(group) -> list[dict]:
    """Every DP x CP rank's random state, in group-rank order, for the checkpoint (each TP rank's file holds its
    DP x CP ranks'). They are equal unless something drew random numbers on one rank only."""
    states = [None] * (dist.get_world_size(group) if dist.is_initialized() else 1)
    if len(states) == 1:
        return [get_rng_state()]
    dist.all_gather_object(states, get_rng_state(), group=group)
    return states


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Parallelism (docs/PARALLELISM.md)

def check_parallel_layout(model_config: GatedDeltaNetConfig, cfg: TrainingConfig, world_size: int) -> None:
    """Raise ValueError, saying what to change, when the flags' TP x CP x DP layout cannot work on world_size
    processes (pure arithmetic: tests check the examples' flags with it)."""
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    check_context_parallel_config(model_config, cp, cfg.cp_comm_type, cfg.seq_length, tp, cfg.sequence_parallel)
    check_tensor_parallel_config(model_config, tp)
    rank_grid(world_size, tp, cp)  # raises unless the world size is a multiple of TP x CP
    dp = world_size // (tp * cp)
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size ({cfg.global_batch_size}) must be a multiple of --micro-batch-size "
                         f"x data-parallel size ({cfg.micro_batch_size} x {dp})")


def setup_parallel(model_config: GatedDeltaNetConfig, cfg: TrainingConfig, device: torch.device,
                   single_process: bool = False) -> tuple[ParallelGroups, torch.device]:
    """Check the parallel layout, join torch.distributed (under any launcher; single_process=True joins a group
    of one, which DeepSpeed needs) and build the TP/CP/DP groups. The checks come first, so a layout that cannot
    work fails before any communication or data work."""
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    check_parallel_layout(model_config, cfg, launched_world_size())
    local_rank = initialize_distributed(device.type, cfg.distributed_timeout_minutes, single_process)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    groups = initialize_model_parallel(tp, cp, cfg.distributed_timeout_minutes)
    return groups, device


def setup_run(model_config: GatedDeltaNetConfig,
              cfg: TrainingConfig) -> tuple[ParallelGroups, torch.device, dict | None]:
    """The process groups, the device and the DeepSpeed config (None: the built-in engine, ZeRO stage 0) of a run.
    A bad precision, --deepspeed-config or layout fails here, before the data or the model are built."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph captures CUDA graphs: it needs a GPU, and the device is {device.type} "
                         f"(drop the flag)")
    if (cfg.bf16 or cfg.fp16) and device.type != "cuda":
        raise ValueError("--bf16/--fp16 need a GPU; on a CPU train in fp32 (drop the flag)")
    # The data-parallel engine: DeepSpeed for ZeRO 1-3, else the built-in path (training/engine.py).
    file_config = read_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None
    zero_stage = resolve_zero_stage(cfg, file_config)
    groups, device = setup_parallel(model_config, cfg, device, single_process=zero_stage > 0)
    ds_config = deepspeed_config_for(cfg, zero_stage, file_config, groups, device) if zero_stage else None
    return groups, device, ds_config


def autocast_dtype_of(cfg: TrainingConfig) -> torch.dtype | None:
    """The autocast precision of --bf16 / --fp16 (None: fp32, no autocast)."""
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None


def build_engine(model_config: GatedDeltaNetConfig, cfg: TrainingConfig, groups: ParallelGroups, device: torch.device,
                 ds_config: dict | None) -> tuple[BuiltinDataParallel | DeepSpeedDataParallel, int]:
    """The model on its data-parallel engine, and the full model's parameter count. Every rank builds the full
    model from the shared seed and keeps its shard (the same weights as one process); tensor and context
    parallelism and activation recomputation are applied to it from outside, in that order."""
    model = GatedDeltaNetForCausalLM(model_config)
    model.model.fp32_residual = cfg.fp32_residual_connection
    num_params = sum(p.numel() for p in model.parameters())
    if groups.tensor_model_parallel_size > 1:
        parallelize_model(model, groups.tensor_model_parallel_group, cfg.sequence_parallel)
    if groups.context_parallel_size > 1:
        apply_context_parallel(model, groups.context_parallel_group, cfg.cp_comm_type)
    if cfg.recompute_granularity:
        apply_activation_recompute(model, cfg.recompute_granularity)
    model = model.to(device)
    engine = (DeepSpeedDataParallel(model, cfg, groups, device, ds_config) if ds_config
              else BuiltinDataParallel(model, cfg, groups, device))
    return engine, num_params


def forward_backward(engine: BuiltinDataParallel | DeepSpeedDataParallel, batch: dict[str, torch.Tensor],
                     cfg: TrainingConfig, device: torch.device, groups: ParallelGroups,
                     inject_nan: bool = False) -> torch.Tensor:
    """Forward and backward of one micro batch (its gradients are added to .grad); returns its loss."""
    loss = lm_loss(engine.model, batch, device, autocast_dtype_of(cfg), groups.tensor_model_parallel_group,
                   groups.context_parallel_group, autocast_cache=not cfg.cuda_graph)
    if inject_nan:
        loss = loss * float("nan")  # testing aid (--inject-nan-at): a NaN loss and NaN gradients
    engine.backward(loss)
    return loss


def build_cuda_graph(engine: BuiltinDataParallel | DeepSpeedDataParallel, cfg: TrainingConfig, device: torch.device,
                     groups: ParallelGroups) -> CudaGraphStep | None:
    """With --cuda-graph, what runs train_step's micro batches: forward_backward, eager for the first
    WARMUP_ITERATIONS iterations, then replayed as a CUDA graph (training/cuda_graph.py). None without the flag."""
    if not cfg.cuda_graph:
        return None
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * groups.data_parallel_size)
    return CudaGraphStep(lambda batch: forward_backward(engine, batch, cfg, device, groups),
                         engine.model.parameters(), device, warmup_calls=WARMUP_ITERATIONS * num_micro)


def train_step(engine: BuiltinDataParallel | DeepSpeedDataParallel, data: Iterator[dict[str, torch.Tensor]],
               cfg: TrainingConfig, device: torch.device, groups: ParallelGroups,
               inject_nan: bool = False, graph: CudaGraphStep | None = None) -> QueuedStep:
    """One iteration: forward and backward over the micro batches (gradient accumulation up to the global batch),
    then the engine reduces the gradients (summed over TP for replicated weights, averaged over DP x CP), clips and
    steps, all queued on the device. Returns the engine's QueuedStep, whose read() waits for the iteration and
    gives its StepResult: the loss averaged over DP x CP (each CP rank's is the mean over its slice's tokens),
    whether it is finite on every rank, whether the update was applied, the gradient norm.
    inject_nan makes this rank's first loss NaN. graph (build_cuda_graph, --cuda-graph) runs the micro batches;
    the one with inject_nan runs eagerly."""
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * groups.data_parallel_size)
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: the engine reads it once
    for micro in range(num_micro):
        batch, nan = next(data), micro == 0 and inject_nan
        if graph is None or nan:
            loss = forward_backward(engine, batch, cfg, device, groups, inject_nan=nan)
        else:
            loss = graph(batch)  # the graph's static loss: read here, before the next micro batch's replay
        total += loss.detach().double() / num_micro
    return engine.step(total)


# Why a run stops early, in increasing priority: every rank must stop at the same iteration.
EXIT_REASONS = (None, "exit-interval", "exit-duration-in-mins", "signal")


# ----------------------------------------------------------------------------------------------------
# Training

# Signals that ask for save-and-exit: SIGTERM (torchrun, mpirun and Slurm forward it on preemption or scancel)
# and SIGUSR1 (Slurm's `--signal=USR1@120` warning before the time limit).
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitRequest:
    """While active, an EXIT_SIGNALS signal on any rank asks every rank to save and exit after the iteration
    (the loop all-reduces the request, so the ranks stop together)."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "ExitRequest":
        self.previous = {sig: signal.signal(sig, self._handler) for sig in EXIT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        where = f"rank {get_rank()} " if get_world_size() > 1 else ""
        print(f"{where}received signal {signal.Signals(signum).name}: saving and exiting after this iteration",
              flush=True)
        self.requested = True


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps (--max-skipped-steps): the run cannot make progress."""


def train(model_config: GatedDeltaNetConfig, cfg: TrainingConfig, exit_request: ExitRequest | None = None) -> dict:
    """Run training; returns {"losses": {iteration: loss}, "iteration": last iteration, "exit_reason": str}.

    exit_request, when active (a `with ExitRequest()` block), turns SIGTERM into save-and-exit.
    """
    exit_request = exit_request or ExitRequest()
    start_time = time.time()
    groups, device, ds_config = setup_run(model_config, cfg)
    autocast_dtype = autocast_dtype_of(cfg)
    zero_stage = ds_config["zero_optimization"]["stage"] if ds_config else 0
    topology = describe_topology(groups, device, zero_stage)  # collective: every rank takes part
    print_rank_0(topology)
    tp, dp = groups.tensor_model_parallel_size, groups.data_parallel_size
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    true_vocab_size, train_data, valid_data = build_datasets(cfg)
    vocab_size = padded_vocab_size(true_vocab_size, cfg.make_vocab_size_divisible_by, tp)
    model_config = dataclasses.replace(model_config, vocab_size=vocab_size)
    engine, num_params = build_engine(model_config, cfg, groups, device, ds_config)
    rng_tracker = model_parallel_rng_tracker(cfg.seed, groups.tensor_model_parallel_rank)
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, decay_iters, cfg.lr_decay_style,
                          cfg.lr_wsd_decay_iters if cfg.lr_wsd_decay_iters is not None else decay_iters // 10,
                          cfg.lr_wsd_decay_style)
    print_rank_0(f"model: {num_params / 1e6:.2f}M parameters, {model_config}")
    print_rank_0(f"training: {cfg}")
    print_rank_0(f"parallel: tensor {tp} x context {groups.context_parallel_size} x data {dp}, "
                 f"sequence parallel {cfg.sequence_parallel}, vocabulary {true_vocab_size} padded to {vocab_size}")

    iteration, consumed_samples, skipped_iterations = 0, 0, 0
    if cfg.load:
        load_optimizer = not (cfg.finetune or cfg.no_load_optim)
        state = engine.read_checkpoint(cfg.load, cfg.ckpt_step, load_optimizer)
        if state is None:
            if cfg.exit_on_missing_checkpoint:
                raise CheckpointError(f"no checkpoint in {cfg.load} (no latest_checkpointed_iteration.txt)")
            print_rank_0(f"no checkpoint in {cfg.load}: starting from scratch")
        else:
            check_model_config(state.get("model_config", {}), model_config.to_dict(), cfg.load,
                               saved_tensor_parallel_size(cfg.load, state["iteration"]), tp)
            engine.load_state(state, load_optimizer)
            # the kernels the saving run ran, without autotuning (kernels/tuned_configs.py)
            print_rank_0(install_tuned_configs(state.get("kernel_configs"), device))
            if not cfg.finetune:
                iteration = state["iteration"]
                consumed_samples = state["consumed_train_samples"]
                skipped_iterations = state.get("skipped_iterations", 0)
                if not cfg.no_load_rng:
                    # This rank's own state when the checkpoint has one per DP x CP rank of this layout.
                    per_rank, dp_cp = state.get("rng_states") or [], dp * groups.context_parallel_size
                    own = groups.data_parallel_rank * groups.context_parallel_size + groups.context_parallel_rank
                    set_rng_state(per_rank[own] if len(per_rank) == dp_cp else state["rng_state"])
                    if "rng_tracker_states" in state:  # absent after tools/reshard_checkpoint.py
                        rng_tracker.set_states(state["rng_tracker_states"])
            print_rank_0(f"loaded checkpoint from {cfg.load} at iteration {state['iteration']}")

    def save(at_iteration: int) -> None:
        """Every rank calls it. Besides the model and optimizer (the engine's), a checkpoint holds the data
        position, the counters, the schedule, the random state of every rank, the flags and the model config."""
        t0 = time.time()
        engine.save(cfg.save, at_iteration, {
            "opt_param_scheduler": dataclasses.asdict(schedule), "rng_state": get_rng_state(),
            "rng_states": gather_rng_states(groups.data_context_parallel_group),
            "consumed_train_samples": consumed_samples, "skipped_iterations": skipped_iterations,
            "args": dataclasses.asdict(cfg), "model_config": model_config.to_dict(),
            "true_vocab_size": true_vocab_size, "tensor_model_parallel_size": tp,
            "rng_tracker_states": rng_tracker.get_states(), "kernel_configs": tuned_configs(device)})
        print_rank_0(f"saved checkpoint at iteration {at_iteration} to {cfg.save} ({time.time() - t0:.1f}s)")

    tensorboard = TensorBoardLogger(cfg.tensorboard_dir if is_rank_zero() else None)
    flops_per_token = training_flops_per_token(model_config)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    data = (batches(train_data, consumed_samples, cfg.micro_batch_size, groups.data_parallel_rank, dp)
            if iteration < cfg.train_iters else iter(()))
    losses: dict[int, float] = {}
    interval_losses, nan_iterations, consecutive_nan, exit_reason = [], 0, 0, "finished"

    def account(at_iteration: int, at_consumed: int, step: StepResult) -> None:
        """The bookkeeping of one iteration's results: losses, skipped updates, the stop on too many in a row."""
        nonlocal skipped_iterations, nan_iterations, consecutive_nan
        losses[at_iteration] = step.loss
        interval_losses.append(step.loss if step.applied else None)  # skipped iterations do not enter the mean
        if step.applied:
            consecutive_nan = 0
            return
        skipped_iterations += 1  # skipped rather than poison the weights
        overflow = cfg.fp16 and step.loss_is_finite  # fp16 loss-scale overflow: the scaler lowers the scale
        if not overflow:
            nan_iterations += 1
            consecutive_nan += 1
        print_rank_0(f" iteration {at_iteration}: skipped the optimizer step: "
                     + (f"fp16 gradient overflow, loss scale lowered to {step.loss_scale:.1f}" if overflow else
                        f"non-finite loss ({step.loss:.4g}) or gradient norm ({step.grad_norm:.4g}), "
                        f"{consecutive_nan} in a row") + f"; {skipped_iterations} skipped in total")
        tensorboard.log({"skipped-iterations": skipped_iterations, "nan-iterations": nan_iterations},
                        at_iteration, at_consumed)
        if cfg.max_skipped_steps and consecutive_nan >= cfg.max_skipped_steps:
            raise TrainingStopped(
                f"{consecutive_nan} consecutive iterations (up to {at_iteration}) had a non-finite loss or gradient "
                f"and were skipped (--max-skipped-steps {cfg.max_skipped_steps}): the run is not making progress. "
                f"Resume from the last checkpoint with a lower --lr or more warmup, or inspect the data after "
                f"consumed sample {at_consumed - consecutive_nan * cfg.global_batch_size}")

    interval_start = time.time()
    engine.model.train()
    graph = build_cuda_graph(engine, cfg, device, groups)
    # Iterations queued on the device whose results are not read yet: reading an iteration's results right after
    # queueing it would drain the device's queue every iteration, and the device would idle while the host
    # prepares the next batch and launches its first kernels. So an iteration is read once the next one is
    # queued, and at once only where the loop needs it (a log line, evaluation, a checkpoint, the exit).
    pending: tuple[int, int, QueuedStep] | None = None  # (iteration, consumed samples, its queued step)
    start_iteration = iteration
    while iteration < cfg.train_iters:
        lr = schedule.lr(iteration)
        engine.set_lr(lr)
        queued = train_step(engine, data, cfg, device, groups,
                            inject_nan=iteration + 1 in cfg.inject_nan_at and get_rank() == 0, graph=graph)
        if iteration == start_iteration:
            # The kernels autotuned in this first iteration, rank by rank: from here on every rank runs rank 0's
            # choices (before a CUDA graph is captured), which is also what a checkpoint saves.
            agree_on_tuned_configs(device, groups.host_group)
        iteration += 1
        consumed_samples += cfg.global_batch_size
        reason = None
        if exit_request.requested:
            reason = "signal"
        elif cfg.exit_duration_in_mins is not None and time.time() - start_time > 60 * cfg.exit_duration_in_mins:
            reason = "exit-duration-in-mins"
        elif cfg.exit_interval and iteration % cfg.exit_interval == 0:
            reason = "exit-interval"
        # A signal or the clock can reach the ranks at different iterations: take the strongest reason of any.
        reason = EXIT_REASONS[int(all_reduce_scalar(EXIT_REASONS.index(reason), groups.host_group, op="max"))]
        if pending is not None:  # the previous iteration: done or nearly
            account(pending[0], pending[1], step := pending[2].read())
        pending = (iteration, consumed_samples, queued)
        if (iteration % cfg.log_interval == 0 or iteration == cfg.train_iters or reason is not None
                or valid_data is not None and iteration % cfg.eval_interval == 0
                or cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0):
            account(iteration, consumed_samples, step := queued.read())
            pending = None

        if iteration % cfg.log_interval == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.time() - interval_start) / len(interval_losses)
            num_gpus = tp * groups.context_parallel_size * dp
            tokens_per_sec = cfg.global_batch_size * cfg.seq_length / elapsed / num_gpus
            mfu = tokens_per_sec * flops_per_token / peak if peak else None
            applied = [loss for loss in interval_losses if loss is not None]
            mean_loss = sum(applied) / len(applied) if applied else math.nan
            print_rank_0(format_iteration_line(
                iteration, cfg.train_iters, consumed_samples, 1000 * elapsed, lr, cfg.global_batch_size, mean_loss,
                step.grad_norm, step.loss_scale, skipped_iterations, nan_iterations,
                tokens_per_sec, mfu))
            scalars = {"learning-rate": lr, "batch-size": cfg.global_batch_size, "lm loss": mean_loss,
                       "grad-norm": step.grad_norm, "iteration-time": elapsed, "throughput": tokens_per_sec,
                       "skipped-iterations": skipped_iterations}
            if mfu is not None:
                scalars["mfu"] = mfu
            if device.type == "cuda":
                scalars["mem-max-allocated-bytes"] = torch.cuda.max_memory_allocated(device)
                if iteration == cfg.log_interval or iteration == cfg.train_iters:  # once early, once at the end
                    print_rank_0(format_memory_line(iteration, get_rank(), device))
            tensorboard.log(scalars, iteration, consumed_samples)
            interval_losses, nan_iterations = [], 0
            interval_start = time.time()

        if valid_data is not None and iteration % cfg.eval_interval == 0:
            val = evaluate(engine.model, valid_data, cfg, device, autocast_dtype, groups)
            agree_on_tuned_configs(device, groups.host_group)  # evaluation's own kernels (a forward without grad)
            print_rank_0(format_validation_line(iteration, val))
            tensorboard.log({"lm loss validation": val, "lm loss validation ppl": math.exp(min(20.0, val))},
                            iteration, consumed_samples)

        saved = False
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
            save(iteration)
            saved = True
        if reason is not None:
            if cfg.save and not saved:
                save(iteration)
            print_rank_0(f"exiting at iteration {iteration} ({reason})")
            exit_reason = reason
            break
    else:
        if cfg.save and losses and not (cfg.save_interval and iteration % cfg.save_interval == 0):
            save(iteration)
    tensorboard.close()
    return {"losses": losses, "iteration": iteration, "exit_reason": exit_reason}


def lost_another_rank(error: RuntimeError) -> bool:
    """A collective failed because another rank is gone or silent: NCCL raises DistBackendError, gloo a plain
    RuntimeError from its transport (connection reset or closed by the peer, or --distributed-timeout-minutes)."""
    return isinstance(error, dist.DistError) or any(
        sign in str(error) for sign in ("gloo/transport", "Connection reset", "Connection closed", "Timed out waiting"))


def main(argv: list[str] | None = None) -> int:
    together = False  # whether every rank ends here at once (shutdown_distributed's wait_for_peers)
    try:
        # Ranks from the launcher (srun and mpirun included) before any flag is checked against the world size.
        argv = consume_launcher_arguments(sys.argv[1:] if argv is None else argv)
        discover_launch_environment()
        model_config, cfg = parse_args(argv)
        with ExitRequest() as exit_request:
            train(model_config, cfg, exit_request)
        together = True
    except ValueError as e:  # bad flags, data or checkpoints (CheckpointError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # every rank stops at the same iteration (its results are all-reduced)
        together = True
        print(f"error: rank {get_rank()}: {e}", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if not lost_another_rank(e):
            raise
        print(f"error: rank {get_rank()} lost contact with another rank, which died, was killed or hangs "
              f"({' '.join(str(e).split())[:300]}); see that rank's output. Nothing was saved after the last "
              f"checkpoint; the run resumes from it with --load.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(4)  # no orderly shutdown: tearing down a process group whose peer is gone can block
    finally:
        shutdown_distributed(wait_for_peers=together)
    return 0


if __name__ == "__main__":
    sys.exit(main())
