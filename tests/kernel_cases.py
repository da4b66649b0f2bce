"""Shared by the kernel tests: random inputs, the reference, the metric, and NaN-poisoned allocations.

A case runs the public op with the given backend and the fp64 reference on the same inputs (rounded to the
test dtype first), with a loss that includes the final state, and returns RMS(ref - x) / RMS(ref) for the
output, the final state and every gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_gdn.kernels import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from megatron_gdn.kernels.reference import chunk_gated_delta_rule_torch, gdn_gate, recurrent_gated_delta_rule

# Per-token oracle up to this many tokens; the (fp64) chunked reference beyond, to keep tests fast.
ORACLE_MAX_TOKENS = 1024


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(ref - x) / RMS(ref), in fp64; NaN anywhere gives NaN."""
    x, ref = x.double(), ref.double()
    err = (ref - x).pow(2).mean().sqrt()
    return (err / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def loop_rows(programs_per_sm: int) -> int:
    """Rows for which a norm's backward kernel, in blocks of 16 rows at programs_per_sm programs a streaming
    multiprocessor (132 in the interpreter), loops: each program takes 2 or 3 blocks, and the last is partial."""
    return 16 * (2 * 132 * programs_per_sm + 3) - 5


def interpreter_results(script: str, shares: list[list[str]]) -> dict:
    """Run `python script --worker CASE...` once per share of the cases, the workers side by side, with
    TRITON_INTERPRET=1 (Triton reads it when a kernel is defined, so it needs a fresh process); each prints a JSON
    dict of its cases' results as its last line. Returns them merged; a failing worker fails the test."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, script, "--worker", *share], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for share in shares]
    merged = {}
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            pytest.fail(f"interpreter worker failed ({proc.returncode}):\n{err[-4000:]}")
        merged.update(json.loads(out.strip().splitlines()[-1]))
    return merged


@contextlib.contextmanager
def poisoned_empty():
    """While active, torch.empty / empty_like return NaN-filled float tensors, so unwritten outputs show up."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


O_PATHS = ("fused", "fused_kept", "split", "split_recompute")


@contextlib.contextmanager
def forced_o_path(path: str | None):
    """While active, the Triton forward takes the given path whatever chunk.split_o and chunk.keep_states would
    choose: 'fused' (o inside the scan; the backward recomputes the states), 'fused_kept' (o inside the scan, which
    also stores the states for the backward), 'split' (the scan stores the states, chunk_o_kernel computes o, and
    the backward reuses them), 'split_recompute' (split, but the states are not kept: past
    chunk.KEEP_STATES_MAX_BYTES); None leaves the rules alone."""
    if path is None:
        yield
        return
    if path not in O_PATHS:
        raise ValueError(f"o_path must be one of {O_PATHS} or None; got {path!r}")
    from megatron_gdn.kernels import chunk
    rule, budget = chunk.split_o, chunk.KEEP_STATES_MAX_BYTES
    chunk.split_o = lambda *args: path.startswith("split")
    chunk.KEEP_STATES_MAX_BYTES = float("inf") if path in ("split", "fused_kept") else -1
    try:
        yield
    finally:
        chunk.split_o, chunk.KEEP_STATES_MAX_BYTES = rule, budget


@contextlib.contextmanager
def forced_dqkw_block_k(block_k: int | None):
    """While active, dqkw takes K blocks of block_k columns (128: its wide candidates) whatever chunk.dqkw_block_k
    would choose for the dtype; None leaves the rule alone."""
    if block_k is None:
        yield
        return
    from megatron_gdn.kernels import chunk
    rule = chunk.dqkw_block_k
    chunk.dqkw_block_k = lambda K, element_size: block_k
    try:
        yield
    finally:
        chunk.dqkw_block_k = rule


def make_inputs(B=1, T=100, H=2, HV=2, K=32, V=24, cu_seqlens=None, initial_state=True, gate=False, beta_logits=False,
                gate_scale=1.0, zero_gate_frac=0.0, dtype=torch.float32, device="cpu", seed=0):
    """Random inputs of one case as a dict of kwargs for the public op (leaves require grad)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device)

    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    x = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V))
    if gate:  # raw gate logits; A_log as the model initialises it, log U(1, 16); gate_scale raises the decay
        x["g"] = randn(B, T, HV)
        x["A_log"] = (torch.rand(HV, generator=gen) * 15 + 1).log().to(device) + math.log(gate_scale)
        x["dt_bias"] = randn(HV, s=0.5)
    else:
        x["g"] = F.logsigmoid(randn(B, T, HV)) * gate_scale
        if zero_gate_frac:
            x["g"] = torch.where(torch.rand(B, T, HV, generator=gen).to(device) < zero_gate_frac, 0.0, x["g"])
    x["beta"] = randn(B, T, HV) if beta_logits else torch.rand(B, T, HV, generator=gen).to(device)
    x["initial_state"] = randn(N, HV, K, V) if initial_state else None
    for name in ("q", "k", "v"):
        x[name] = x[name].to(dtype)
    for t in x.values():
        if t is not None:
            t.requires_grad_()
    return x


def reference(x: dict, cu_seqlens, allow_neg_eigval=False, l2norm=True):
    """fp64 (o, final_state) of the inputs x through the oracle; differentiable in every leaf of x."""
    g, beta = x["g"].double(), x["beta"].double()
    if "A_log" in x:
        g = gdn_gate(g, x["A_log"].double(), x["dt_bias"].double())
    if x.get("beta_logits"):
        beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    h0 = x["initial_state"].double() if x["initial_state"] is not None else None
    T = x["q"].shape[1]
    fn = recurrent_gated_delta_rule if T <= ORACLE_MAX_TOKENS else chunk_gated_delta_rule_torch
    return fn(x["q"].double(), x["k"].double(), x["v"].double(), g, beta, None, h0, True, cu_seqlens, l2norm)


def run_case(backend="triton", op="chunk", cu_seqlens=None, allow_neg_eigval=False, l2norm=True, seed=0,
             o_path=None, dqkw_block_k=None, **shape):
    """Relative errors {name: float} of the op against the fp64 reference, forward and backward; o_path forces
    the chunked forward's path (forced_o_path), dqkw_block_k the backward's K blocks (forced_dqkw_block_k)."""
    beta_logits = shape.get("beta_logits", False) or allow_neg_eigval
    shape["beta_logits"] = beta_logits
    device = shape.get("device", "cpu")
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
    x = make_inputs(cu_seqlens=cu_seqlens, seed=seed, **shape)
    gate = "A_log" in x
    fn = chunk_gated_delta_rule if op == "chunk" else fused_recurrent_gated_delta_rule
    # the recurrent kernel is forward-only: with gradients enabled the op would run the chunked kernels
    with torch.set_grad_enabled(op == "chunk"), forced_o_path(o_path):
        o, ht = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
                   cu_seqlens=cu, use_qk_l2norm_in_kernel=l2norm, use_gate_in_kernel=gate, A_log=x.get("A_log"),
                   dt_bias=x.get("dt_bias"), use_beta_sigmoid_in_kernel=beta_logits,
                   allow_neg_eigval=allow_neg_eigval, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen).to(device)
    dht = torch.randn(ht.shape, generator=gen).to(device)
    leaves = {k: t for k, t in x.items() if isinstance(t, torch.Tensor)}
    errors = {}
    with torch.no_grad():
        ref = reference(dict(x, beta_logits=beta_logits), cu, allow_neg_eigval, l2norm)
    errors["o"], errors["final_state"] = rel_rms(o, ref[0]), rel_rms(ht, ref[1])
    if op != "chunk":
        return errors
    with forced_dqkw_block_k(dqkw_block_k):
        grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), list(leaves.values()))
    ref = reference(dict(x, beta_logits=beta_logits), cu, allow_neg_eigval, l2norm)
    ref_grads = torch.autograd.grad((ref[0] * do.double()).sum() + (ref[1] * dht.double()).sum(),
                                    list(leaves.values()))
    names = {"initial_state": "dh0", "A_log": "dA_log", "dt_bias": "ddt_bias"}
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        errors[names.get(name, "d" + name)] = rel_rms(grad, ref_grad)
    return errors


# Budgets per output: (fp32 in the interpreter, bf16 on a GPU). fp32 errors are rounding only.
BUDGETS = {"o": (1e-4, 5e-3), "final_state": (1e-4, 5e-3), "dq": (1e-4, 8e-3), "dk": (1e-4, 8e-3),
           "dv": (1e-4, 8e-3), "dh0": (1e-4, 8e-3), "dbeta": (5e-4, 2e-2), "dg": (5e-4, 2e-2),
           "dA_log": (5e-4, 2e-2), "ddt_bias": (5e-4, 2e-2)}


def over_budget(errors: dict, bf16: bool) -> dict:
    """The entries of errors that are NaN or above their budget."""
    return {k: e for k, e in errors.items() if not e <= BUDGETS[k][int(bf16)]}
