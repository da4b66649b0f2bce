"""--cuda-graph: each micro batch's forward and backward replayed as one CUDA graph.

A training step of a small model can be bound by the host: every kernel (most of them Triton kernels, each with tens
of microseconds of Python launch overhead) is launched from Python, and the GPU waits for the launches. A CUDA
graph records the kernels of one micro batch's forward and backward (pretrain_gdn.forward_backward: lm_loss, then
engine.backward) once; every later micro batch is one copy of its tokens and one graph launch. The gradient
reduction, clipping and optimizer step stay outside the graph, eager, as without the flag.

    graph = CudaGraphStep(lambda batch: forward_backward(engine, batch, ...), engine.model.parameters(), device,
                          warmup_calls=WARMUP_ITERATIONS * micro_batches_per_step)
    loss = graph(batch)          # instead of forward_backward(engine, batch, ...); the loss is graph.loss

What a graph needs, and how it gets it:
- Fixed addresses. A replay reads and writes the memory it was captured with. The tokens are copied into a static
  device buffer before each replay; the weights are updated in place by the optimizer (and a checkpoint is loaded
  into them in place); the gradients are allocated by the first warm-up's backward (zeros at the capture for a
  parameter still without one) and never freed: BuiltinDataParallel zeroes them in place under --cuda-graph (but
  for those the products overwrite, below), and every call after the capture checks that each parameter
  still holds the same .grad tensor (one that was replaced or freed would be written by the replay after its
  memory went elsewhere). The backward allocates them so that the plain projections' gradients are the views of
  one buffer per product that gradient accumulation fusion adds into (models/fused_projection.py); zeros allocated
  per parameter beforehand would leave the adding to autograd. The loss is a tensor of the graph's memory, overwritten by each replay:
  read it (train_step adds it to the step's total on the GPU) before the next replay.
- Accumulation. With .grad allocated, autograd's AccumulateGrad adds the new gradient into it in place (a backward
  without create_graph; it takes the new tensor as .grad only when .grad is None), and the fused weight-gradient
  products add into theirs (C = A B + C); the capture records those adds, so each replay accumulates into .grad
  and gradient accumulation replays the same graph once per micro batch. 0 + g == g, so the gradients equal those
  of the eager path, which takes (or writes) the first micro batch's gradient as it is. With one micro batch a step
  every backward is a step's first: the products then write their gradient over the last step's (C = A B,
  fused_projection.OVERWRITE_IN_PRODUCT) and the engine zeroes only the others, which saves a memset of those
  gradients and the products' read of it (5.5 GB each at `1.3b`).
- No host work in the captured region: nothing may wait for the GPU (.item(), .tolist(), a copy to or from pageable
  host memory) or depend on values only the GPU knows. Dense batches qualify (the chunk kernels' tables come from
  the host-known shape, kernels/triton_utils.chunk_tables(dense=...); the tables and the dense offsets are cached by
  value, so the capture reuses the warm-up's tensors, and the graph reads them as long as those caches keep them:
  64 entries each, far more than the shapes of one run); packed documents do not (cu_seqlens is read on the host).
  Shapes never change: every micro batch of a run has the same [micro batch, seq length + 1] tokens.
- Warm-up. Triton compiles and autotunes its kernels on their first call (benchmarking, which synchronises), and
  cuBLAS and the allocator create their workspaces lazily: none of that may happen during capture. The first
  WARMUP_ITERATIONS iterations therefore run eagerly, on a side stream as torch's CUDA graph docs require; they are
  real training iterations, and the capture happens at the first micro batch after them. The capture runs nothing
  (it records), so that micro batch is then replayed like every later one.
- Autocast without its weight cache (lm_loss(autocast_cache=False)): torch supports graphed autocast only with
  cache_enabled=False (make_graphed_callables refuses the cache); a cached bf16 copy of a weight must never outlive
  the weight's update. The casts are deterministic, so the values are the eager path's.
- capture_error_mode="thread_local": a call that would wait for the capturing stream fails in every mode; this mode
  only keeps other threads' unrelated CUDA calls (NCCL's watchdog polling its events under data parallelism) from
  failing the capture.

Refused (check_cuda_graph_config, at start-up, with the reason): tensor and context parallelism (their
collectives inside forward and backward), DeepSpeed ZeRO (its engine's hooks and bookkeeping run on the host in
backward), --fp16 (GradScaler's dynamic loss scaling and its overflow checks: not tried under capture),
--reset-state-at-eod (packed documents: see above), activation recomputation (torch.utils.checkpoint saves and
restores the CUDA random state around every checkpoint, which torch refused during capture until
pytorch/pytorch#162505, issue #162504; not tried here) and a CPU device (pretrain_gdn.setup_run). Data
parallelism is allowed: the gradient all-reduce runs after the micro batches, outside the graph.
--inject-nan-at's micro batch runs eagerly (with its own activation memory, besides the graph's).

Memory: the graph keeps the memory of its activations in its own pool between replays (about the eager path's
peak), and the gradients are kept between steps instead of being freed after the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..data.sampler import pinned

if TYPE_CHECKING:
    from ..config import TrainingConfig

# Eager iterations before the capture: the first compiles and autotunes the Triton kernels and creates the
# workspaces; the second runs what the first made, with the gradients already allocated as in the graph (torch's
# examples warm up for 3 calls; 2 iterations of gradient accumulation are 4 micro batches).
WARMUP_ITERATIONS = 2


def check_cuda_graph_config(cfg: TrainingConfig) -> None:
    """Raise ValueError naming every flag that --cuda-graph cannot run with, and why."""
    conflicts = []
    if cfg.tensor_model_parallel_size > 1 or cfg.context_parallel_size > 1:
        conflicts.append(f"--tensor-model-parallel-size {cfg.tensor_model_parallel_size} / --context-parallel-size "
                         f"{cfg.context_parallel_size} (their collectives would run inside the graph; use 1)")
    if cfg.zero_stage or cfg.deepspeed_config:
        conflicts.append("--zero-stage / --deepspeed-config (DeepSpeed's engine works on the host in backward; "
                         "the built-in engine, --zero-stage 0 or no flag, is supported)")
    if cfg.fp16:
        conflicts.append("--fp16 (dynamic loss scaling is not supported under capture: use --bf16)")
    elif not cfg.bf16:
        conflicts.append("fp32 training, without --bf16 (at head dims above 64 the chunked delta rule takes its "
                         "PyTorch path on GPUs in fp32, which has not been tried under capture: use --bf16)")
    if cfg.reset_state_at_eod:
        conflicts.append("--reset-state-at-eod (packed documents: the kernels read the document offsets on the host)")
    if cfg.recompute_granularity:
        conflicts.append("--recompute-activations / --recompute-granularity (torch.utils.checkpoint's random-state "
                         "handling under capture is not supported by every torch version; not tried)")
    if conflicts:
        raise ValueError("--cuda-graph cannot be used with " + "; ".join(conflicts))


class CudaGraphStep:
    """micro_step(batch) -> loss (one micro batch's forward and backward), eager for the first warmup_calls calls,
    then captured once and replayed (see the module docstring). Call it with each micro batch's {"tokens"}."""

    def __init__(self, micro_step: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 params: Iterable[nn.Parameter], device: torch.device, warmup_calls: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, got {device}")
        self.micro_step, self.device, self.warmup_calls = micro_step, device, warmup_calls
        self.eager_calls = self.replays = 0
        self.stream = torch.cuda.Stream(device)  # warm-up and capture (torch's docs: not the default stream)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None  # the static input
        self.kernel_tables: tuple | None = None  # cached tensors the graph reads (see _capture)
        self.loss: torch.Tensor | None = None    # the static output
        self.params = list({id(p): p for p in params if p.requires_grad}.values())  # tied weights once
        self.grads: list[torch.Tensor] | None = None  # the .grad tensors the graph writes (set at the capture)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "cu_seqlens" in batch:
            raise ValueError("--cuda-graph cannot replay packed documents (cu_seqlens): drop --reset-state-at-eod")
        if self.grads is not None and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("--cuda-graph: a parameter's .grad was replaced or set to None (zero_grad must use "
                               "set_to_none=False): the graph writes into the tensors it was captured with")
        if self.graph is None and self.eager_calls < self.warmup_calls:
            self.eager_calls += 1
            return self._on_side_stream(batch)
        if self.graph is None:
            self._capture(batch)
        tokens = pinned(batch["tokens"])  # a copy from pageable memory would wait for the previous replay
        if tokens.shape != self.tokens.shape or tokens.dtype != self.tokens.dtype:
            raise ValueError(f"--cuda-graph replays one shape: got tokens {tuple(tokens.shape)} {tokens.dtype}, "
                             f"captured {tuple(self.tokens.shape)} {self.tokens.dtype}")
        self.tokens.copy_(tokens, non_blocking=True)  # stream-ordered: after the previous replay read the buffer
        self.graph.replay()
        self.replays += 1
        return self.loss

    def _on_side_stream(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """An eager warm-up call on the side stream, ordered after and before the default stream's work."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            loss = self.micro_step(batch)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return loss

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        """Record micro_step on the static tokens. Nothing runs (the buffer's values are not read): the caller then
        copies batch's tokens in and replays."""
        from ..kernels.triton_utils import chunk_tables, dense_cu_seqlens

        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]  # also keeps their memory alive
        self.tokens = torch.empty_like(batch["tokens"], device=self.device)
        # The chunk kernels' offsets and chunk tables of this shape are tensors that only the kernels' lru caches
        # keep; the graph reads them at every replay, so they are held here too (an evicted entry's memory would
        # be reused while the graph still reads it).
        B, T = self.tokens.shape[0], self.tokens.shape[1] - 1  # the model sees tokens[:, :-1]
        offsets = dense_cu_seqlens(B, T, self.device)
        self.kernel_tables = (offsets, chunk_tables(offsets, dense=(B, T)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self.loss = self.micro_step({"tokens": self.tokens}).detach()
        self.graph = graph
