"""Compile the chunk kernels for sm_90a on any machine (no GPU needed) and print ptxas's resource report.

    python benchmarks/kernel_resources.py

Registers, register spills and shared memory per kernel and configuration, for K = V = 128. Spills (local
memory traffic) made the per-chunk kernels slow on the H200 (docs/PERFORMANCE.md, "Kernels"); check this after
changing a kernel's tiles or warps. Uses Triton's bundled ptxas; PTX newer than that ptxas is relabelled
to its version (8.8), which is enough for a resource report but is not how the code is built for a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.kernels import chunk as C  # noqa: E402

F32 = {"G", "beta_out", "g", "beta", "A_log", "dt_bias", "h0", "ht", "dht", "dh0", "dq", "dk", "dw", "dG", "dg",
       "dbeta", "ddt_bias", "dA_log"}
INT32 = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
SCALARS = {"scale": "fp32", "NSEQ": "i32", "ROWS": "i32"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def report(kernel, constexprs: dict, num_warps: int) -> str:
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the JIT function
    sig = {n: "constexpr" if n in constexprs else SCALARS.get(n, "*i32" if n in INT32 else "*fp32" if n in F32 else
           "*bf16") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=2))
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.8", compiled.asm["ptx"], flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    if not regs:
        return f"ptxas failed: {out.stderr.strip()[:300]}"
    return f"{regs.group(1)} registers, {spills.group(1)} B spill stores, {compiled.metadata.shared} B shared"


def main():
    base = dict(H=4, HV=8, K=128, V=128, BT=64)
    gate = dict(GATE_IN_KERNEL=True, BETA_SIGMOID=True, BETA_SCALE=1.0)
    runs = [("intra", C.chunk_intra_kernel, dict(H=4, HV=8, K=128, BT=64, BC=C.SUB_CHUNK, BK=64, PRECISION="tf32", **gate), nw)
            for nw in (4, 8)]
    runs += [(f"wu BK=BV={cfg.kwargs['BK']}", C.chunk_wu_kernel, dict(base, **cfg.kwargs), cfg.num_warps)
             for cfg in C.WU_CONFIGS]
    runs += [("dqkw", C.chunk_bwd_dqkw_kernel, dict(base, BK=64, BV=64), C.CHUNK_WARPS),
             ("wy", C.chunk_bwd_wy_kernel, dict(base, BK=32, BV=32, NK=2, **gate), C.CHUNK_WARPS)]
    for cfg in C.SCAN_CONFIGS:
        bv, nw = cfg.kwargs["BV"], cfg.num_warps
        runs += [(f"scan fwd (o) BV={bv}", C.chunk_scan_fwd_kernel, dict(base, BK=128, BV=bv, USE_H0=True,
                  STORE_HT=True, STORE_O=True, STORE_STATES=False), nw),
                 (f"scan bwd BV={bv}", C.chunk_scan_bwd_kernel, dict(base, BK=128, BV=bv, USE_DHT=True,
                  STORE_DH0=True), nw)]
    for name, kernel, constexprs, num_warps in runs:
        print(f"{name:24s} {num_warps} warps: {report(kernel, constexprs, num_warps)}")


if __name__ == "__main__":
    main()
