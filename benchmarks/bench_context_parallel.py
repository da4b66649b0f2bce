"""One GDN layer's forward+backward over 1, 2, 4 (8) GPUs: context parallelism by state passing vs all-to-all.

    torchrun --nproc-per-node 4 benchmarks/bench_context_parallel.py [--tokens 32768,131072,524288]
        [--markdown FILE] [--hidden-size 2048 --num-heads 16 --num-v-heads 32 --head-dim 128 --expand-v 1]

One process per GPU. For each sequence length and each CP size that divides the number of processes (1, 2, 4,
...), the first CP ranks run one GatedDeltaNet layer (fp32 weights, bf16 autocast, the Triton kernels, short
convolutions, the output gate) on their slices of one sequence, forward and backward; the other ranks wait.
CP=1 is the plain layer on one GPU, without communication. A time is the median over iterations of the
slowest rank (CUDA events; the ranks are aligned by a barrier before each iteration); parallel efficiency is
T(1 GPU) / (CP x T(CP)), measured against the smallest GPU count that ran when one GPU runs out of memory.
All configurations run side by side in one launch. The default layer is Qwen3-Next's GDN shape (16 q/k heads,
32 value heads, head dims 128, hidden 2048), which all-to-all can split up to CP=16; V = K is the widest
extra summary for state passing (its fused run carries K extra state columns beside the V value columns).

`--device cpu` runs the same on CPU processes with gloo (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.models import GatedDeltaNet  # noqa: E402
from megatron_gdn.parallel.context_parallel import apply_context_parallel  # noqa: E402


def timed(step, device: torch.device, group, iters: int, warmup: int) -> float:
    """Median milliseconds of step() over iters runs (after warmup), the slowest rank of the group."""
    times = []
    for i in range(warmup + iters):
        dist.barrier(group=group)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            elapsed = 1000 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(elapsed)
    slowest = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return slowest.item()


PROBE_FRACTION = 8  # the memory probe runs 1/8 of the slice; activation memory is linear in the tokens


def run_layer(args, tokens: int, cp: int, comm_type: str | None, group, device) -> tuple[float, float] | None:
    """(forward ms, forward+backward ms) of this CP configuration, or None when it would not fit in memory.

    An out-of-memory error inside a collective would leave the other ranks waiting, so whether a configuration
    fits is decided before it runs: the peak memory of a forward+backward on 1/8 of the slice, times 8, must fit
    in the free memory of every rank of the group.
    """
    torch.manual_seed(0)
    layer = GatedDeltaNet(hidden_size=args.hidden_size, expand_v=args.expand_v, head_dim=args.head_dim,
                          num_heads=args.num_heads, num_v_heads=args.num_v_heads, layer_idx=0).to(device)
    if cp > 1:
        apply_context_parallel(layer, group, comm_type)
    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def slice_of(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a sequence of num_tokens tokens, and an output gradient."""
        x = torch.randn(1, num_tokens // cp, args.hidden_size, device=device, generator=generator, dtype=dtype)
        return x.requires_grad_(), torch.randn_like(x)

    def forward(x):
        with torch.no_grad(), autocast:
            layer(x)

    def forward_backward(x, dy):
        with autocast:
            y = layer(x)[0]
        y.backward(dy)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward(*slice_of(tokens // PROBE_FRACTION))
        need = (torch.cuda.max_memory_allocated(device) - base) * PROBE_FRACTION * 1.1
        torch.cuda.empty_cache()  # so that the free memory below counts what the allocator cached for the probe
        fits = torch.tensor(float(need < torch.cuda.mem_get_info(device)[0]), device=device)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=group)
        if not fits.item():
            return None
    x, dy = slice_of(tokens)
    return (timed(lambda: forward(x), device, group, args.iters, args.warmup),
            timed(lambda: forward_backward(x, dy), device, group, args.iters, args.warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="32768,131072,524288", help="sequence lengths, comma-separated")
    parser.add_argument("--comm-types", default="state_passing,all_to_all")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--num-v-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--expand-v", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--markdown", help="write the table to this file")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5),
                            device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [cp for cp in (1, 2, 4, 8, 16) if cp <= world and world % cp == 0]
    groups = {cp: dist.new_group(list(range(cp))) for cp in sizes}  # every rank creates every group
    comm_types = args.comm_types.split(",")

    if rank == 0:
        import triton
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{world} x {gpu}; torch {torch.__version__}; triton {triton.__version__}; "
              f"NCCL {torch.cuda.nccl.version() if device.type == 'cuda' else '-'}; layer: "
              f"hidden {args.hidden_size}, {args.num_heads} q/k heads, {args.num_v_heads} value heads, head dim "
              f"{args.head_dim}, expand_v {args.expand_v}; bf16 autocast; median of {args.iters} after "
              f"{args.warmup} warm-up", flush=True)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        results = {}
        for cp in sizes:
            for comm_type in ([None] if cp == 1 else comm_types):
                if comm_type == "all_to_all" and (args.num_heads % cp or args.num_v_heads % cp):
                    results[cp, comm_type] = "heads"
                    continue
                result = None
                if rank < cp:
                    result = run_layer(args, tokens, cp, comm_type, groups[cp], device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the layer and its activations are gone: return their memory
                dist.barrier()
                results[cp, comm_type] = result
                if rank == 0:
                    print(tokens, cp, comm_type, result, flush=True)
        if rank == 0:
            rows += table_rows(tokens, results)
    if rank == 0:
        lines = ["| tokens | GPUs | CP method | forward (ms) | fwd+bwd (ms) | tokens/s (all GPUs) | "
                 "efficiency (fwd+bwd) |", "|---|---|---|---|---|---|---|"] + rows
        print("\n".join(lines))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def table_rows(tokens: int, results: dict) -> list[str]:
    """Markdown rows of one sequence length; efficiency against the fewest GPUs that ran."""
    ran = sorted((cp, r[1]) for (cp, _), r in results.items() if isinstance(r, tuple))
    base_cp, base_ms = ran[0] if ran else (None, None)
    rows = []
    for (cp, comm_type), result in results.items():
        method = "none (1 GPU)" if comm_type is None else comm_type
        if not isinstance(result, tuple):
            why = "heads not divisible by CP" if result == "heads" else "does not fit in memory"
            rows.append(f"| {tokens} | {cp} | {method} | {why} | | | |")
            continue
        fwd, fwd_bwd = result
        efficiency = base_ms * base_cp / (cp * fwd_bwd)
        basis = "" if base_cp == 1 else f" (vs {base_cp} GPUs)"
        rows.append(f"| {tokens} | {cp} | {method} | {fwd:.2f} | {fwd_bwd:.2f} | {tokens / fwd_bwd * 1000:,.0f} | "
                    f"{100 * efficiency:.0f}%{basis} |")
    return rows


if __name__ == "__main__":
    main()
