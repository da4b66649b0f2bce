"""Context parallelism on CPU: gloo process groups in spawned processes, compared with one process.

Equivalence is the test (../DESIGN.md section 4): the same inputs and weights split across CP = 2 and 4 ranks give
the single-process outputs, final states and every gradient, in fp32 with a relative error below 1e-5, for both
--cp-comm-type state_passing and all_to_all: one sequence across all ranks with slice boundaries inside and on
chunk boundaries, many short documents crossing ranks (one spanning several), num_v_heads = 2 x num_heads, a
head count CP does not divide; the GDN layer with its short-convolution halo; the model at CP=2 x TP=2; and
10 training iterations of pretrain_gdn at CP=2 (also with packed documents, all-to-all, and x TP=2) with the
losses of CP=1. The PyTorch reference runs the kernels, except in one small case under Triton's interpreter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernel_cases

import pretrain_gdn
from megatron_gdn.config import parse_args
from megatron_gdn.data.mock_dataset import MockGPTDataset
from megatron_gdn.kernels import chunk_gated_delta_rule
from megatron_gdn.models import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from megatron_gdn.parallel import (destroy_model_parallel, finalize_model_grads, initialize_model_parallel,
                                   parallelize_model, shutdown_distributed, vocab_parallel_cross_entropy)
from megatron_gdn.parallel.context_parallel import (apply_context_parallel, check_context_parallel_config,
                                                    context_parallel_chunk_gated_delta_rule, slice_layout,
                                                    split_sequence)
from megatron_gdn.parallel.mappings import _all_gather
from kernel_cases import make_inputs
from test_tensor_parallel import (TINY, _free_port, assert_close, assert_same_losses, gather_full, main_error,
                                  read_losses, run_distributed)

COMM_TYPES = ("state_passing", "all_to_all")
# The mixer's options: L2 norm of q/k, the gate from its logits, beta's sigmoid.
OPTIONS = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _all_gather(x.detach().contiguous(), group, dim)


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's (possibly empty) x along dim 0, in rank order."""
    pieces = [None] * dist.get_world_size(group)
    dist.all_gather_object(pieces, x.detach().cpu(), group=group)
    return torch.cat(pieces)


