"""--cuda-graph on a GPU: the replayed forward and backward train exactly as the eager path does, with and without
gradient accumulation, and a replay launches nothing from the host but the token copy and the graph. Also what
keeps the host ahead of the GPU: the built-in engine's step never waits for the GPU, and reading its results waits
for that step only.

    pytest -m gpu tests/test_cuda_graph_gpu.py

Why the losses must be bit for bit equal: the first 2 iterations run eagerly in both runs, and from then on the
graph replays the kernels the eager path launches, in the same order, with the same Triton configurations (the
two runs share the process, hence its autotuning results), on the same data. The differences are ones that do
not change a value: autocast casts each weight at each use instead of caching the copy (a cast is deterministic),
and with several micro batches a step the first one's gradient is added to zeros instead of being taken as it is
(0 + g == g; with one, the fused products write theirs over the last step's, as eager writes a new one).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.parallel import destroy_model_parallel
from megatron_gdn.training.cuda_graph import WARMUP_ITERATIONS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and Triton compiling, not interpreting)")]

# Two blocks of 2 heads (of 64 by default, the chunk kernels' usual head size), 256 tokens per sample.
MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "2"]


def flags(micro_batches: int, precision: list[str], iters: int = 10, head_dim: int = 64) -> list[str]:
    return [*MODEL, "--head-dim", str(head_dim), "--mock-data", "--vocab-size", "512", "--seq-length", "256",
            "--micro-batch-size", "2", "--global-batch-size", str(2 * micro_batches), "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "5", "--eval-interval", "1000", *precision]


# Heads of 128: the chunk backward's d(q k^T) kernel runs on a side stream beside the reverse scan (K > 64), which
# the capture must fork from and join back into its stream.
@pytest.mark.parametrize("micro_batches, head_dim", [(1, 64), (2, 64), (2, 128)],
                         ids=["bf16", "bf16-accumulation-2", "bf16-accumulation-2-heads-of-128"])
def test_graphed_training_matches_eager(micro_batches, head_dim):
    """Eager twice first: the graph's claim of equal losses is only as good as eager's run-to-run determinism."""
    argv = flags(micro_batches, ["--bf16"], head_dim=head_dim)
    eager = pretrain_gdn.train(*parse_args(argv))["losses"]
    assert pretrain_gdn.train(*parse_args(argv))["losses"] == eager, "eager training is not deterministic here"
    graphed = pretrain_gdn.train(*parse_args(argv + ["--cuda-graph"]))["losses"]
    assert len(eager) == 10 and len(set(eager.values())) > 1
    assert graphed == eager, {it: (eager[it], graphed[it]) for it in eager if graphed[it] != eager[it]}


class DispatchedOps(TorchDispatchMode):
    """The aten ops called on the host while active (every op the host could launch a kernel for)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def launches(step) -> tuple[int, int]:
    """(kernel launches, graph launches) the host makes in step(), from the profiler's CUDA runtime/driver events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    return sum("LaunchKernel" in n for n in names), sum("GraphLaunch" in n for n in names)


def test_weights_cast_by_the_optimizer_train_as_weights_cast_at_every_use(monkeypatch):
    """The built-in engine's fused products keep their bf16 weights, which TritonAdamW's kernel updates with the
    fp32 ones (models/fused_projection.py, compute_weight): training, eager and replayed, must be bit for bit what
    casting every weight at every use gives, and the eager run must have cast once instead of at each of its 20
    forwards (2 layers x 4 fused products: 8 casts a forward, each a torch.cat)."""
    argv = flags(2, ["--bf16"])
    with DispatchedOps() as dispatched:
        kept = pretrain_gdn.train(*parse_args(argv))["losses"]
    kept_cats = sum("aten.cat" in op for op in dispatched.ops)
    graphed = pretrain_gdn.train(*parse_args(argv + ["--cuda-graph"]))["losses"]
    from megatron_gdn.training import engine
    monkeypatch.setattr(engine, "CAST_BY_OPTIMIZER", "not_read_by_compute_weight")  # the engine marks no weight
    with DispatchedOps() as dispatched:
        recast = pretrain_gdn.train(*parse_args(argv))["losses"]
    recast_cats = sum("aten.cat" in op for op in dispatched.ops)
    assert len(kept) == 10 and kept == recast, {it: (kept[it], recast[it]) for it in kept if kept[it] != recast[it]}
    assert graphed == recast
    assert recast_cats - kept_cats >= 19 * 8, (recast_cats, kept_cats)


def test_replay_launches_nothing_from_the_host():
    """After the warm-up and the capture, a micro batch runs no Python forward or backward: the host dispatches one
    copy (the tokens) and launches the graph, without waiting for the GPU; a whole step launches a fraction of the
    kernels that the eager step launches (what is left: the gradient clipping and the optimizer)."""
    config, cfg = parse_args(flags(2, ["--bf16"], iters=20) + ["--cuda-graph"])
    groups, device, ds_config = pretrain_gdn.setup_run(config, cfg)
    try:
        _, train_data, _ = pretrain_gdn.build_datasets(cfg)
        engine, _ = pretrain_gdn.build_engine(dataclasses.replace(config, vocab_size=512), cfg, groups, device,
                                              ds_config)
        engine.set_lr(cfg.lr)
        data = pretrain_gdn.batches(train_data, 0, cfg.micro_batch_size)
        graph = pretrain_gdn.build_cuda_graph(engine, cfg, device, groups)
        step = lambda graph=graph: pretrain_gdn.train_step(engine, data, cfg, device, groups, graph=graph)  # noqa: E731
        for _ in range(WARMUP_ITERATIONS + 1):  # eager warm-up, then the step that captures
            step()
        assert graph.graph is not None and graph.eager_calls == 2 * WARMUP_ITERATIONS and graph.replays == 2

        python_calls = []
        micro_step = graph.micro_step
        graph.micro_step = lambda batch: python_calls.append(1) or micro_step(batch)
        step()
        assert not python_calls and graph.replays == 4

        batch = next(data)
        torch.cuda.set_sync_debug_mode("error")  # a host sync in the replay would raise
        try:
            with DispatchedOps() as dispatched:
                loss = graph(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # Pinning the tokens is host work (a page-locked copy in host memory), no GPU launch: left out
        host_only = {"aten.is_pinned.default", "aten._pin_memory.default"}
        assert [op for op in dispatched.ops if op not in host_only] == ["aten.copy_.default"], dispatched.ops
        assert torch.isfinite(loss) and graph.tokens.cpu().equal(batch["tokens"])
        engine.optimizer.zero_grad(set_to_none=False)  # drop that micro batch's gradient

        graphed_kernels, graphed_graphs = launches(step)
        eager_kernels, eager_graphs = launches(lambda: step(graph=None))  # eager forward and backward
        assert graphed_graphs == 2 and eager_graphs == 0
        assert 0 < 3 * graphed_kernels < eager_kernels, (graphed_kernels, eager_kernels)
    finally:
        destroy_model_parallel()


def synchronizing(caught) -> list[str]:
    """The sync debug mode's warnings about a synchronizing call; not its notice that the mode is a prototype."""
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_builtin_step_queues_without_waiting_and_reads_only_its_own_results(precision):
    """The built-in engine queues the gradient reductions, the norm, the clipping, the AdamW update (which skips
    itself on the device if the loss or the norm is not finite; fp16: GradScaler's unscaling, overflow check and
    scale update) and the copy of its results to the host without a synchronising call (torch's sync debug mode
    flags none), and read() waits for that step only: work queued after the step still runs when read() returns, as
    the next iteration does when the training loop reads this one. The values read are the step's: its loss, the
    gradient norm computed beforehand (fp16: unscaled) and the loss scale after it, though the scaler's scale tensor
    is changed in place after the step (as the next step's update does)."""
    import warnings

    config, cfg = parse_args(flags(1, [precision]))
    groups, device, ds_config = pretrain_gdn.setup_run(config, cfg)
    try:
        _, train_data, _ = pretrain_gdn.build_datasets(cfg)
        engine, _ = pretrain_gdn.build_engine(dataclasses.replace(config, vocab_size=512), cfg, groups, device,
                                              ds_config)
        data = pretrain_gdn.batches(train_data, 0, cfg.micro_batch_size)
        pretrain_gdn.train_step(engine, data, cfg, device, groups)  # the first step creates AdamW's state
        loss = pretrain_gdn.forward_backward(engine, next(data), cfg, device, groups).detach().double()
        grads = [p.grad.double().norm() for p in engine.model.parameters() if p.grad is not None]
        scale = engine.scaler.get_scale() if cfg.fp16 else 1.0  # fp16: the gradients are those of the scaled loss
        expected_loss, expected_norm = loss.item(), torch.stack(grads).norm().item() / scale
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                queued = engine.step(loss)
                if cfg.fp16:  # the next step's scale update, in place
                    engine.scaler._get_scale_async().mul_(2)
                torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued after the step
                later = torch.cuda.Event()
                later.record()
                step = queued.read()
                later_still_running = not later.query()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = synchronizing(caught)
        assert not syncs, f"engine.step or read() called a synchronising op: {syncs}"
        assert later_still_running, "read() waited for work queued after the step"
        assert step.applied and step.loss_is_finite, step
        assert step.loss == expected_loss and step.grad_norm == pytest.approx(expected_norm, rel=1e-5), step
        # no overflow in this step: the scale stays (it grows only after 2000 clean steps)
        assert step.loss_scale == (scale if cfg.fp16 else None), step
    finally:
        destroy_model_parallel()
