"""Tensor and sequence parallelism on CPU: gloo process groups in spawned processes, compared with one process.

Every parallel result is checked against the single-process model built from the same seed, in fp32,
with a relative error (||parallel - reference|| / ||reference||) below 1e-5: outputs, the loss, and every
gradient gathered back to its full shape (../DESIGN.md section 4: equivalence is the test).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.models import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.parallel import (destroy_model_parallel, finalize_model_grads, initialize_model_parallel,
                                   model_parallel_rng_tracker, parallelize_model, parallelize_region, rank_grid,
                                   rule_for, shutdown_distributed, vocab_parallel_cross_entropy)
from megatron_gdn.parallel.mappings import _all_gather
from megatron_gdn.parallel.random import MODEL_PARALLEL_RNG
from megatron_gdn.parallel.sharding import check_tensor_parallel_config, shard_tensor
from megatron_gdn.training.checkpointing import checkpoint_file

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=16)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------------------------------
# Spawning gloo process groups

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    # What torchrun would set: train() reads WORLD_SIZE to check the layout.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # the test machine has few cores and runs several ranks
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        shutdown_distributed()


def run_distributed(world_size: int, fn, *args) -> None:
    """Run fn(*args) in world_size spawned processes joined by gloo; a failure in any rank fails the test."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


def gather_full(tensor: torch.Tensor, name: str, group) -> torch.Tensor:
    """The full tensor of a parameter (or its gradient) from the TP ranks' shards, by its sharding rule."""
    rule = rule_for(name)
    return _all_gather(tensor.contiguous(), group, rule.dim) if rule.is_sharded else tensor


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = rel_err(got, ref)
    assert err < TOLERANCE, f"{what}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------------
# Equivalence of the GDN layer and the whole model (run inside the spawned ranks)

def _layer_case(tp: int, sequence_parallel: bool, num_v_heads: int, **options) -> None:
    groups = initialize_model_parallel(tp)
    # the loop's host-side agreements (the exit decision) go through gloo over every rank, never a GPU tensor
    assert dist.get_backend(groups.host_group) == "gloo"
    assert dist.get_world_size(groups.host_group) == dist.get_world_size()
    group, rank = groups.tensor_model_parallel_group, groups.tensor_model_parallel_rank
    layer_args = dict(hidden_size=64, num_heads=4, head_dim=16, num_v_heads=num_v_heads, layer_idx=0, **options)
    torch.manual_seed(0)
    reference = GatedDeltaNet(**layer_args)
    torch.manual_seed(0)
    layer = parallelize_region(GatedDeltaNet(**layer_args), group, sequence_parallel)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 64, generator=data)
    weight = torch.randn(2, 40, 64, generator=data)  # a loss that weighs every output differently

    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref)[0]
    (y_ref * weight).sum().backward()

    # Under sequence parallelism each rank holds a slice of the sequence going in and coming out.
    local = (lambda t: t.chunk(tp, dim=1)[rank]) if sequence_parallel else (lambda t: t)
    x_local = local(x).clone().requires_grad_()
    y = layer(x_local)[0]
    (y * local(weight)).sum().backward()
    finalize_model_grads(layer, group, groups.data_parallel_group, sequence_parallel)

    full = (lambda t: _all_gather(t, group, 1)) if sequence_parallel else (lambda t: t)
    what = f"GDN layer TP={tp} SP={sequence_parallel} HV={num_v_heads} {options}"
    assert_close(full(y.detach()), y_ref.detach(), f"{what} output")
    assert_close(full(x_local.grad), x_ref.grad, f"{what} input gradient")
    ref_params = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        assert torch.equal(gather_full(p.detach(), name, group), ref_params[name].detach()), f"{what} init {name}"
        assert_close(gather_full(p.grad, name, group), ref_params[name].grad, f"{what} gradient of {name}")
    destroy_model_parallel()