def sum_over(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


# ----------------------------------------------------------------------------------------------------
# The op: outputs, final states, gradients

def _op_case(cp: int, comm_type: str, batch: int, T: int, H: int, HV: int, docs: list[int] | None,
             backend: str = "torch") -> None:
    groups = initialize_model_parallel(1, cp)
    group = groups.context_parallel_group
    K, V = 8, 16
    data = torch.Generator().manual_seed(T + H + HV)
    q, k = torch.randn(batch, T, H, K, generator=data), torch.randn(batch, T, H, K, generator=data)
    v = torch.randn(batch, T, HV, V, generator=data)
    a, b = torch.randn(batch, T, HV, generator=data), torch.randn(batch, T, HV, generator=data)
    torch.manual_seed(HV)  # the decay parameters as the layer initialises them (A ~ U(0, 16), dt ~ logU(1e-3, 0.1))
    layer = GatedDeltaNet(hidden_size=8, num_heads=H, num_v_heads=HV, head_dim=K)
    A_log, dt_bias = layer.A_log.detach(), layer.dt_bias.detach()
    cu_seqlens = None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    num_seqs = batch if docs is None else len(docs)
    w_o, w_s = torch.randn(batch, T, HV, V, generator=data), torch.randn(num_seqs, HV, K, V, generator=data)

    def run(tensors, op, weight_o, weight_s):
        leaves = [t.clone().requires_grad_() for t in tensors]
        q, k, v, a, b, A_log, dt_bias = leaves
        o, final = op(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, output_final_state=True, **OPTIONS)
        ((o * weight_o).sum() + (final * weight_s).sum()).backward()
        return o.detach(), final.detach(), [t.grad for t in leaves]

    inputs = (q, k, v, a, b, A_log, dt_bias)
    o_ref, final_ref, grads_ref = run(inputs, lambda *x, **kw: chunk_gated_delta_rule(
        *x, cu_seqlens=cu_seqlens, backend=backend, **kw), w_o, w_s)

    local = [split_sequence(t, group) for t in inputs[:5]] + [A_log, dt_bias]
    # The sequences ending on this rank, whose final states it returns (rows end on the last rank).
    r, L = groups.context_parallel_rank, T // cp
    ends = [n for n in range(num_seqs) if r * L < (T if docs is None else cu_seqlens[n + 1]) <= (r + 1) * L]
    o, final, grads = run(local, lambda *x, **kw: context_parallel_chunk_gated_delta_rule(
        *x, group=group, comm_type=comm_type, cu_seqlens=cu_seqlens, backend=backend, **kw),
        split_sequence(w_o, group), w_s[ends])

    what = f"op CP={cp} {comm_type} B={batch} T={T} H={H} HV={HV} docs={docs} {backend}"
    assert_close(gather_sequence(o, group), o_ref, f"{what} output")
    assert_close(gather_rows(final, group), final_ref, f"{what} final states")
    names = ("dq", "dk", "dv", "d gate logits", "d beta logits")
    for name, grad, ref in zip(names, grads[:5], grads_ref[:5]):
        assert_close(gather_sequence(grad, group), ref, f"{what} {name}")
    for name, grad, ref in zip(("dA_log", "ddt_bias"), grads[5:], grads_ref[5:]):
        assert_close(sum_over(grad, group), ref, f"{what} {name}")
    destroy_model_parallel()


# Slices of 40 tokens end inside a 64-token chunk, slices of 64 on chunk boundaries.
def _op_battery(cp: int) -> None:
    for comm_type in COMM_TYPES:
        _op_case(cp, comm_type, batch=2, T=40 * cp, H=4, HV=4, docs=None)  # a sequence per row, across all ranks
        _op_case(cp, comm_type, batch=1, T=64 * cp, H=4, HV=8, docs=None)  # HV = 2H, slices on chunk boundaries
    # Many short documents, packed, slices of 48: lengths 1 and 3, documents crossing a rank boundary, a
    # boundary on a rank boundary, and (CP = 4) one document over three ranks: two hops of the chain.
    many = [[1, 30, 10, 3, 52], [20, 28, 30, 18]] if cp == 2 else [[1, 30, 17, 100, 3, 41]]
    for docs in many:
        for comm_type in COMM_TYPES:
            _op_case(cp, comm_type, batch=1, T=48 * cp, H=4, HV=8, docs=docs)
    _op_case(cp, "state_passing", batch=1, T=48 * cp, H=3, HV=6, docs=many[0])  # CP does not divide the heads


@pytest.mark.parametrize("cp", [2, 4])
def test_op_matches_single_process(cp):
    run_distributed(cp, _op_battery, cp)


# ----------------------------------------------------------------------------------------------------
# The GDN layer (short-convolution halo included) and the model at CP x TP

def _layer_case(cp: int, comm_type: str, num_v_heads: int, docs: list[int] | None, **options) -> None:
    groups = initialize_model_parallel(1, cp)
    group = groups.context_parallel_group
    layer_args = dict(hidden_size=32, num_heads=4, head_dim=8, num_v_heads=num_v_heads, layer_idx=0, **options)
    torch.manual_seed(0)
    reference = GatedDeltaNet(**layer_args)
    torch.manual_seed(0)
    layer = apply_context_parallel(GatedDeltaNet(**layer_args), group, comm_type)
    batch, T = (2, 20 * cp) if docs is None else (1, sum(docs))
    cu_seqlens = None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    data = torch.Generator().manual_seed(1)
    x, weight = torch.randn(batch, T, 32, generator=data), torch.randn(batch, T, 32, generator=data)

    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref, cu_seqlens=cu_seqlens)[0]
    (y_ref * weight).sum().backward()
    x_local = split_sequence(x, group).clone().requires_grad_()
    y = layer(x_local, cu_seqlens=cu_seqlens)[0]
    (y * split_sequence(weight, group)).sum().backward()

    what = f"GDN layer CP={cp} {comm_type} HV={num_v_heads} docs={docs} {options}"
    assert_close(gather_sequence(y.detach(), group), y_ref.detach(), f"{what} output")
    assert_close(gather_sequence(x_local.grad, group), x_ref.grad, f"{what} input gradient")
    ref_params = dict(reference.named_parameters())
    assert [name for name, _ in layer.named_parameters()] == list(ref_params)  # same names, same order
    for name, p in layer.named_parameters():
        assert_close(sum_over(p.grad, group), ref_params[name].grad, f"{what} gradient of {name}")
    # Evaluation: slices this short would take the fused recurrent path on one process; under CP they run the
    # chunked rule across ranks (the same function).
    reference.eval(), layer.eval()
    with torch.no_grad():
        y_eval = layer(split_sequence(x, group), cu_seqlens=cu_seqlens)[0]
        assert_close(gather_sequence(y_eval, group), reference(x, cu_seqlens=cu_seqlens)[0], f"{what} eval output")
    destroy_model_parallel()


