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

Exit codes: 0 when training finished or saved and exited on request (SIGTERM, --exit-interval,
--exit-duration-in-mins); 2 for bad input (a one-line "error: ..." on stderr).
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from megatron_gdn.config import TrainingConfig, parse_args
from megatron_gdn.data.mock_dataset import MockGPTDataset
from megatron_gdn.data.sampler import MegatronPretrainingSampler, collate
from megatron_gdn.data.tokenizer import padded_vocab_size
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.parallel import (ParallelGroups, all_reduce_found_inf, all_reduce_scalar,
                                   check_tensor_parallel_config, clip_grad_norm, finalize_model_grads,
                                   initialize_distributed, initialize_model_parallel, is_rank_zero,
                                   launched_world_size, model_parallel_rng_tracker, parallelize_model,
                                   print_rank_0, rank_grid, shutdown_distributed, vocab_parallel_cross_entropy)
from megatron_gdn.parallel.context_parallel import apply_context_parallel, check_context_parallel_config, split_sequence
from megatron_gdn.training.checkpointing import (CheckpointError, check_model_config, load_checkpoint,
                                                 save_checkpoint, saved_tensor_parallel_size)
from megatron_gdn.training.flops import peak_flops, training_flops_per_token
from megatron_gdn.training.logging import TensorBoardLogger, format_iteration_line, format_validation_line
from megatron_gdn.training.lr_schedule import LRSchedule
from megatron_gdn.training.optimizer import build_optimizer, optimizer_param_names


# ----------------------------------------------------------------------------------------------------
# Data