def _model_case(tp: int, sequence_parallel: bool, num_v_heads: int, packed: bool, tied: bool = False) -> None:
    groups = initialize_model_parallel(tp)
    group, dp_group = groups.tensor_model_parallel_group, groups.data_parallel_group
    config = GatedDeltaNetConfig(**TINY, num_v_heads=num_v_heads, tie_word_embeddings=tied)
    torch.manual_seed(0)
    reference = GatedDeltaNetForCausalLM(config)
    torch.manual_seed(0)
    model = parallelize_model(GatedDeltaNetForCausalLM(config), group, sequence_parallel)

    # Each data-parallel rank gets its own batch; the ranks of a TP group share one.
    data = torch.Generator().manual_seed(100 + groups.data_parallel_rank)
    if packed:  # one row of three documents: the state and the conv restart at each start
        tokens = torch.randint(0, 500, (1, 65), generator=data)
        cu_seqlens = torch.tensor([0, 21, 45, 64], dtype=torch.int32)
    else:
        tokens, cu_seqlens = torch.randint(0, 500, (2, 33), generator=data), None
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    logits_ref = reference(inputs, cu_seqlens=cu_seqlens).logits
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), targets.flatten())
    loss_ref.backward()
    for p in reference.parameters():  # the expected gradient is the mean over the data-parallel batches
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= groups.data_parallel_size

    logits = model(inputs, cu_seqlens=cu_seqlens).logits
    assert logits.shape[-1] == config.vocab_size // tp
    loss = vocab_parallel_cross_entropy(logits, targets, group).mean()
    loss.backward()
    finalize_model_grads(model, group, dp_group, sequence_parallel)

    what = (f"model TP={tp} DP={groups.data_parallel_size} SP={sequence_parallel} HV={num_v_heads} "
            f"packed={packed} tied={tied}")
    assert_close(_all_gather(logits.detach(), group, -1), logits_ref.detach(), f"{what} logits")
    assert_close(loss.detach(), loss_ref.detach(), f"{what} loss")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(gather_full(p.detach(), name, group), ref_params[name].detach()), f"{what} init {name}"
        assert_close(gather_full(p.grad, name, group), ref_params[name].grad, f"{what} gradient of {name}")
    destroy_model_parallel()


