"""The fused model ops against their PyTorch references, side by side in one process: does each fusion pay, and
how far is it from memory speed?

    python benchmarks/bench_fused_ops.py [--configs small,1.3b] [--compile] [--markdown FILE]
    TRITON_INTERPRET=1 python benchmarks/bench_fused_ops.py --tiny     # CPU smoke run (tests/test_bench_smoke.py)

For each op, at the shapes one layer of the preset sees in bench_train.py's step (4096 tokens per sequence;
`small` 8 sequences, `1.3b` 4), forward and forward+backward: ours (the Triton kernel, backend='auto'), the
PyTorch reference the model falls back to (backend='torch'), and with --compile that reference under
torch.compile. bf16 activations, fp32 weights (as under autocast); GPU time, the kernels' summed durations
per call under torch.profiler (measure() says why); the backward through torch.autograd.grad, so no gradient
is accumulated into a .grad.

The memory-bound ops get a floor: the bytes they cannot avoid (below), moved once at the DRAM bandwidth this
card shows for a device-to-device copy. "ours / floor" says how far a kernel is from memory speed. The cross
entropy is a matrix product over the vocabulary (2 N h V FLOPs forward, 3x that with backward): its row shows
TFLOP/s instead.

Unavoidable bytes, in elements of the activation dtype (N tokens, h hidden, I SwiGLU width, D conv channels,
HV x Dv value heads):
    rms_norm + residual   fwd x, residual -> y, h (4 N h)          bwd dy, dh, h -> dx (4 N h)
    swiglu                fwd [gate | up] -> y (3 N I)             bwd dy, [gate | up] -> [dgate | dup] (5 N I)
    short conv + SiLU     fwd x -> y (2 N D)                       bwd dy, x -> dx (3 N D)
                          (x: the value slice of a fused [q | k | v | a | b | g] projection, as in the model, its
                          width padded to ROW_ALIGNMENT so that every row starts 16-byte aligned)
    gated RMSNorm         fwd o, gate -> y (3 N HV Dv)             bwd dy, o, gate -> do, dgate (5 N HV Dv)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.kernels import gated_rmsnorm, rms_norm, short_conv_silu, swiglu  # noqa: E402
from megatron_gdn.models import MODEL_PRESETS, GatedDeltaNetConfig  # noqa: E402
from megatron_gdn.models.fused_projection import ROW_ALIGNMENT  # noqa: E402
from megatron_gdn.parallel import fused_linear_cross_entropy  # noqa: E402

from gpu_kernels import kernel_times  # noqa: E402  (this folder, the script's own)

SEQUENCES = {"small": 8, "1.3b": 4}  # bench_train.py's batches at 4096 tokens per sequence
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16)


@dataclass
class Op:
    """One op at one shape: run(backend) returns the outputs of a forward; inputs are the tensors backward
    differentiates; bytes_fwd / bytes_fwd_bwd the unavoidable traffic (0: not memory-bound); flops for the
    matrix-product ones."""
    name: str
    shape: str
    run: Callable[[str], tuple[torch.Tensor, ...]]
    inputs: list[torch.Tensor]
    bytes_fwd: int = 0
    bytes_fwd_bwd: int = 0
    flops_fwd: int = 0


def make_ops(config: GatedDeltaNetConfig, tokens: int, seqlen: int, device: str, dtype: torch.dtype) -> list[Op]:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, act=True, scale=1.0):
        t = torch.randn(*shape, device=device, generator=gen) * scale
        return t.to(dtype if act else torch.float32).requires_grad_()

    N, h, I = tokens, config.hidden_size, config.intermediate_size
    Dv = config.head_v_dim
    value_dim = config.num_v_heads * Dv
    B, esize = tokens // seqlen, torch.finfo(dtype).bits // 8
    x, residual, norm_w = randn(N, h), randn(N, h), 1 + randn(h, act=False, scale=0.1)
    gate_up = randn(N, 2 * I, scale=3)
    key_dim = config.num_heads * config.head_dim
    width = 2 * key_dim + 2 * value_dim + 2 * config.num_v_heads
    projection = randn(B, seqlen, width - width % -ROW_ALIGNMENT)  # padded as the model's (fused_projections)
    conv_x = projection[..., 2 * key_dim:2 * key_dim + value_dim].detach().requires_grad_()  # a strided leaf
    conv_w = randn(value_dim, 1, config.conv_size, act=False, scale=0.5)
    q_x = projection[..., :key_dim].detach().requires_grad_()  # q's slice, L2-normalised per head by the conv
    q_w = randn(key_dim, 1, config.conv_size, act=False, scale=0.5)
    o, o_gate = randn(B, seqlen, config.num_v_heads, Dv), randn(B, seqlen, config.num_v_heads, Dv)
    o_w = 1 + randn(Dv, act=False, scale=0.1)
    hidden, head_w = randn(N, h), randn(config.vocab_size, h, scale=0.02)
    target = torch.randint(0, config.vocab_size, (N,), device=device, generator=gen)
    return [
        Op("rms_norm + residual", f"{N} x {h}", lambda b: rms_norm(x, norm_w, 1e-5, residual, backend=b),
           [x, residual, norm_w], 4 * N * h * esize, 8 * N * h * esize),
        Op("swiglu", f"{N} x {I}", lambda b: (swiglu(gate_up, backend=b),), [gate_up],
           3 * N * I * esize, 8 * N * I * esize),
        Op(f"short conv + SiLU (W={config.conv_size})", f"{B} x {seqlen} x {value_dim}",
           lambda b: (short_conv_silu(conv_x, conv_w, backend=b, output_final_state=False)[0],), [conv_x, conv_w],
           2 * conv_x.numel() * esize, 5 * conv_x.numel() * esize),
        Op(f"short conv + SiLU + L2 norm (q, K={config.head_dim})", f"{B} x {seqlen} x {key_dim}",
           lambda b: (short_conv_silu(q_x, q_w, backend=b, output_final_state=False,
                                      l2norm_head_dim=config.head_dim)[0],), [q_x, q_w],
           2 * q_x.numel() * esize, 5 * q_x.numel() * esize),
        Op("gated RMSNorm", f"{B} x {seqlen} x {config.num_v_heads} x {Dv}",
           lambda b: (gated_rmsnorm(o, o_gate, o_w, 1e-5, backend=b),), [o, o_gate, o_w],
           3 * o.numel() * esize, 8 * o.numel() * esize),
        Op("lm head + cross entropy", f"{N} x {h} -> {config.vocab_size}",
           lambda b: (fused_linear_cross_entropy(hidden, head_w, target, backend=b),), [hidden, head_w],
           flops_fwd=2 * N * h * config.vocab_size),
    ]


def measure(fn: Callable[[], object], cuda: bool, calls: int = 20) -> float:
    """Milliseconds of GPU time per call: on a GPU the sum of the kernels' durations over `calls` calls
    (torch.profiler), divided by `calls`; the median of 3 runs on CPU (smoke runs only).

    Timed by the wall clock (do_bench), a call whose kernels take less time than the host takes to launch them
    measures the host: autograd, the launches, the small torch ops around the kernels. Session 6 on an H100 read
    rms_norm with its residual at 4-7x its byte floor forward+backward while its forward alone was at 1.1-1.6x, and
    the same code 0.54 and 0.93 ms in two processes. In a training step the host runs ahead of the GPU, so the GPU
    time is the one that counts. (Replaying the calls as a CUDA graph would also hide the host, but the backward
    cannot be captured here: its leaf inputs' gradient nodes belong to the default stream, and the capture fails.)"""
    if cuda:
        return sum(ms for ms, _ in kernel_times(fn, calls).values()) / calls
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def forward_only(op: Op, backend: str) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return op.run(backend)
    return step


def forward_backward(op: Op, backend: str) -> Callable[[], object]:
    outputs = op.run(backend)
    cotangents = [torch.randn_like(out) for out in outputs]  # the same cotangents at every call

    def step():
        outs = op.run(backend)
        return torch.autograd.grad(outs, op.inputs, cotangents)
    return step


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,1.3b", help=f"comma-separated, from {','.join(SEQUENCES)}")
    parser.add_argument("--compile", action="store_true", help="also time the references under torch.compile")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, fp32, Triton's interpreter "
                                                          "(set TRITON_INTERPRET=1)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    ours = "auto" if cuda else "triton"  # 'auto' takes the reference on CPU
    if cuda:
        bandwidth = copy_bandwidth(device)
        header = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
                  f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; bf16 activations; GPU time (kernels' summed "
                  f"durations per call, torch.profiler)")
    else:
        bandwidth = 0.0
        header = f"CPU smoke run (Triton interpreter, fp32); torch {torch.__version__}; triton {triton.__version__}"
    print(header, flush=True)
    configs = {"tiny": (GatedDeltaNetConfig(**TINY), 2, 16)} if args.tiny else {
        name: (GatedDeltaNetConfig(**MODEL_PRESETS[name]), SEQUENCES[name], 4096) for name in args.configs.split(",")}

    rows = []
    for name, (config, sequences, seqlen) in configs.items():
        for op in make_ops(config, sequences * seqlen, seqlen, device, dtype):
            for passname, make_step in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
                steps = {label: make_step(op, backend) for label, backend in (("ours", ours), ("torch", "torch"))}
                # Each timed twice, alternating, keeping the faster (as bench_kernels.py does). Timed once by the
                # wall clock, identical code read 0.073 and 0.104 ms in two processes (H100, session 6).
                timings = dict.fromkeys(steps, math.inf)
                for _ in range(2):
                    for label, step in steps.items():
                        timings[label] = min(timings[label], measure(step, cuda))
                if args.compile:
                    try:
                        compiled = replace(op, run=torch.compile(op.run))
                        timings["compiled"] = measure(make_step(compiled, "torch"), cuda)
                    except Exception as e:  # noqa: BLE001 - report, keep timing the rest
                        print(f"{op.name}: torch.compile failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
                nbytes = op.bytes_fwd if passname == "fwd" else op.bytes_fwd_bwd
                flops = op.flops_fwd * (1 if passname == "fwd" else 3)
                if nbytes and bandwidth:
                    floor = nbytes / bandwidth * 1e3
                    note = f"floor {floor:.3f} ms; ours / floor {timings['ours'] / floor:.1f}"
                elif flops and cuda:
                    note = f"ours {flops / timings['ours'] / 1e9:.0f} TFLOP/s"
                else:
                    note = ""
                row = (name, op.name, op.shape, passname, timings["ours"], timings["torch"], timings.get("compiled"),
                       note)
                print(row, flush=True)
                rows.append(row)

    lines = [header, "", "| config | op | shape | pass | ours (ms) | PyTorch (ms) | torch.compile (ms) | speed-up over "
             "PyTorch | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, opname, shape, passname, t_ours, t_torch, t_compiled, note in rows:
        compiled = "" if t_compiled is None else f"{t_compiled:.3f}"
        lines.append(f"| {name} | {opname} | {shape} | {passname} | {t_ours:.3f} | {t_torch:.3f} | {compiled} | "
                     f"{t_torch / t_ours:.2f}x | {note} |")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