def build_datasets(cfg: TrainingConfig) -> tuple[int, torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(tokenizer vocabulary size, train dataset, validation dataset) for --mock-data or --data-path.
    The model's vocabulary is this padded to a multiple of --make-vocab-size-divisible-by x TP (train())."""
    num_train = cfg.train_iters * cfg.global_batch_size
    num_valid = (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * cfg.global_batch_size
    if cfg.mock_data:
        train = MockGPTDataset(num_train, cfg.seq_length, cfg.vocab_size, cfg.seed)
        valid = MockGPTDataset(num_valid, cfg.seq_length, cfg.vocab_size, cfg.seed, split=1)
        return cfg.vocab_size, train, valid
    from megatron_gdn.data.gpt_dataset import build_train_valid_test_datasets
    from megatron_gdn.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(cfg.tokenizer_model)
    vocab_size = tokenizer.vocab_size
    train, valid, _ = build_train_valid_test_datasets(
        cfg.data_path, cfg.split, cfg.seq_length, cfg.seed, (num_train, num_valid, 0),
        cfg.reset_state_at_eod, tokenizer.eod)
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
            autocast_dtype: torch.dtype | None, tensor_parallel_group=None, context_parallel_group=None) -> torch.Tensor:
    """Mean next-token cross entropy of one micro batch. Inputs are tokens[:, :-1], targets tokens[:, 1:];
    with document offsets the batch is packed into one row and the state restarts per document.
    Under tensor parallelism the logits are this rank's vocabulary slice (never gathered). Under context
    parallelism this rank takes its contiguous slice of every row (or of the packed row) of inputs and targets,
    the model gets the whole row's document offsets, and the loss is the mean over the slice: every rank holds
    as many tokens, so averaging it over the CP ranks gives the token-weighted mean of the whole batch."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None:
        inputs, targets, cu_seqlens = inputs.reshape(1, -1), targets.reshape(1, -1), cu_seqlens.to(device)
    inputs, targets = split_sequence(inputs, context_parallel_group), split_sequence(targets, context_parallel_group)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
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

def setup_parallel(model_config: GatedDeltaNetConfig, cfg: TrainingConfig,
                   device: torch.device) -> tuple[ParallelGroups, torch.device]:
    """Check the parallel layout, join torch.distributed (under torchrun) and build the TP/CP/DP groups.
    The checks come first, so a layout that cannot work fails before any communication or data work."""
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    check_context_parallel_config(model_config, cp, cfg.cp_comm_type, cfg.seq_length, tp, cfg.sequence_parallel)
    check_tensor_parallel_config(model_config, tp)
    rank_grid(launched_world_size(), tp, cp)  # raises unless the world size is a multiple of TP x CP
    local_rank = initialize_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    groups = initialize_model_parallel(tp, cp)
    dp = groups.data_parallel_size
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size ({cfg.global_batch_size}) must be a multiple of --micro-batch-size "
                         f"x data-parallel size ({cfg.micro_batch_size} x {dp})")
    return groups, device


# Why a run stops early, in increasing priority: every rank must stop at the same iteration.
EXIT_REASONS = (None, "exit-interval", "exit-duration-in-mins", "signal")


# ----------------------------------------------------------------------------------------------------
# Training

class ExitRequest:
    """While active, SIGTERM (e.g. a scheduler's preemption notice) asks the loop to save and exit."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "ExitRequest":
        self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handler(self, signum, frame) -> None:
        print_rank_0(f"received signal {signal.Signals(signum).name}: saving and exiting after this iteration")
        self.requested = True


def train(model_config: GatedDeltaNetConfig, cfg: TrainingConfig, exit_request: ExitRequest | None = None) -> dict:
    """Run training; returns {"losses": {iteration: loss}, "iteration": last iteration, "exit_reason": str}.

    exit_request, when active (a `with ExitRequest()` block), turns SIGTERM into save-and-exit.
    """
    exit_request = exit_request or ExitRequest()
    start_time = time.time()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if (cfg.bf16 or cfg.fp16) and device.type != "cuda":
        raise ValueError("--bf16/--fp16 need a GPU; on a CPU train in fp32 (drop the flag)")
    autocast_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    groups, device = setup_parallel(model_config, cfg, device)
    tp, tp_group, dp = groups.tensor_model_parallel_size, groups.tensor_model_parallel_group, groups.data_parallel_size
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    true_vocab_size, train_data, valid_data = build_datasets(cfg)
    vocab_size = padded_vocab_size(true_vocab_size, cfg.make_vocab_size_divisible_by, tp)
    model_config = dataclasses.replace(model_config, vocab_size=vocab_size)
    # Every rank builds the full model from the shared seed and keeps its shard: the same weights as one process.
    model = GatedDeltaNetForCausalLM(model_config)
    num_params = sum(p.numel() for p in model.parameters())
    if tp > 1:
        parallelize_model(model, tp_group, cfg.sequence_parallel)
    if groups.context_parallel_size > 1:
        apply_context_parallel(model, groups.context_parallel_group, cfg.cp_comm_type)
    model = model.to(device)
    rng_tracker = model_parallel_rng_tracker(cfg.seed, groups.tensor_model_parallel_rank)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, decay_iters, cfg.lr_decay_style,
                          cfg.lr_wsd_decay_iters if cfg.lr_wsd_decay_iters is not None else decay_iters // 10,
                          cfg.lr_wsd_decay_style)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)
    print_rank_0(f"model: {num_params / 1e6:.2f}M parameters, {model_config}")
    print_rank_0(f"training: {cfg}")
    print_rank_0(f"parallel: tensor {tp} x context {groups.context_parallel_size} x data {dp}, "
                 f"sequence parallel {cfg.sequence_parallel}, vocabulary {true_vocab_size} padded to {vocab_size}")

    iteration, consumed_samples, skipped_iterations = 0, 0, 0
    if cfg.load:
        state = load_checkpoint(cfg.load, cfg.ckpt_step, groups.tensor_model_parallel_rank, tp)
        if state is None:
            if cfg.exit_on_missing_checkpoint:
                raise CheckpointError(f"no checkpoint in {cfg.load} (no latest_checkpointed_iteration.txt)")
            print_rank_0(f"no checkpoint in {cfg.load}: starting from scratch")
        else:
            check_model_config(state.get("model_config", {}), model_config.to_dict(), cfg.load,
                               saved_tensor_parallel_size(cfg.load, state["iteration"]), tp)
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint in {cfg.load} does not fit the model: "
                                      f"{str(e).splitlines()[0]}") from None
            if not cfg.finetune:
                iteration = state["iteration"]
                consumed_samples = state["consumed_train_samples"]
                skipped_iterations = state.get("skipped_iterations", 0)
                if not cfg.no_load_optim:
                    optimizer.load_state_dict(state["optimizer"])
                    if "grad_scaler" in state:
                        scaler.load_state_dict(state["grad_scaler"])
                if not cfg.no_load_rng:
                    set_rng_state(state["rng_state"])
                    if "rng_tracker_states" in state:  # absent after tools/reshard_checkpoint.py
                        rng_tracker.set_states(state["rng_tracker_states"])
            print_rank_0(f"loaded checkpoint from {cfg.load} at iteration {state['iteration']}")

    def save(at_iteration: int) -> None:
        t0 = time.time()
        save_checkpoint(cfg.save, at_iteration, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": dataclasses.asdict(schedule), "rng_state": get_rng_state(),
            "consumed_train_samples": consumed_samples, "skipped_iterations": skipped_iterations,
            "grad_scaler": scaler.state_dict(), "args": dataclasses.asdict(cfg),
            "model_config": model_config.to_dict(), "true_vocab_size": true_vocab_size,
            "tensor_model_parallel_size": tp, "rng_tracker_states": rng_tracker.get_states(),
            "optimizer_param_names": optimizer_param_names(model, optimizer)},
            tensor_parallel_rank=groups.tensor_model_parallel_rank,
            write=groups.data_parallel_rank == 0 and groups.context_parallel_rank == 0)
        print_rank_0(f"saved checkpoint at iteration {at_iteration} to {cfg.save} ({time.time() - t0:.1f}s)")

    tensorboard = TensorBoardLogger(cfg.tensorboard_dir if is_rank_zero() else None)
    flops_per_token = training_flops_per_token(model_config)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    data = (batches(train_data, consumed_samples, cfg.micro_batch_size, groups.data_parallel_rank, dp)
            if iteration < cfg.train_iters else iter(()))
    losses: dict[int, float] = {}
    interval_losses, nan_iterations, exit_reason = [], 0, "finished"
    interval_start = time.time()
    model.train()
    while iteration < cfg.train_iters:
        lr = schedule.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Forward and backward over the micro batches: gradient accumulation up to the global batch.
        total = 0.0
        for _ in range(num_micro):
            loss = lm_loss(model, next(data), device, autocast_dtype, tp_group, groups.context_parallel_group)
            scaler.scale(loss / num_micro).backward()
            total += loss.item() / num_micro
        # Average the loss and the gradients over DP x CP (each CP rank's are those of its slice's tokens; the
        # state passing already routed every cross-slice gradient), and sum the replicated weights' partial
        # gradients over TP.
        dp_cp, dp_cp_group = dp * groups.context_parallel_size, groups.data_context_parallel_group
        total = all_reduce_scalar(total, dp_cp_group) / dp_cp
        finalize_model_grads(model, tp_group, dp_cp_group, cfg.sequence_parallel)
        scaler.unscale_(optimizer)
        all_reduce_found_inf(scaler, optimizer, tp_group)
        grad_norm = clip_grad_norm(model, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"), tp_group)
        if math.isfinite(grad_norm) and math.isfinite(total):
            scaler.step(optimizer)
        else:  # a non-finite loss or gradient: skip the update rather than poison the weights
            skipped_iterations += 1
            nan_iterations += int(not cfg.fp16)
            if cfg.fp16:
                scaler.step(optimizer)  # the scaler skips the step itself and lowers the loss scale
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iteration += 1
        consumed_samples += cfg.global_batch_size
        losses[iteration] = total
        interval_losses.append(total)

        if iteration % cfg.log_interval == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.time() - interval_start) / len(interval_losses)
            num_gpus = tp * groups.context_parallel_size * dp
            tokens_per_sec = cfg.global_batch_size * cfg.seq_length / elapsed / num_gpus
            mfu = tokens_per_sec * flops_per_token / peak if peak else None
            mean_loss = sum(interval_losses) / len(interval_losses)
            print_rank_0(format_iteration_line(
                iteration, cfg.train_iters, consumed_samples, 1000 * elapsed, lr, cfg.global_batch_size, mean_loss,
                grad_norm, scaler.get_scale() if cfg.fp16 else None, skipped_iterations, nan_iterations,
                tokens_per_sec, mfu))
            scalars = {"learning-rate": lr, "batch-size": cfg.global_batch_size, "lm loss": mean_loss,
                       "grad-norm": grad_norm, "iteration-time": elapsed, "throughput": tokens_per_sec,
                       "skipped-iterations": skipped_iterations}
            if mfu is not None:
                scalars["mfu"] = mfu
            if device.type == "cuda":
                scalars["mem-max-allocated-bytes"] = torch.cuda.max_memory_allocated(device)
            tensorboard.log(scalars, iteration, consumed_samples)
            interval_losses, nan_iterations = [], 0
            interval_start = time.time()

        if valid_data is not None and iteration % cfg.eval_interval == 0:
            val = evaluate(model, valid_data, cfg, device, autocast_dtype, groups)
            print_rank_0(format_validation_line(iteration, val))
            tensorboard.log({"lm loss validation": val, "lm loss validation ppl": math.exp(min(20.0, val))},
                            iteration, consumed_samples)

        saved = False
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
            save(iteration)
            saved = True
        reason = None
        if exit_request.requested:
            reason = "signal"
        elif cfg.exit_duration_in_mins is not None and time.time() - start_time > 60 * cfg.exit_duration_in_mins:
            reason = "exit-duration-in-mins"
        elif cfg.exit_interval and iteration % cfg.exit_interval == 0:
            reason = "exit-interval"
        # A signal or the clock can reach the ranks at different iterations: take the strongest reason of any.
        reason = EXIT_REASONS[int(all_reduce_scalar(EXIT_REASONS.index(reason), op="max"))]
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


def main(argv: list[str] | None = None) -> int:
    try:
        model_config, cfg = parse_args(argv)
        with ExitRequest() as exit_request:
            train(model_config, cfg, exit_request)
    except ValueError as e:  # bad flags, data or checkpoints (CheckpointError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