def _layer_errors(cp: int) -> None:
    """Generation, labels and an initial state are refused with a message that says why."""
    groups = initialize_model_parallel(1, cp)
    group = groups.context_parallel_group
    model = apply_context_parallel(GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY)), group)
    tokens = torch.randint(0, 500, (1, 8 * cp))
    for call in (lambda: model.generate(split_sequence(tokens, group), max_new_tokens=2),
                 lambda: model(split_sequence(tokens, group), use_cache=True)):
        with pytest.raises(ValueError, match="generation .* single-process model"):
            call()
    with pytest.raises(ValueError, match="cannot shift labels"):
        model(split_sequence(tokens, group), labels=split_sequence(tokens, group))
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="does not take an initial state"):
        context_parallel_chunk_gated_delta_rule(q, q, q, q[..., 0], q[..., 0], group,
                                                initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="shorter than the short convolution's halo"):
        model(torch.randint(0, 500, (1, 2)))
    fused = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY, attn_mode="fused_recurrent"))
    with pytest.raises(ValueError, match="chunked delta rule"):
        apply_context_parallel(fused, group)
    destroy_model_parallel()


def _model_case(tp: int, cp: int, sequence_parallel: bool, packed: bool, comm_type: str) -> None:
    groups = initialize_model_parallel(tp, cp)
    tp_group, cp_group = groups.tensor_model_parallel_group, groups.context_parallel_group
    config = GatedDeltaNetConfig(**TINY, num_v_heads=8)
    torch.manual_seed(0)
    reference = GatedDeltaNetForCausalLM(config)
    torch.manual_seed(0)
    model = parallelize_model(GatedDeltaNetForCausalLM(config), tp_group, sequence_parallel)
    apply_context_parallel(model, cp_group, comm_type)

    data = torch.Generator().manual_seed(100)
    if packed:  # four documents in one row, two of them crossing the CP boundary
        tokens, cu_seqlens = torch.randint(0, 500, (1, 97), generator=data), torch.tensor([0, 21, 45, 70, 96])
    else:
        tokens, cu_seqlens = torch.randint(0, 500, (2, 65), generator=data), None
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits_ref = reference(inputs, cu_seqlens=cu_seqlens).logits
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), targets.flatten())
    loss_ref.backward()

    logits = model(split_sequence(inputs, cp_group), cu_seqlens=cu_seqlens).logits
    loss = vocab_parallel_cross_entropy(logits, split_sequence(targets, cp_group), tp_group).mean()
    loss.backward()
    finalize_model_grads(model, tp_group, groups.data_context_parallel_group, sequence_parallel)

    what = f"model TP={tp} CP={cp} SP={sequence_parallel} packed={packed} {comm_type}"
    full_logits = gather_sequence(_all_gather(logits.detach(), tp_group, -1), cp_group)
    assert_close(full_logits, logits_ref.detach(), f"{what} logits")
    assert_close(sum_over(loss.detach(), cp_group) / cp, loss_ref.detach(), f"{what} loss")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert_close(gather_full(p.grad, name, tp_group), ref_params[name].grad, f"{what} gradient of {name}")
    destroy_model_parallel()