def _vocab_parallel_cross_entropy_case(tp: int) -> None:
    groups = initialize_model_parallel(tp)
    group = groups.tensor_model_parallel_group
    data = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(3, 7, 64, generator=data)
    target = torch.randint(0, 64, (3, 7), generator=data)
    target[0, :2] = -100  # ignored positions
    logits_ref = logits.clone().requires_grad_()
    ref = F.cross_entropy(logits_ref.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
    (ref * torch.arange(21.0)).sum().backward()
    local = logits.chunk(tp, dim=-1)[groups.tensor_model_parallel_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group)
    (loss.flatten() * torch.arange(21.0)).sum().backward()
    assert_close(loss.flatten(), ref.detach(), "vocab-parallel cross entropy")
    assert_close(_all_gather(local.grad, group, -1), logits_ref.grad, "vocab-parallel cross entropy gradient")
    destroy_model_parallel()


def _equivalence_battery(world_size: int) -> None:
    _vocab_parallel_cross_entropy_case(world_size)
    for sequence_parallel in (False, True):
        for num_v_heads in (4, 8):  # 8 = 2 x num_heads: each q/k head serves two value heads
            _layer_case(world_size, sequence_parallel, num_v_heads)
        _model_case(world_size, sequence_parallel, num_v_heads=8, packed=False)
    # the other mixer variants: no output gate (plain o_norm), no short convolutions, beta in (0, 2)
    _layer_case(world_size, True, 4, use_gate=False, use_short_conv=False, allow_neg_eigval=True)
    _model_case(world_size, sequence_parallel=True, num_v_heads=4, packed=True, tied=True)
    if world_size == 4:  # tensor x data parallel: TP groups {0,1}, {2,3}, DP groups {0,2}, {1,3}
        _model_case(2, sequence_parallel=True, num_v_heads=8, packed=False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_layer_and_model_match_single_process(world_size):
    run_distributed(world_size, _equivalence_battery, world_size)


# ----------------------------------------------------------------------------------------------------
# Training: TP=2 (with and without SP) against TP=1, and checkpoints resharded to TP=1 and TP=4

TRAIN_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--head-dim", "16",
               "--num-v-heads", "8"]


def train_flags(*extra: str, iters: int = 10) -> list[str]:
    return [*TRAIN_MODEL, "--mock-data", "--vocab-size", "500", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "5", "--eval-interval", "5", "--eval-iters", "1", *extra]


def _train_runs(runs: list[tuple[str, list[str]]], out_dir: str) -> None:
    """Run pretrain_gdn.train for each (name, flags) in this rank; rank 0 writes the losses to name.json."""
    for name, argv in runs:
        losses = pretrain_gdn.train(*parse_args(argv))["losses"]
        if dist.get_rank() == 0:
            Path(out_dir, f"{name}.json").write_text(json.dumps(losses))
        destroy_model_parallel()


def read_losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def assert_same_losses(got: dict[int, float], ref: dict[int, float], what: str) -> None:
    assert sorted(got) == sorted(ref), what
    for it in ref:
        assert abs(got[it] - ref[it]) <= TOLERANCE * abs(ref[it]), f"{what} iteration {it}: {got[it]} vs {ref[it]}"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_and_resharded_checkpoints_match_single_process(tmp_path, capsys):
    tp2_ckpt = str(tmp_path / "tp2")
    run_distributed(2, _train_runs, [
        ("tp2", train_flags("--tensor-model-parallel-size", "2", "--save", tp2_ckpt, "--save-interval", "5")),
        ("tp2_sp", train_flags("--tensor-model-parallel-size", "2", "--sequence-parallel")),
    ], str(tmp_path))
    tp1 = pretrain_gdn.train(*parse_args(train_flags()))["losses"]
    assert tp1[10] < tp1[1]  # it learns
    assert_same_losses(read_losses(tmp_path / "tp2.json"), tp1, "TP=2 vs TP=1")
    assert_same_losses(read_losses(tmp_path / "tp2_sp.json"), tp1, "TP=2 + SP vs TP=1")
    assert checkpoint_file(tp2_ckpt, 5, 1).exists()

    # A TP=2 checkpoint does not load at another size without conversion, and says how to convert it.
    assert pretrain_gdn.main(train_flags("--load", tp2_ckpt, "--ckpt-step", "5")) == 2
    assert "tools/reshard_checkpoint.py" in capsys.readouterr().err

    reshard = load_tool("reshard_checkpoint")
    for tp in (1, 4):
        assert reshard.main(["--load", tp2_ckpt, "--ckpt-step", "5", "--save", str(tmp_path / f"tp{tp}"),
                             "--target-tensor-model-parallel-size", str(tp)]) == 0
    continued = {it: loss for it, loss in tp1.items() if it > 5}
    resumed_tp1 = pretrain_gdn.train(*parse_args(train_flags("--load", str(tmp_path / "tp1"))))["losses"]
    assert_same_losses(resumed_tp1, continued, "TP=2 checkpoint resharded to TP=1, resumed")
    run_distributed(4, _train_runs, [
        ("tp4", train_flags("--tensor-model-parallel-size", "4", "--load", str(tmp_path / "tp4"))),
        ("tp2_dp2", train_flags("--tensor-model-parallel-size", "2", "--load", tp2_ckpt, "--ckpt-step", "5")),
    ], str(tmp_path))
    assert_same_losses(read_losses(tmp_path / "tp4.json"), continued, "TP=2 checkpoint resharded to TP=4, resumed")
    assert_same_losses(read_losses(tmp_path / "tp2_dp2.json"), continued, "TP=2 checkpoint resumed at TP=2 x DP=2")

    # Replicated weights must agree on every rank: a drifted checkpoint is refused, not silently merged.
    path = checkpoint_file(tp2_ckpt, 5, 1)
    state = torch.load(path, weights_only=True)
    state["model"]["model.layers.0.attn.o_norm.weight"] += 1e-3
    torch.save(state, path)
    assert reshard.main(["--load", tp2_ckpt, "--ckpt-step", "5", "--save", str(tmp_path / "drifted"),
                         "--target-tensor-model-parallel-size", "1"]) == 2
    assert "differs between tensor-parallel ranks" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Single-process checks: the sharding rule, the rank layout, the RNG tracker, errors before any work

def test_qk_heads_stay_with_their_value_heads():
    """num_v_heads = 2 x num_heads: value head j reads q/k head j // 2, and both land on the same rank."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(hidden_size=64, num_heads=4, head_dim=16, num_v_heads=8)
    H, HV, K, V = 4, 8, 16, 32
    for tp in (2, 4):
        for rank in range(tp):
            q = shard_tensor(layer.q_proj.weight, rule_for("attn.q_proj.weight"), rank, tp)
            v = shard_tensor(layer.v_proj.weight, rule_for("attn.v_proj.weight"), rank, tp)
            a_log = shard_tensor(layer.A_log, rule_for("attn.A_log"), rank, tp)
            qk_heads = range(rank * H // tp, (rank + 1) * H // tp)
            v_heads = range(rank * HV // tp, (rank + 1) * HV // tp)
            assert {j // (HV // H) for j in v_heads} == set(qk_heads)
            assert torch.equal(q, layer.q_proj.weight[qk_heads.start * K: qk_heads.stop * K])
            assert torch.equal(v, layer.v_proj.weight[v_heads.start * V: v_heads.stop * V])
            assert torch.equal(a_log, layer.A_log[v_heads.start: v_heads.stop])


def test_every_parameter_has_one_rule():
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY, conv_bias=True, tie_word_embeddings=True))
    rules = {name: rule_for(name) for name, _ in model.named_parameters(remove_duplicate=False)}
    assert rules["model.layers.0.attn.o_norm.weight"].needs_grad_all_reduce(sequence_parallel=False)
    assert not rules["model.norm.weight"].needs_grad_all_reduce(sequence_parallel=False)
    assert rules["model.norm.weight"].needs_grad_all_reduce(sequence_parallel=True)
    assert rules["model.layers.1.attn.o_proj.weight"].dim == 1 and rules["model.layers.1.mlp.up_proj.weight"].dim == 0
    with pytest.raises(KeyError, match="sharding rules"):
        rule_for("model.layers.0.attn.new_thing.weight")


def test_rank_layout_is_tensor_parallel_innermost():
    grid = rank_grid(8, 2, 2)
    assert grid["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_rng_tracker_streams_differ_per_rank_and_restore_the_default():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    draws = []
    for tp_rank in (0, 1):
        tracker = model_parallel_rng_tracker(1234, tp_rank)
        with tracker.fork():
            draws.append(torch.rand(4))
        states = tracker.get_states()
        with tracker.fork():
            following = torch.rand(4)
        tracker.set_states(states)
        with tracker.fork(MODEL_PARALLEL_RNG):
            assert torch.equal(torch.rand(4), following)  # saved states continue the stream exactly
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(torch.get_rng_state(), before)


def main_error(argv: list[str], capsys) -> str:
    assert pretrain_gdn.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("extra, world_size, message", [
    (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--num-v-heads", "6"], 2,
     "num_heads (q/k heads; --num-attention-heads) = 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "129"], 2, "intermediate_size"),
    (["--tensor-model-parallel-size", "2"], 3, "world size (3 processes) must be divisible by"),
    (["--tensor-model-parallel-size", "2"], 1, "launch a multiple of 2 processes"),
    (["--sequence-parallel"], 1, "--sequence-parallel splits activations across the tensor-parallel ranks"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "30"], 4,
     "--seq-length (30) divisible by --tensor-model-parallel-size (4)"),
    (["--context-parallel-size", "2", "--seq-length", "31"], 2,
     "--seq-length (31) must be divisible by --context-parallel-size (2)"),  # more in tests/test_context_parallel.py
])
def test_errors_before_any_work(extra, world_size, message, monkeypatch, capsys):
    """Bad layouts fail with one line before torch.distributed is touched (WORLD_SIZE is what torchrun sets)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert message in main_error(train_flags(*extra, iters=1), capsys)
    assert not dist.is_initialized()


def test_tensor_parallel_config_check_names_the_field():
    check_tensor_parallel_config(GatedDeltaNetConfig(**TINY), 4)
    with pytest.raises(ValueError, match="num_heads"):
        check_tensor_parallel_config(GatedDeltaNetConfig(**{**TINY, "num_heads": 6}), 4)
