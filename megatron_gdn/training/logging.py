"""The Megatron-format console line and the same values in TensorBoard."""

from __future__ import annotations

import math


def format_iteration_line(iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                          lr: float, global_batch_size: int, loss: float, grad_norm: float | None,
                          loss_scale: float | None, skipped: int, nan_iterations: int,
                          tokens_per_sec_per_gpu: float, mfu: float | None) -> str:
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
        f"lm loss: {loss:.6E}",
    ]
    if loss_scale is not None:
        parts.append(f"loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts += [
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iterations:3d}",
        f"tokens/s/GPU: {tokens_per_sec_per_gpu:.1f}",
    ]
    if mfu is not None:
        parts.append(f"MFU: {100 * mfu:.1f}%")
    return " | ".join(parts) + " |"


def format_memory_line(iteration: int, rank: int, device) -> str:
    """Megatron's memory report: this GPU's current and peak allocated and reserved memory (MB)."""
    import torch

    mb = 2.0**20
    return (f"[Rank {rank}] (after {iteration} iterations) memory (MB) | "
            f"allocated: {torch.cuda.memory_allocated(device) / mb:.1f} | "
            f"max allocated: {torch.cuda.max_memory_allocated(device) / mb:.1f} | "
            f"reserved: {torch.cuda.memory_reserved(device) / mb:.1f} | "
            f"max reserved: {torch.cuda.max_memory_reserved(device) / mb:.1f}")


def format_validation_line(iteration: int, loss: float, split: str = "validation") -> str:
    ppl = math.exp(min(20.0, loss))
    return f" {split} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"


class TensorBoardLogger:
    """Megatron's TensorBoard tags, each also logged against consumed samples ("... vs samples")."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    def log(self, values: dict[str, float], iteration: int, consumed_samples: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)
            self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