def _layer_battery(cp: int) -> None:
    for comm_type in COMM_TYPES:
        _layer_case(cp, comm_type, num_v_heads=8, docs=None)
        _layer_case(cp, comm_type, num_v_heads=4, docs=[1, 6, 3 + 20 * cp - 20, 10])
    # the other mixer variants: no output gate, no short convolutions, beta in (0, 2), a wider conv
    _layer_case(cp, "state_passing", 4, None, use_gate=False, use_short_conv=False, allow_neg_eigval=True)
    _layer_case(cp, "state_passing", 4, [2, 5, 20 * cp - 7], conv_size=6, conv_bias=True)
    if cp == 2:
        _layer_errors(cp)


@pytest.mark.parametrize("cp", [2, 4])
def test_layer_matches_single_process(cp):
    run_distributed(cp, _layer_battery, cp)


def _model_battery() -> None:
    _model_case(2, 2, sequence_parallel=False, packed=True, comm_type="state_passing")
    _model_case(2, 2, sequence_parallel=True, packed=False, comm_type="state_passing")
    _model_case(2, 2, sequence_parallel=True, packed=True, comm_type="all_to_all")


def test_model_at_context_parallel_2_x_tensor_parallel_2_matches_single_process():
    run_distributed(4, _model_battery)


# ----------------------------------------------------------------------------------------------------
# Training with pretrain_gdn: CP=2 (and CP=2 x TP=2, CP=4) against CP=1

TRAIN_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--head-dim", "16",
               "--num-v-heads", "8"]


