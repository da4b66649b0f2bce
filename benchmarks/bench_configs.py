"""Each configuration of one autotuned chunk kernel, forced alone, timed inside the chunked op's forward+backward.

    python benchmarks/bench_configs.py KERNEL [--shape small|1.3b|B,T,H,K,V] [--caps 168,128]
        [--extra "BV=64 warps=4 stages=2" ...] [--rounds 2] [--isolate]

Triton's autotuner keeps the fastest candidate it timed at a kernel's first call (chunk.py's *_CONFIGS lists). This
tool answers what the autotuner does not print: how fast each candidate is, and whether one that is not in the list
would be faster: the same configurations with their registers capped (--caps: a triton.Config's maxnreg, which can
fit more programs on an SM at the price of spills; benchmarks/kernel_resources.py counts them), or other tiles and
warps (--extra). KERNEL is an autotuner of megatron_gdn.kernels.chunk (chunk_bwd_wy_kernel, chunk_scan_bwd_kernel,
...); the other autotuned kernels keep autotuning. Inputs are the model's: bf16 q, k, v, gate logits and beta logits,
with the L2 norm, the gate and beta's sigmoid inside the kernels, at one layer of bench_train.py's `small` (batch 8)
or `1.3b` (batch 4) at 4K context, or any B,T,H,K,V.

On a GPU each candidate's time is the kernel's own, per call (torch.profiler over 5 forward+backward calls), and
the rounds alternate the candidates so that the card's clocks drift over all of them alike; the table is sorted by
the best round. --isolate runs each candidate in a process of its own: an unpipelined scan once raised an illegal
memory access, which poisons the CUDA context for every candidate after it (docs/KERNELS.md, "Miscompiles seen on
the card"). A fast candidate is not yet a safe one: tests/test_kernels_gpu.py's every-configuration tests (budget,
same bits run to run) must pass on the card before it joins a list. On a CPU (TRITON_INTERPRET=1, the smoke test)
the times are the interpreter's wall time of a step and mean nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.kernels import chunk, chunk_gated_delta_rule  # noqa: E402

from gpu_kernels import kernel_times  # noqa: E402  (this folder, the script's own)

SHAPES = {"small": (8, 4096, 12, 64, 128), "1.3b": (4, 4096, 6, 256, 512), "tiny": (1, 80, 2, 16, 16)}
CALLS = 5  # forward+backward calls per timing


def parse_shape(text: str) -> tuple[int, ...]:
    if text in SHAPES:
        return SHAPES[text]
    dims = tuple(int(d) for d in text.split(","))
    if len(dims) != 5:
        raise SystemExit(f"--shape takes small, 1.3b, tiny or B,T,H,K,V; got {text!r}")
    return dims


def parse_config(text: str) -> triton.Config:
    """'BV=64 warps=4 stages=2 maxnreg=168' -> triton.Config({'BV': 64}, num_warps=4, num_stages=2, maxnreg=168)."""
    options = {"warps": "num_warps", "stages": "num_stages", "maxnreg": "maxnreg"}
    kwargs, launch = {}, {}
    for item in text.split():
        name, _, value = item.partition("=")
        (launch if name in options else kwargs)[options.get(name, name)] = int(value)
    return triton.Config(kwargs, **launch)


def candidates(tuner, caps: list[int], extra: list[str]) -> list[triton.Config]:
    """The kernel's list, the list again under each register cap, then the extra configurations."""
    listed = list(tuner.configs)
    capped = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=cap)
              for cap in caps for c in listed]
    return listed + capped + [parse_config(e) for e in extra]


def layer_step(shape: tuple[int, ...], device: str):
    """A forward+backward of the chunked op on one layer's inputs, as the model calls it."""
    B, T, H, K, V = shape
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's tl.dot is wrong in bf16

    def randn(*size, dt=dtype):
        return torch.randn(*size, generator=gen, device=device, dtype=dt).requires_grad_()
    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g, beta = randn(B, T, H), randn(B, T, H)
    A_log = torch.empty(H, device=device).uniform_(1, 16, generator=gen).log().requires_grad_()
    dt_bias = randn(H, dt=torch.float32)
    do = torch.randn(B, T, H, V, generator=gen, device=device, dtype=dtype)

    def step():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                      A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                                      backend="triton")
        o.backward(do)
    return step


def time_config(kernel: str, config: triton.Config, step) -> float:
    """Microseconds per call of the kernel under this configuration (the interpreter: a step's wall time)."""
    tuner = getattr(chunk, kernel)
    tuner.configs = [config]  # one candidate: the autotuner runs it without timing
    if not torch.cuda.is_available():
        step()
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e6
    # the profiler names a kernel by its JIT function: the two dqkw autotuners share dqkw_kernel
    name = tuner.fn.__name__
    times = [t for k, t in kernel_times(step, CALLS).items() if k.startswith(name)]
    if not times:
        raise RuntimeError(f"{kernel} ({name}) did not run at this shape")
    ms, launches = times[0]
    return ms / launches * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", help="an autotuner of megatron_gdn.kernels.chunk, e.g. chunk_bwd_wy_kernel")
    parser.add_argument("--shape", default="small", help="small, 1.3b, tiny or B,T,H,K,V (H q/k = value heads)")
    parser.add_argument("--caps", default="", help="comma-separated register caps: the list again under each")
    parser.add_argument("--extra", action="append", default=[],
                        help="another configuration, e.g. 'BV=64 warps=4 stages=2 maxnreg=168' (repeatable)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all candidates, alternating")
    parser.add_argument("--isolate", action="store_true", help="each candidate in a process of its own")
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)  # --isolate's child: time this candidate
    args = parser.parse_args()
    tuner = getattr(chunk, args.kernel, None)
    if not hasattr(tuner, "configs"):
        names = sorted(n for n, v in vars(chunk).items() if hasattr(v, "configs") and hasattr(v, "cache"))
        raise SystemExit(f"{args.kernel!r} is not an autotuned kernel of chunk.py; one of: {', '.join(names)}")
    cands = candidates(tuner, [int(c) for c in args.caps.split(",") if c], args.extra)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = parse_shape(args.shape)
    if args.only is not None:
        print(f"{time_config(args.kernel, cands[args.only], layer_step(shape, device)):.1f}")
        return
    step = None if args.isolate else layer_step(shape, device)
    results: dict[int, list[float]] = {i: [] for i in range(len(cands))}
    for rnd in range(args.rounds):
        for i in (range(len(cands)) if rnd % 2 == 0 else reversed(range(len(cands)))):
            if args.isolate:
                child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", str(i)],
                                       capture_output=True, text=True)
                lines = child.stdout.strip().splitlines()
                if child.returncode != 0 or not lines:
                    error = (child.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"  {cands[i]}: failed ({error[:150]})", flush=True)
                    results[i].append(float("nan"))
                    continue
                results[i].append(float(lines[-1]))
            else:
                results[i].append(time_config(args.kernel, cands[i], step))
    print(f"{args.kernel} at B,T,H,K,V = {','.join(map(str, shape))} on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'the interpreter (times mean nothing)'}, "
          f"triton {triton.__version__}: us per call, best of {args.rounds} rounds")
    best = {i: min((t for t in times if t == t), default=float("nan")) for i, times in results.items()}
    for i in sorted(results, key=lambda i: (best[i] != best[i], best[i])):  # failed (NaN) candidates last
        print(f"  {best[i]:8.1f}  ({' '.join(f'{t:.1f}' for t in results[i])})  {cands[i]}"
              f"{'   (in the list)' if i < len(tuner.configs) else ''}")


if __name__ == "__main__":
    main()
