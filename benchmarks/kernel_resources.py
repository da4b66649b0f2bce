"""Compile the Triton kernels for sm_90a on any machine (no GPU needed) and print ptxas's resource report.

    python benchmarks/kernel_resources.py                  # chunk kernels (K = V = 128) and fused ops, 16-bit
    python benchmarks/kernel_resources.py --dtype fp32     # the same with fp32 tensors
    python benchmarks/kernel_resources.py --only fused     # or: chunk

Registers, register spills and shared memory per kernel and launch configuration: the block sizes, warps and
stages each wrapper chooses, at the sizes the model uses (hidden sizes, conv widths, vocabulary slices, head
dims); and how many programs of it an SM holds at once (programs_per_sm), against which a launch's grid is so
many waves: a grid of 1.45 waves leaves most SMs idle in its second (the reverse scan at `1.3b`, and before session
29 the short convolution's q backward there, whose launch asked for 16 programs an SM where 8 fit). A row marked
OVER needs more shared memory than a Hopper block may have (227 KB), which raises OutOfResources at launch; a row
marked FAILED did not compile. Spills (local memory traffic) made the per-chunk kernels slow on the H200
(docs/PERFORMANCE.md, "Kernels"); check this after changing a kernel's tiles or warps.
Kernels are compiled as a launch compiles them: pointers 16-byte aligned and the launch's num_stages (an
earlier version of this script had neither, so Triton did not pipeline loads through shared memory and the
report missed most of it: 40 KB for dqkw where the H200 refused 304 KB). fp16 compiles like bf16. Uses
Triton's bundled ptxas; PTX newer than that ptxas is relabelled to its version (8.8), which is enough for a
resource report but is not how the code is built for a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_gdn.kernels import chunk as C  # noqa: E402
from megatron_gdn.kernels import (adamw, cross_entropy, fused_norm, fused_swiglu, l2norm, recurrent,  # noqa: E402
                                  rmsnorm, short_conv)

# Tensors that are fp32 whatever the inputs' dtype; the rest take --dtype.
F32 = {"G", "beta_out", "g", "beta", "A_log", "dt_bias", "h0", "ht", "dht", "dh0", "dG", "dg",
       "dqk", "dbeta", "ddt_bias", "dA_log", "dA_scratch", "rstd", "dweight", "dbias", "row_max", "sums",
       "lse", "row_scale", "loss", "grad_scale", "found_inf"}
INT32 = {"cu_seqlens", "chunk_indices", "chunk_offsets", "pos", "block_param"}
# adamw's tables: block starts, the parameters' sizes, and their tensors' addresses
INT64 = {"target", "block_start", "numels", "param_addrs", "grad_addrs", "exp_avg_addrs", "exp_avg_sq_addrs",
         "step_addrs", "copy_addrs"}
SCALARS = {"scale": "fp32", "eps": "fp32", "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "weight_decay": "fp32",
           "NSEQ": "i32", "ROWS": "i32", "N": "i32", "T": "i32", "NT": "i32",
           "NS": "i32", "NB": "i32", "S": "i32", "SX": "i32", "SDX": "i32", "SG": "i32", "SDG": "i32", "V": "i32",
           "vocab_start": "i32"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# An sm_90 SM: a register file in 4 partitions of 16384 (a warp takes its threads' registers, rounded up to 8 a
# thread, in one partition), 228 KB of shared memory with 1 KB more taken for each block, 64 warps, 32 blocks.
PARTITIONS, PARTITION_REGISTERS, SM_SHARED, BLOCK_SHARED_RESERVE, SM_WARPS, SM_BLOCKS = 4, 16384, 233472, 1024, 64, 32
SHARED_LIMIT = SM_SHARED - BLOCK_SHARED_RESERVE  # bytes of shared memory one block may use (227 KB)


def programs_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Programs (blocks) of num_warps warps that an sm_90 SM holds at once, by their registers a thread and shared
    memory a block. Nsight Compute's block limits agreed on the fifteen kernels it read on an H200 (session 29)."""
    warps = PARTITIONS * (PARTITION_REGISTERS // (-(-registers // 8) * 8 * 32))
    return min(warps // num_warps, SM_SHARED // (shared + BLOCK_SHARED_RESERVE), SM_WARPS // num_warps, SM_BLOCKS)



def arg_type(name: str, dtype: str) -> str:
    if name in SCALARS:
        return SCALARS[name]
    return "*i32" if name in INT32 else "*i64" if name in INT64 else "*fp32" if name in F32 else f"*{dtype}"


def report(kernel, constexprs: dict, num_warps: int, num_stages: int = 3, dtype: str = "bf16",
           maxnreg: int | None = None) -> str:
    """ptxas's registers and spills and Triton's shared memory for one launch configuration. num_stages 3 is
    a launch's default (and a triton.Config's); maxnreg caps the registers a thread (a triton.Config's maxnreg)."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the JIT function
    sig = {n: "constexpr" if n in constexprs else arg_type(n, dtype) for n in fn.arg_names}
    # Pointers to torch tensors are 16-byte aligned, which a launch tells the compiler ("D" specialisation).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    except Exception as e:  # e.g. a block over Triton's element limit
        return f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.8", compiled.asm["ptx"], flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    if not regs:
        return f"FAILED: ptxas: {out.stderr.strip()[:300]}"
    shared = compiled.metadata.shared
    if shared > SHARED_LIMIT:
        fit = f"   OVER the {SHARED_LIMIT} B limit"
    else:
        fit = f", {programs_per_sm(int(regs.group(1)), num_warps, shared):>2} programs an SM"
    return f"{regs.group(1):>3} registers, {spills.group(1):>5} B spill stores, {shared:>6} B shared{fit}"


def chunk_runs(dtype: str) -> list:
    """The chunk kernels at K = V = 128 (the scans and o also at K = 256), with the configurations chunk.py launches.
    The autotuned ones (intra, dqkw, wy, scans, o) skip a config that raises OutOfResources, so an OVER row there only
    fails when every config of that shape is over."""
    base = dict(H=4, HV=8, K=128, V=128, BT=64)
    gate = dict(GATE_IN_KERNEL=True, BETA_SIGMOID=True, BETA_SCALE=1.0)
    precision = C.merge_precision(torch.float32 if dtype == "fp32" else torch.bfloat16)  # as chunk._intra launches
    runs = [(f"intra BW={cfg.kwargs['BW']}", C.chunk_intra_kernel, dict(base, BC=C.SUB_CHUNK, BK=64,
                                                                       PRECISION=precision, **gate, **cfg.kwargs),
             cfg.num_warps, 3) for cfg in C.INTRA_CONFIGS]
    wide = 64 if dtype != "fp32" else 32  # chunk.chunk_bwd's blocks
    runs += [(f"dqk intra BV={wide}", C.chunk_bwd_dqk_intra_kernel, dict(HV=8, V=128, BT=64, BV=wide), C.CHUNK_WARPS,
              3)]
    runs += [(f"wy BK=BV={cfg.kwargs['BK']}" + (f" cap {cfg.maxnreg}" if cfg.maxnreg else ""), C.chunk_bwd_wy_kernel,
              dict(base, NK=2, **gate, **cfg.kwargs), cfg.num_warps, cfg.num_stages, cfg.maxnreg)
             for cfg in C.WY_CONFIGS]
    # dqkw with its K blocks reading d(q k^T) from dqk_intra (K = 128), and with one K block computing it (K = 64)
    runs += [(f"dqkw K={K} BV={cfg.kwargs['BV']}", C.chunk_bwd_dqkw_kernel,
              dict(base, K=K, BK=64, INTRA=K == 64, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
             for K in (128, 64) for cfg in C.DQKW_CONFIGS]
    # and with 128-wide K blocks, as at K = 256 (the 1.3b preset) for 2-byte inputs (chunk.dqkw_block_k)
    runs += [(f"dqkw K=256 V=512 BK=128 BV={cfg.kwargs['BV']}", C.chunk_bwd_dqkw_wide_kernel,
              dict(base, K=256, V=512, BK=128, INTRA=False, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
             for cfg in C.DQKW_WIDE_CONFIGS if C.dqkw_block_k(256, 4 if dtype == "fp32" else 2) == 128]
    # The scans hold whole K rows, so their tiles grow with K: also the 1.3b preset's K = 256, V = 512 (and o, the
    # split forward's kernel that the rule chunk.split_o always takes there).
    for K, V in ((128, 128), (256, 512)):
        shape = dict(base, K=K, V=V, BK=C._pow2(K))
        for cfg in C.SCAN_FWD_CONFIGS:
            bv, nw, ns = cfg.kwargs["BV"], cfg.num_warps, cfg.num_stages
            runs += [(f"scan fwd (o) K={K} BV={bv}", C.chunk_scan_fwd_kernel, dict(shape, BV=bv, USE_H0=True,
                      STORE_HT=True, STORE_O=True, STORE_STATES=False), nw, ns),
                     (f"scan fwd (h) K={K} BV={bv}", C.chunk_scan_fwd_kernel, dict(shape, BV=bv, USE_H0=True,
                      STORE_HT=False, STORE_O=False, STORE_STATES=True), nw, ns),
                     (f"scan fwd (o, h) K={K} BV={bv}", C.chunk_scan_fwd_kernel, dict(shape, BV=bv, USE_H0=True,
                      STORE_HT=False, STORE_O=True, STORE_STATES=True), nw, ns)]
        runs += [(f"scan bwd K={K} BV={cfg.kwargs['BV']}", C.chunk_scan_bwd_kernel, dict(
                  shape, BV=cfg.kwargs["BV"], USE_DHT=True, STORE_DH0=True), cfg.num_warps, cfg.num_stages)
                 for cfg in C.SCAN_BWD_CONFIGS]
        runs += [(f"o K={K} BK={cfg.kwargs['BK']} BV={cfg.kwargs['BV']}", C.chunk_o_kernel, dict(shape, **cfg.kwargs),
                  cfg.num_warps, cfg.num_stages) for cfg in C.O_CONFIGS]
    return runs


def fused_runs(dtype: str) -> list:
    """The fused model ops, with the blocks their wrappers choose, every optional input present."""
    runs = []
    for D in (130, 256, 1024, 2048, 4096, 5632, 8192):  # hidden sizes (5632: the 1.3b preset's MLP width)
        BR, BD = fused_norm._rows_per_program(D)
        runs += [(f"rms_norm fwd D={D} BR={BR}", fused_norm.rms_norm_fwd_kernel,
                  dict(D=D, BR=BR, BD=BD, HAS_RESIDUAL=True), 4, 3),
                 (f"rms_norm bwd D={D} BR={BR}", fused_norm.rms_norm_bwd_kernel,
                  dict(D=D, BR=BR, BD=BD, HAS_DH_OUT=True, STAGES=fused_norm.BWD_STAGES), 4, 3)]
    for D in (64, 128, 130, 256, 512):  # head_v_dim (512: head_dim 256 x expand_v 2)
        BR, BD, warps = rmsnorm.bwd_tiles(D)
        runs += [(f"gated_rmsnorm fwd D={D}", rmsnorm.gated_rmsnorm_fwd_kernel,
                  dict(H=8, D=D, BR=rmsnorm.ROWS_PER_PROGRAM, BD=BD), 4, 3),
                 (f"gated_rmsnorm bwd D={D} BR={BR}", rmsnorm.gated_rmsnorm_bwd_kernel,
                  dict(H=8, D=D, BR=BR, BD=BD, STAGES=rmsnorm.BWD_STAGES), warps, 3)]
    for D in (64, 128, 256):  # K (the Triton kernels take K <= 256)
        BD = triton.next_power_of_2(D)
        runs += [(f"l2norm fwd D={D}", l2norm.l2norm_fwd_kernel, dict(D=D, BR=l2norm.ROWS_PER_PROGRAM, BD=BD), 4, 3),
                 (f"l2norm bwd D={D}", l2norm.l2norm_bwd_kernel, dict(D=D, BR=l2norm.ROWS_PER_PROGRAM, BD=BD), 4, 3)]
    runs += [("swiglu fwd", fused_swiglu.swiglu_fwd_kernel, dict(I=5632, BLOCK=fused_swiglu.BLOCK), 4, 3),
             ("swiglu bwd", fused_swiglu.swiglu_bwd_kernel, dict(I=5632, BLOCK=fused_swiglu.BLOCK), 4, 3)]
    flags = dict(HAS_PAST=True, HAS_DOCS=True, HAS_BIAS=True)
    # the channel count D only sets the grid; 1024 is a stand-in. Head dims: q and k L2-normalised inside
    for W, head_dim in [(W, None) for W in range(1, 9)] + [(4, 64), (4, 128), (4, 256), (8, 256)]:
        name = f"W={W}" + (f" l2norm K={head_dim}" if head_dim else "")
        for kind, kernel, launch in (("fwd", short_conv.short_conv_fwd_kernel, short_conv.FORWARD),
                                     ("bwd", short_conv.short_conv_bwd_kernel, short_conv.BACKWARD)):
            R, C = short_conv.channel_block(1024, head_dim, launch)
            runs.append((f"short_conv {kind} {name}", kernel,
                         dict(D=1024, W=W, R=R, C=C, L2NORM=bool(head_dim), UNROLL=launch.unroll,
                              STAGES=launch.stages, **flags), launch.warps, launch.stages))
        if head_dim is None and W > 1:  # the decoding step does not normalise
            runs.append((f"short_conv step {name}", short_conv.short_conv_step_kernel,
                         dict(D=1024, W=W, BD=short_conv.STEP_CHANNELS, HAS_BIAS=True), 4, 3))
    for V in (256, 2048, 19008):  # vocabulary slices (19008 = 152064 / 8); BV stops growing at MAX_BV
        BV = min(cross_entropy.MAX_BV, triton.next_power_of_2(V))
        runs += [(f"ce stats BV={BV}", cross_entropy.ce_stats_kernel, dict(BV=BV), 4, 3),
                 (f"ce grad BV={BV}", cross_entropy.ce_grad_kernel, dict(BV=BV), 4, 3),
                 (f"ce loss+grad BV={BV}", cross_entropy.ce_loss_grad_kernel, dict(BV=BV, GRAD=True), 4, 3)]
    for copies in (False, True):  # the bf16 compute copies written beside the fp32 weights, or none
        runs.append((f"adamw copies={copies}", adamw.adamw_kernel,
                     dict(HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_COPIES=copies, BLOCK=adamw.BLOCK), 4, 3))
    fr = dict(H=4, HV=8, USE_H0=True, STORE_HT=True, L2NORM=True, GATE_IN_KERNEL=True, BETA_SIGMOID=True,
              BETA_SCALE=1.0)
    for K, V in ((128, 128), (256, 512)):  # head dims (256, 512: the 1.3b preset)
        for cfg in recurrent.fused_recurrent_fwd_kernel.configs:
            bv = cfg.kwargs["BV"]
            runs.append((f"recurrent K={K} V={V} BV={bv}", recurrent.fused_recurrent_fwd_kernel,
                         dict(fr, K=K, V=V, BK=triton.next_power_of_2(K), BV=bv), cfg.num_warps, cfg.num_stages))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="dtype of the input and output tensors (fp16 compiles like bf16)")
    parser.add_argument("--only", choices=("chunk", "fused"), help="report one family of kernels")
    args = parser.parse_args()
    runs = [] if args.only == "fused" else chunk_runs(args.dtype)
    runs += [] if args.only == "chunk" else fused_runs(args.dtype)
    print(f"sm_90a, {args.dtype} tensors")
    for name, kernel, constexprs, num_warps, num_stages, *maxnreg in runs:  # a run may add a register cap
        print(f"{name:32s} {num_warps} warps {num_stages} stages: "
              f"{report(kernel, constexprs, num_warps, num_stages, args.dtype, *maxnreg)}", flush=True)


if __name__ == "__main__":
    main()
