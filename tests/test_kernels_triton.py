"""The Triton kernels on CPU, through Triton's interpreter, in fp32, against the per-token fp64 oracle.

Triton decides between compiling and interpreting when a kernel is defined, from TRITON_INTERPRET. So that
this file can share a pytest process with tests that use Triton compiled (the GPU tests), the cases run in
one worker subprocess (``python tests/test_kernels_triton.py --worker``) started with TRITON_INTERPRET=1,
whose torch.empty fills float tensors with NaN (every output and buffer is poisoned). Each test then checks
its case's errors. Run one case by hand: ``TRITON_INTERPRET=1 python tests/test_kernels_triton.py CASE``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # kernel_cases, and the package when run as a script
from kernel_cases import interpreter_results, over_budget, run_case  # noqa: E402

from megatron_gdn.kernels import MAX_TRITON_HEAD_DIM, check_inputs, chunk_gated_delta_rule  # noqa: E402

# The matrix of ../shared/DESIGN.md section 3, at shapes the interpreter runs in seconds.
CHUNK_CASES = {
    "dense_T_not_multiple_of_64": dict(B=2, T=100, H=2, HV=2, K=32, V=24),
    "T_below_64": dict(B=1, T=37, H=1, HV=1, K=16, V=16),
    "varlen_with_length_1_docs": dict(T=150, H=1, HV=2, K=40, V=48, cu_seqlens=[0, 1, 40, 41, 107, 149, 150]),
    "gva_hv_4h": dict(T=70, H=1, HV=4, K=16, V=32),
    "fused_gate_and_beta": dict(T=80, gate=True, beta_logits=True),
    "allow_neg_eigval": dict(T=80, gate=True, allow_neg_eigval=True),
    "no_decay_g_zero": dict(T=150, gate_scale=0.0),
    "partly_zero_gate": dict(T=150, zero_gate_frac=0.5),
    "strong_decay": dict(T=150, gate_scale=30.0),
    "strong_fused_gate": dict(T=100, gate=True, beta_logits=True, gate_scale=3.0),
    "K_V_not_powers_of_two": dict(T=90, H=1, HV=1, K=100, V=72),
    "K_256": dict(T=65, H=1, HV=2, K=256, V=16),  # HV > 1: the K blocks and heads of a flat grid
    # dqkw's 128-wide K blocks, which bf16 inputs take at K > 128 (chunk.dqkw_block_k; fp32 would keep 64)
    "K_256_dqkw_wide_blocks": dict(T=65, H=1, HV=2, K=256, V=16, gate=True, dqkw_block_k=128),
    "no_initial_state_no_l2norm": dict(B=2, T=70, initial_state=False, l2norm=False),
}
# Every case above runs the fused forward (o inside the scan; the backward recomputes the states); these also run
# the fused forward that stores the per-chunk states and vn too (the backward reuses them) and the split forward
# (the scan stores the states and vn, chunk_o_kernel computes o), and the last three the split forward whose states
# are not kept (past chunk.KEEP_STATES_MAX_BYTES). Each is forced (kernel_cases.forced_o_path), whatever the rules
# would choose.
SPLIT_O_CASES = ["dense_T_not_multiple_of_64", "T_below_64", "varlen_with_length_1_docs", "K_V_not_powers_of_two",
                 "K_256", "no_initial_state_no_l2norm"]
CHUNK_CASES = {**{name: dict(case, o_path="fused") for name, case in CHUNK_CASES.items()},
               **{f"{name}_fused_kept": dict(CHUNK_CASES[name], o_path="fused_kept") for name in SPLIT_O_CASES},
               **{f"{name}_split_o": dict(CHUNK_CASES[name], o_path="split") for name in SPLIT_O_CASES},
               **{f"{name}_split_recompute": dict(CHUNK_CASES[name], o_path="split_recompute")
                  for name in SPLIT_O_CASES[3:]}}
# The chunked form in fp32 (ours and reference.chunk_gated_delta_rule_torch alike) keeps only ~3 digits of
# dA_log / ddt_bias under strong decay: dG is a sum of terms that cancel, and dA_log weights it by g ~ -50.
LOOSER = {"strong_fused_gate": {"dg": 1e-3, "dA_log": 1e-2, "ddt_bias": 1e-2}}
RECURRENT_CASES = {
    "decode_one_token": dict(B=3, T=1, H=2, HV=4, K=32, V=24, gate=True, beta_logits=True),
    "prefill_varlen": dict(T=40, H=1, HV=2, K=20, V=12, cu_seqlens=[0, 1, 17, 40], allow_neg_eigval=True, gate=True),
}
WORKERS = 2  # this CI machine has 2 cores


def _worker(names: list[str]) -> dict:
    from kernel_cases import poisoned_empty
    results = {}
    with poisoned_empty():
        for name in names:
            if name in CHUNK_CASES:
                results[name] = run_case(op="chunk", **CHUNK_CASES[name])
            elif name in RECURRENT_CASES:
                results[name] = run_case(op="recurrent", **RECURRENT_CASES[name])
            else:
                results[name] = globals()[name]()
    return results


def rmsnorm_errors() -> dict:
    """Triton against torch, with a contiguous gate and with the gate a column slice of a wider tensor (the fused
    projection's layout: tokens 107 elements apart, heads 48). Heads of 300 take the backward's other tiles
    (rmsnorm.bwd_tiles: 8 rows of 512 columns), 9 rows of them a partial last block. At heads of 16 (blocks of
    16 rows) the backward's programs loop over 2 or 3 blocks each (kernel_cases.loop_rows)."""
    from megatron_gdn.kernels import gated_rmsnorm
    from megatron_gdn.kernels.rmsnorm import BWD_PROGRAMS_PER_SM
    from kernel_cases import loop_rows, rel_rms
    torch.manual_seed(0)
    errors = {}
    rows = loop_rows(BWD_PROGRAMS_PER_SM)
    for shape, width, cut in (((3, 5, 2, 48), 107, 5), ((1, 3, 3, 300), 950, 25), ((1, rows, 1, 16), 19, 2)):
        *lead, H, D = shape
        x = torch.randn(shape, requires_grad=True)
        w = (1 + 0.1 * torch.randn(D)).requires_grad_()
        dy = torch.randn(shape)
        for layout, z in (("", torch.randn(shape, requires_grad=True)),
                          ("_sliced", torch.randn(*lead, width, requires_grad=True))):
            out = {}
            for backend in ("triton", "torch"):
                gate = z if not layout else z[..., cut:cut + H * D].view(shape)
                y = gated_rmsnorm(x, gate, w, 1e-5, backend=backend)
                out[backend] = [y, *torch.autograd.grad((y * dy).sum(), (x, z, w))]
            errors |= {f"{n}{layout}_D{D}": rel_rms(a, b)
                       for n, a, b in zip(("o", "dx", "dgate", "dweight"), out["triton"], out["torch"])}
    return errors


def slice_summary_errors() -> dict:
    """(M, h) of a slice: M S + h is the slice run from S, and their gradients match the torch backend."""
    from megatron_gdn.kernels import slice_summary
    from kernel_cases import make_inputs, rel_rms
    cu = torch.tensor([0, 30, 100])
    x = make_inputs(T=100, H=1, HV=2, K=16, V=8, cu_seqlens=cu.tolist(), gate=True, beta_logits=True,
                    gate_scale=0.01)  # weak decay, so that M is far from 0
    opts = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
                use_beta_sigmoid_in_kernel=True)
    leaves = [x[n] for n in ("k", "v", "g", "beta", "A_log", "dt_bias")]
    out = {}
    for backend in ("triton", "torch"):
        M, h = slice_summary(x["k"], x["v"], x["g"], x["beta"], cu_seqlens=cu, backend=backend, **opts)
        _, S = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                                      output_final_state=True, cu_seqlens=cu, backend=backend, **opts)
        affine = M @ x["initial_state"] + h
        out[backend] = [M, h, affine, S, *torch.autograd.grad((M.sum(0) ** 2).sum() + (h ** 2).sum(), leaves)]
    names = ("M", "h", "affine", "run", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias")
    errors = {f"{n}_vs_torch": rel_rms(a, b) for n, a, b in zip(names, out["triton"], out["torch"])}
    errors["affine_vs_run"] = rel_rms(out["triton"][2], out["triton"][3])
    return errors


def scan_launches() -> dict:
    """How many forward scans (and o kernels) a forward and backward launch under the rules, unforced: with
    gradients the forward keeps its states for the backward (one scan), unless they are past the budget (the
    backward scans again); many programs take the fused scan (no o kernel), which with gradients also keeps the
    states."""
    from megatron_gdn.kernels import chunk
    from kernel_cases import make_inputs
    calls = []
    scan, o_kernel = chunk._scan_fwd, chunk._o
    chunk._scan_fwd = lambda *a, **kw: calls.append("scan") or scan(*a, **kw)
    chunk._o = lambda *a, **kw: calls.append("o") or o_kernel(*a, **kw)
    budget = chunk.KEEP_STATES_MAX_BYTES
    counts = {}
    try:
        x = make_inputs(T=100, H=1, HV=2, K=16, V=8)
        for name, keep_bytes in (("kept", budget), ("over_budget", 0)):
            chunk.KEEP_STATES_MAX_BYTES = keep_bytes
            o, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="triton")
            o.sum().backward()
            counts[name], calls[:] = list(calls), []
        # 70 one-token documents x 1 value head: 70 scan programs, more than half of 132 SMs (chunk.split_o)
        x = make_inputs(T=70, H=1, HV=1, K=16, V=8, cu_seqlens=list(range(71)))
        with torch.no_grad():
            chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=torch.arange(71),
                                   backend="triton")
        counts["no_grad"], calls[:] = list(calls), []
        chunk.KEEP_STATES_MAX_BYTES = budget
        o, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], cu_seqlens=torch.arange(71),
                                      backend="triton")
        o.sum().backward()
        counts["kept_many_programs"] = list(calls)
    finally:
        chunk._scan_fwd, chunk._o, chunk.KEEP_STATES_MAX_BYTES = scan, o_kernel, budget
    return counts


