"""Activation recomputation (--recompute-activations / --recompute-granularity, training/recompute.py).

Recomputation must change memory, never results: with each granularity the loss and every gradient equal those of
the run without it, bit for bit on CPU in fp32 (the recomputed forward runs the same operations on the same inputs),
alone, under tensor parallelism with sequence parallelism, context parallelism and ZeRO. And it must save memory:
the bytes kept for backward, counted with saved-tensor hooks, shrink as derived below.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from test_tensor_parallel import _train_runs, read_losses, run_distributed, train_flags

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.parallel import (ParallelGroups, destroy_model_parallel, finalize_model_grads,
                                   initialize_model_parallel, parallelize_model, vocab_parallel_cross_entropy)
from megatron_gdn.training.recompute import apply_activation_recompute

# 4 q/k heads and 8 value heads: splits over 2 tensor-parallel ranks.
TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=16, num_v_heads=8)
GRANULARITIES = ["selective", "full"]


def loss_and_grads(granularity: str | None, cu_seqlens: torch.Tensor | None = None,
                   groups: ParallelGroups | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one forward/backward of the tiny model (seed 0), optionally sharded over
    the tensor-parallel group of groups with sequence parallelism, with recomputation applied (as pretrain_gdn
    does) unless granularity is None."""
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY))
    tp_group = groups.tensor_model_parallel_group if groups else None
    if groups:
        parallelize_model(model, tp_group, sequence_parallel=True)
    if granularity:
        apply_activation_recompute(model, granularity)
    tokens = torch.randint(0, TINY["vocab_size"], (1 if cu_seqlens is not None else 2, 65),
                           generator=torch.Generator().manual_seed(1))
    logits = model(tokens[:, :-1], cu_seqlens=cu_seqlens).logits
    loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], tp_group).mean()
    loss.backward()
    if groups:
        finalize_model_grads(model, tp_group, groups.data_parallel_group, sequence_parallel=True)
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_identical(got: tuple, ref: tuple, what: str) -> None:
    assert torch.equal(got[0], ref[0]), f"{what}: loss {got[0].item()} vs {ref[0].item()}"
    assert got[1].keys() == ref[1].keys()
    for name, grad in ref[1].items():
        assert torch.equal(got[1][name], grad), f"{what}: gradient of {name}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("packed", [False, True])
def test_same_loss_and_gradients(granularity, packed):
    cu_seqlens = torch.tensor([0, 21, 45, 64], dtype=torch.int32) if packed else None
    assert_identical(loss_and_grads(granularity, cu_seqlens), loss_and_grads(None, cu_seqlens),
                     f"{granularity}, packed={packed}")


def test_forward_and_backward_draw_no_random_numbers():
    """Recomputation replays the forward; that is exact only while the model draws no random numbers in it (no
    dropout). A model that starts to must restore its streams, the RNG tracker's included (training/recompute.py)."""
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY))
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    model(tokens, labels=tokens).loss.backward()
    assert torch.equal(torch.get_rng_state(), before)


def _tensor_parallel_cases() -> None:
    groups = initialize_model_parallel(2)
    reference = loss_and_grads(None, groups=groups)
    for granularity in GRANULARITIES:
        assert_identical(loss_and_grads(granularity, groups=groups), reference,
                         f"{granularity} under TP=2 with sequence parallelism, rank {dist.get_rank()}")
    destroy_model_parallel()


def test_same_gradients_under_tensor_and_sequence_parallelism():
    run_distributed(2, _tensor_parallel_cases)