def train_flags(*extra: str) -> list[str]:
    return [*TRAIN_MODEL, "--mock-data", "--vocab-size", "500", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--log-interval", "5", "--eval-interval", "5", "--eval-iters", "1", *extra]


class DocumentMockDataset(MockGPTDataset):
    """Mock samples with document boundaries (what --reset-state-at-eod gives), different in every sample."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        first = 1 + index % 13
        sample["cu_seqlens"] = torch.tensor([0, first, first + 11, self.seq_length], dtype=torch.int32)
        return sample


def document_datasets(cfg):
    num_train, num_valid = cfg.train_iters * cfg.global_batch_size, 4 * cfg.global_batch_size
    return (cfg.vocab_size, DocumentMockDataset(num_train, cfg.seq_length, cfg.vocab_size, cfg.seed),
            DocumentMockDataset(num_valid, cfg.seq_length, cfg.vocab_size, cfg.seed, split=1))


def _train_runs(runs: list[tuple[str, list[str], bool]], out_dir: str) -> None:
    """pretrain_gdn.train for each (name, flags, with documents) in this rank; rank 0 writes name.json."""
    plain = pretrain_gdn.build_datasets
    for name, argv, documents in runs:
        pretrain_gdn.build_datasets = document_datasets if documents else plain
        losses = pretrain_gdn.train(*parse_args(argv))["losses"]
        if dist.get_rank() == 0:
            Path(out_dir, f"{name}.json").write_text(json.dumps(losses))
        destroy_model_parallel()
    pretrain_gdn.build_datasets = plain


def test_training_matches_single_process(tmp_path, monkeypatch):
    cp2, ckpt = ["--context-parallel-size", "2"], str(tmp_path / "cp2_ckpt")
    run_distributed(2, _train_runs, [
        ("cp2", train_flags(*cp2, "--save", ckpt, "--save-interval", "5"), False),
        ("cp2_docs", train_flags(*cp2), True),
        ("cp2_a2a_docs", train_flags(*cp2, "--cp-comm-type", "all_to_all"), True),
    ], str(tmp_path))
    run_distributed(4, _train_runs, [
        ("cp2_tp2_sp", train_flags(*cp2, "--tensor-model-parallel-size", "2", "--sequence-parallel"), True),
        ("cp4", train_flags("--context-parallel-size", "4"), False),
    ], str(tmp_path))
    cp1 = pretrain_gdn.train(*parse_args(train_flags()))["losses"]
    # CP splits activations, not weights: a CP=2 checkpoint resumes on one process with the same losses.
    resumed = pretrain_gdn.train(*parse_args(train_flags("--load", ckpt, "--ckpt-step", "5")))["losses"]
    assert_same_losses(resumed, {it: loss for it, loss in cp1.items() if it > 5}, "CP=2 checkpoint resumed at CP=1")
    monkeypatch.setattr(pretrain_gdn, "build_datasets", document_datasets)
    cp1_docs = pretrain_gdn.train(*parse_args(train_flags()))["losses"]
    assert cp1[10] < cp1[1] and cp1_docs[10] < cp1_docs[1]  # it learns
    for name, reference in (("cp2", cp1), ("cp4", cp1), ("cp2_docs", cp1_docs), ("cp2_a2a_docs", cp1_docs),
                            ("cp2_tp2_sp", cp1_docs)):
        assert_same_losses(read_losses(tmp_path / f"{name}.json"), reference, f"{name} vs CP=1")


# ----------------------------------------------------------------------------------------------------
# Errors before any work

@pytest.mark.parametrize("extra, world_size, message", [
    (["--context-parallel-size", "2", "--seq-length", "31"], 2,
     "--seq-length (31) must be divisible by --context-parallel-size (2)"),
    (["--context-parallel-size", "4", "--seq-length", "8"], 4, "shorter than the short convolution's halo (3 tokens)"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length",
      "34"], 4, "--seq-length must be divisible by CP x TP = 4"),
    (["--context-parallel-size", "2", "--cp-comm-type", "all_to_all", "--num-attention-heads", "3", "--num-v-heads",
      "3"], 2, "--num-attention-heads (3) / TP (1) = 3 is not divisible by --context-parallel-size (2)"),
    (["--context-parallel-size", "4", "--cp-comm-type", "all_to_all", "--tensor-model-parallel-size", "2"], 8,
     "--num-attention-heads (4) / TP (2) = 2 is not divisible by --context-parallel-size (4)"),
    (["--context-parallel-size", "3", "--seq-length", "33"], 2, "world size (2 processes) must be divisible by"),
])
def test_errors_before_any_work(extra, world_size, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert message in main_error(train_flags(*extra), capsys)
    assert not dist.is_initialized()


def test_fused_recurrent_mode_is_refused():
    config = GatedDeltaNetConfig(**TINY, attn_mode="fused_recurrent")
    with pytest.raises(ValueError, match="chunked delta rule; the model's attn_mode is 'fused_recurrent'"):
        check_context_parallel_config(config, 2, "state_passing", 64)
    check_context_parallel_config(GatedDeltaNetConfig(**TINY), 2, "state_passing", 64)


def test_slice_layout_of_documents_crossing_ranks():
    cu_seqlens = torch.tensor([0, 1, 31, 48, 148, 151, 192])  # slices of 48 tokens over 4 ranks
    layouts = [slice_layout(cu_seqlens, 48, rank, 4) for rank in range(4)]
    assert [x.local_cu_seqlens.tolist() for x in layouts] == [[0, 1, 31, 48], [0, 48], [0, 48], [0, 4, 7, 48]]
    assert [x.relative_cu_seqlens.tolist() for x in layouts] == [[0, 1, 31, 48], [0, 100], [-48, 52],
                                                                [-96, 4, 7, 48]]
    assert [(x.pre_ranks, x.post_ranks) for x in layouts] == [(0, 0), (0, 2), (1, 1), (2, 0)]
    assert [x.ends_here for x in layouts] == [[0, 1, 2], [], [], [0, 1, 2]]
    rows = [slice_layout(None, 10, rank, 3, num_rows=2) for rank in range(3)]
    assert [(x.pre_ranks, x.post_ranks, x.ends_here) for x in rows] == [(0, 2, []), (1, 1, []), (2, 0, [0, 1])]


def _triton_case() -> None:
    _op_case(2, "state_passing", batch=1, T=80, H=2, HV=4, docs=[30, 41, 9], backend="triton")


def test_op_with_the_triton_kernels_in_the_interpreter(monkeypatch):
    """The Triton chunk kernels (forward and backward) under state passing, in Triton's interpreter (fp32)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks before their first Triton call
    run_distributed(2, _triton_case)


# ----------------------------------------------------------------------------------------------------
# GPU (NCCL, bf16, the compiled Triton kernels): CP = 2 and 4 at 64K tokens within the kernel budgets

def _nccl_worker(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
    try:
        fn(*args)
    finally:
        shutdown_distributed()


def _gpu_cases(cp_sizes: list[int], T: int, device: str, dtype: torch.dtype, backend: str, bf16: bool) -> None:
    """For one sequence and for documents crossing the ranks: CP = 1 and each CP size and method, against the
    fp64 reference, by kernel_cases' RMS metric. Every rank runs; rank 0 checks and prints."""
    for docs in (None, [0, 1, T // 3, T // 3 + 1, T // 2 + 7, T]):
        x = make_inputs(B=1, T=T, H=4, HV=8, K=128, V=128, cu_seqlens=docs, initial_state=False, gate=True,
                        beta_logits=True, dtype=dtype, device=device)
        cu = None if docs is None else torch.tensor(docs, device=device)
        options = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
                       use_beta_sigmoid_in_kernel=True, backend=backend)
        gen = torch.Generator().manual_seed(7)
        do = torch.randn(1, T, 8, 128, generator=gen).to(device)
        dht = torch.randn(1 if docs is None else len(docs) - 1, 8, 128, 128, generator=gen).to(device)
        leaves = ["q", "k", "v", "g", "beta", "A_log", "dt_bias"]
        runs = {}
        o, ht = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True,
                                       cu_seqlens=cu, **options)
        grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), [x[n] for n in leaves])
        runs["CP=1"] = [o, ht, *grads]
        for cp in cp_sizes:
            groups = initialize_model_parallel(1, cp)
            group, r = groups.context_parallel_group, groups.context_parallel_rank
            local = {n: split_sequence(x[n].detach(), group).requires_grad_() for n in leaves[:5]}
            ends = [n for n in range(len(dht)) if r * T // cp < (T if docs is None else docs[n + 1]) <= (r + 1) * T // cp]
            for comm_type in COMM_TYPES:
                o, ht = context_parallel_chunk_gated_delta_rule(
                    *(local[n] for n in leaves[:5]), group, comm_type, output_final_state=True, cu_seqlens=cu,
                    **options)
                grads = torch.autograd.grad((o.float() * split_sequence(do, group)).sum() + (ht * dht[ends]).sum(),
                                            [*local.values(), x["A_log"], x["dt_bias"]])
                runs[f"CP={cp} {comm_type}"] = [gather_sequence(o, group), gather_rows(ht, group).to(device),
                                               *(gather_sequence(g, group) for g in grads[:5]),
                                               *(sum_over(g, group) for g in grads[5:])]
            destroy_model_parallel()
        if dist.get_rank() != 0:
            continue
        ref = kernel_cases.reference(dict(x, beta_logits=True), cu)
        ref_grads = torch.autograd.grad((ref[0] * do.double()).sum() + (ref[1] * dht.double()).sum(),
                                        [x[n] for n in leaves])
        names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias"]
        for name, values in runs.items():
            errors = {n: kernel_cases.rel_rms(a, b) for n, a, b in zip(names, values, [*ref, *ref_grads])}
            print(f"T={T} docs={docs is not None} {name}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
            assert not kernel_cases.over_budget(errors, bf16), (name, errors)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_gpu_bf16_context_parallel_64k_within_kernel_budgets():
    world = 4 if torch.cuda.device_count() >= 4 else 2
    cp_sizes = [2, 4] if world == 4 else [2]
    mp.spawn(_nccl_worker, args=(world, _free_port(), _gpu_cases, (cp_sizes, 65536, "cuda", torch.bfloat16,
                                                                    "triton", True)), nprocs=world, join=True)