EXTRA_CASES = ["rmsnorm_errors", "slice_summary_errors"]
ALL_CASES = [*CHUNK_CASES, *RECURRENT_CASES, *EXTRA_CASES, "scan_launches"]


@pytest.fixture(scope="module")
def results() -> dict:
    # Split the cases over the workers, longest (biggest) first, round robin.
    return interpreter_results(os.path.abspath(__file__), [ALL_CASES[i::WORKERS] for i in range(WORKERS)])


@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_chunk_matches_oracle(results, name):
    errors = results[name]
    looser = LOOSER.get(name, {})
    assert not over_budget({k: e for k, e in errors.items() if k not in looser}, bf16=False), errors
    assert all(errors[k] <= budget for k, budget in looser.items()), errors


@pytest.mark.parametrize("name", list(RECURRENT_CASES))
def test_fused_recurrent_matches_oracle(results, name):
    errors = results[name]
    assert not over_budget(errors, bf16=False), errors


@pytest.mark.parametrize("name", EXTRA_CASES)
def test_extra(results, name):
    errors = results[name]
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_forward_keeps_states_for_the_backward(results):
    assert results["scan_launches"] == {"kept": ["scan", "o"], "over_budget": ["scan", "o", "scan"],
                                        "no_grad": ["scan"], "kept_many_programs": ["scan"]}