def test_training_runs_give_the_same_losses(tmp_path):
    """10 iterations of pretrain_gdn's train(): one process, and 2 ranks with context parallelism (the state
    passing and the halo run again in backward) and with ZeRO-3 (DeepSpeed gathers the parameters again)."""
    reference = pretrain_gdn.train(*parse_args(train_flags()))["losses"]
    for granularity in GRANULARITIES:
        losses = pretrain_gdn.train(*parse_args(train_flags("--recompute-granularity", granularity)))["losses"]
        assert losses == reference, granularity
    selective = pretrain_gdn.train(*parse_args(train_flags("--recompute-activations")))["losses"]
    assert selective == reference, "--recompute-activations (selective)"

    cp2, zero3 = ["--context-parallel-size", "2"], ["--zero-stage", "3"]
    run_distributed(2, _train_runs, [
        ("cp2", train_flags(*cp2)), ("cp2_full", train_flags(*cp2, "--recompute-granularity", "full")),
        ("cp2_selective", train_flags(*cp2, "--recompute-activations")),
        ("zero3", train_flags(*zero3, iters=4)),
        ("zero3_full", train_flags(*zero3, "--recompute-granularity", "full", iters=4)),
        # selective: the mixer's own parameters (A_log, dt_bias) must be gathered again for the recomputation
        ("zero3_selective", train_flags(*zero3, "--recompute-activations", iters=4))], str(tmp_path))
    for base, variants in (("cp2", ("cp2_full", "cp2_selective")), ("zero3", ("zero3_full", "zero3_selective"))):
        for name in variants:
            assert read_losses(tmp_path / f"{name}.json") == read_losses(tmp_path / f"{base}.json"), name


# ----------------------------------------------------------------------------------------------------
# Memory: bytes saved for backward

def saved_activation_bytes(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct tensors that one forward of module keeps for backward, parameters excluded. A
    checkpointed piece saves its inputs through these hooks too (torch.utils.checkpoint, non-reentrant), so what
    recomputation keeps is counted. Counted once the forward is done, over the tensors still alive then: pieces of
    the graph that the output does not depend on (the short convolutions' cache tails) are freed by then."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = module(*inputs)  # noqa: F841 (keeps the graph, and what it saved, alive while counting)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (ref() for ref in saved)
                if t is not None}  # views of one storage count once
    return sum(size for ptr, size in storages.items() if ptr not in parameters)


def per_block_bytes(granularity: str | None, tokens: torch.Tensor, autocast: torch.dtype | None = None,
                    fp32_residual: bool = False) -> float:
    """Saved bytes per block: the difference between 4 and 2 blocks (embedding, head and loss cancel out)."""
    saved = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{**TINY, "num_hidden_layers": layers}))
        model.model.fp32_residual = fp32_residual
        if granularity:
            apply_activation_recompute(model, granularity)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            saved[layers] = saved_activation_bytes(model, tokens, tokens)
    return (saved[4] - saved[2]) / 2


def test_recomputation_saves_memory():
    tokens = torch.randint(0, TINY["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(1))
    B, T, h = *tokens.shape, TINY["hidden_size"]
    hidden_state = B * T * h * 4  # one fp32 [B, T, hidden] tensor
    none, selective, full = (per_block_bytes(g, tokens) for g in (None, "selective", "full"))
    # full: a block keeps its input only.
    assert full == hidden_state
    # selective: the mixer keeps its input only; everything else it saved without recomputation is gone.
    torch.manual_seed(0)
    mixer = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY)).model.layers[0].attn
    # Its input requires grad, as a block's does: the fused projection then keeps its weights for the input's
    # gradient (and the count includes the input).
    mixer_saved = saved_activation_bytes(mixer, torch.randn(B, T, h, requires_grad=True))
    assert none - selective == mixer_saved - hidden_state
    # The mixer holds most of a block's activations (q, k, v, gate, the convolutions' and the delta rule's
    # intermediates: tens of hidden states), the MLP a few (its input and 4 x intermediate_size channels).
    assert selective < none / 2 and full < selective / 10


def test_residual_stream_in_autocast_dtype_halves_what_full_recomputation_keeps():
    """Under bf16 autocast the residual stream is bf16 (Megatron-LM's default under --bf16), so the one hidden
    state a block keeps with full recomputation takes 2 bytes per value; --fp32-residual-connection keeps 4."""
    tokens = torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    values = tokens.numel() * TINY["hidden_size"]
    assert per_block_bytes("full", tokens, torch.bfloat16) == 2 * values
    assert per_block_bytes("full", tokens, torch.bfloat16, fp32_residual=True) == 4 * values
    flags = ["--mock-data", "--vocab-size", "512", "--num-layers", "1", "--hidden-size", "64", "--device", "cpu"]
    for extra, expected in (([], False), (["--fp32-residual-connection"], True)):
        config, cfg = parse_args(flags + extra)
        groups, device, ds_config = pretrain_gdn.setup_run(config, cfg)
        try:
            engine, _ = pretrain_gdn.build_engine(config, cfg, groups, device, ds_config)
            assert engine.model.model.fp32_residual is expected
        finally:
            destroy_model_parallel()
