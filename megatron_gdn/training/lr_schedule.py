"""Learning-rate schedule: linear warmup, then constant, linear, cosine, inverse-square-root or WSD decay
(Megatron's OptimizerParamScheduler, counted in iterations)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str  # constant | linear | cosine | inverse-square-root | WSD
    wsd_decay_iters: int = 0
    wsd_decay_style: str = "linear"  # linear | cosine | exponential | minus_sqrt

    def __post_init__(self) -> None:
        if self.warmup_iters > self.decay_iters and self.decay_style != "constant":
            raise ValueError(f"warmup ({self.warmup_iters} iterations) is longer than the decay "
                             f"({self.decay_iters}); shorten --lr-warmup-iters or lengthen --lr-decay-iters")
        if self.min_lr > self.max_lr:
            raise ValueError(f"--min-lr ({self.min_lr}) exceeds --lr ({self.max_lr})")

    def lr(self, iteration: int) -> float:
        """The learning rate for the optimizer step that makes `iteration` (0-based steps done so far)."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.max_lr * (iteration + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        delta = self.max_lr - self.min_lr
        if self.decay_style == "inverse-square-root":
            warmup = max(self.warmup_iters, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup) / math.sqrt(max(iteration, 1)))
        if self.decay_style == "WSD":
            stable_end = self.decay_iters - self.wsd_decay_iters
            if iteration < stable_end:
                return self.max_lr
            ratio = (iteration - stable_end) / max(self.wsd_decay_iters, 1)
            coeff = {
                "linear": 1.0 - ratio,
                "cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0),
                "exponential": 2.0 * 0.5 ** ratio - 1.0,
                "minus_sqrt": 1.0 - math.sqrt(ratio),
            }[self.wsd_decay_style]
            return self.min_lr + coeff * delta
        ratio = (iteration - self.warmup_iters) / max(self.decay_iters - self.warmup_iters, 1)
        if self.decay_style == "linear":
            return self.min_lr + (1.0 - ratio) * delta
        if self.decay_style == "cosine":
            return self.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * delta
        raise ValueError(f"unknown --lr-decay-style {self.decay_style!r}")
