"""The GPU kernels a call runs, from torch.profiler: what bench_kernels.py --profile lists per kernel and
bench_fused_ops.py sums into GPU time."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_times(step: Callable[[], object], calls: int) -> dict[str, tuple[float, int]]:
    """{kernel name: (milliseconds, launches)} over `calls` calls of step, after one untimed call (which compiles
    and autotunes). Durations are the GPU's, whatever the host spent launching."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, tuple[float, int]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (ms + e.time_range.elapsed_us() / 1e3, n + 1)
    return kernels