def test_split_o_rule():
    """chunk.split_o on 132 SMs (an H100 / H200) at the benchmark's shapes and the GPU tests' 50 documents."""
    from megatron_gdn.kernels.chunk import split_o
    assert split_o(1, 16, 128, 128, 132)  # B1 T32768 H16: 32 programs with 64-wide V blocks
    assert split_o(2, 16, 128, 128, 132)  # B2 T4096 H16: 64, up to half the SMs
    assert not split_o(4, 16, 128, 128, 132)  # B4 T4096 H16: 128, more than half
    assert split_o(8, 6, 256, 512, 132)  # the 1.3b preset's heads: 384 programs, but K = 256
    assert not split_o(16, 32, 128, 128, 132)  # B16 T2048 H32: 1024 programs
    assert not split_o(50, 4, 128, 128, 132)  # 50 documents, HV = 4: 400 programs
    assert split_o(4, 16, 128, 128, 264)  # B4 T4096 H16 on a GPU with twice the SMs: 128, half of them


def _inputs(B=1, T=8, H=2, HV=2, K=16, V=16):
    return (torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, HV, V), torch.randn(B, T, HV),
            torch.rand(B, T, HV))


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(a, q=torch.randn(1, 8, 2, 300), k=torch.randn(1, 8, 2, 300)), "K <= 256"),
    (lambda a: dict(a, k=torch.randn(1, 8, 2, 8)), "q and k"),
    (lambda a: dict(a, v=a["v"].double()), "one floating dtype"),
    (lambda a: dict(a, beta=torch.rand(1, 8, 3)), "beta must be"),
    (lambda a: dict(a, q=torch.randn(2, 8, 2, 16), k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16),
                    g=torch.randn(2, 8, 2), beta=torch.rand(2, 8, 2), cu_seqlens=torch.tensor([0, 8])), "B == 1"),
    (lambda a: dict(a, cu_seqlens=torch.tensor([0, 5, 3, 8])), "monotonically"),
    (lambda a: dict(a, cu_seqlens=torch.tensor([0, 4, 8], device="meta")), "one device"),
    (lambda a: dict(a, initial_state=torch.randn(1, 2, 16, 16, device="meta")), "one device"),
])
def test_clear_errors(change, message):
    q, k, v, g, beta = _inputs()
    args = change(dict(q=q, k=k, v=v, g=g, beta=beta))
    with pytest.raises(ValueError, match=message):
        check_inputs(**args, max_head_dim=MAX_TRITON_HEAD_DIM)


@pytest.mark.parametrize("B, T", [(1, 1), (2, 100), (3, 128), (4, 4097)])
def test_dense_chunk_tables_need_no_device_read(B, T):
    """A dense batch's chunk tables come from (B, T) on the host (no GPU sync per layer) and equal the ones
    read from its offsets."""
    from megatron_gdn.kernels.triton_utils import chunk_tables, dense_cu_seqlens

    cu = dense_cu_seqlens(B, T, torch.device("cpu"))
    from_host = chunk_tables(torch.empty(0, dtype=torch.int32), dense=(B, T))  # nothing to read on the device
    for got, want in zip(from_host, chunk_tables(cu)):
        assert torch.equal(got, want)


def test_backend_errors():
    with pytest.raises(ValueError, match="backend must be"):
        chunk_gated_delta_rule(*_inputs(), backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            chunk_gated_delta_rule(*_inputs(), backend="triton")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2:])))
    else:
        print(_worker(sys.argv[1:]))
