"""The chunked gated delta rule in Triton: forward, backward and the autograd Function.

The algorithm is the one of reference.chunk_gated_delta_rule_torch (../DESIGN.md section 3). Per chunk of
BT = 64 tokens of one value head, with G the chunk-local cumulative log decay, gamma = exp(G):

    A     = strict_lower(beta_i (k_i . k_j) exp(G_i - G_j)),   Ai = (I + A)^-1
    w     = Ai (beta gamma k),   u = Ai (beta v),   Aqk = scale * lower_incl(q k^T exp(G_i - G_j))
    vn    = u - w S                                         (S: the state entering the chunk, fp32)
    o     = scale gamma q S + Aqk vn
    S'    = exp(G_last) S + (k exp(G_last - G))^T vn

w is never stored: the scans compute w S as Ai (beta gamma (k S)) and, backward, w^T dvn as k^T (beta gamma (Ai^T
dvn)), reading the chunk's [64, 64] Ai where w is a [64, K] tile, and k, which they read anyway, in both orientations
from one tile (see SCAN_BWD_CONFIGS for what that saved).

Forward: ``intra`` (one program per chunk and head: gate, cumsum, beta, A and its inverse Ai, stored, then from
them u and Aqk), then ``scan`` (one program per sequence, head and block of V columns: the
sequential pass over chunks). When the scan has many programs, it also writes o, so the per-chunk states never
reach memory (the fused path); when it has few, or K is large (``split_o``), it stores the states and vn instead
and ``o`` computes the output with one program per chunk, head and block of V (the split path). A forward that
needs gradients takes the split path and keeps the states for the backward, up to KEEP_STATES_MAX_BYTES. Backward
reuses the forward's G, beta, Ai, Aqk and the states (past that budget it recomputes them with the forward
scan, from u), runs the reverse scan (dS per chunk, dvn, dh0), then, for K > 64, ``dqk_intra`` (per chunk: the
gradient of the intra-chunk q k^T, which dqkw computes itself where K is one 64-column block), ``dqkw`` (per chunk and
64 columns of K: dq, dk and dw from the states, the intra-chunk terms, and part of dG) and ``wy`` (per chunk: back
through Ai to dk, dv, dbeta, the rest of dG, the within-chunk reverse cumsum that turns dG into dg, and the gradients
of the fused gate and beta sigmoid).

Conventions: every exp() takes a difference of cumulative log decays that is <= 0 (a masked entry gets
exponent 0 through tl.where, then is zeroed with tl.where, never multiplied by a mask); states, G, beta and
all gradients of g/beta are fp32; tiles meet the tensor cores in the input dtype with fp32 accumulation.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .l2norm import l2norm_bwd, l2norm_fwd
from .partial_sums import sum_partials
from .triton_utils import (CHUNK, INTERPRET, chunk_coords, chunk_tables, configs, cu_seqlens_int32,
                           exp, load_gates, load_rows, load_rows_t, sigmoid, side_stream, sm_count, softplus,
                           store_rows, transpose_via_scratch)

# Sub-block of the triangular inverse of each 16-row diagonal block (chunk_intra_kernel): diagonal sub-blocks are
# inverted by substitution (SUB_CHUNK - 1 sequential steps, each two reductions over the tile), then merged
# pairwise by matrix products (log2(16 / SUB_CHUNK) levels). 4 was the fastest on an H200 (B4 T4096 H16 K128)
# when the whole 64-row chunk was merged this way; not re-measured for the 16-row blocks.
SUB_CHUNK = 4
# Precision of the fp32 products that merge the inverse's blocks. tf32 loses mantissa bits in a step that can
# amplify errors, but the inverse is stored in the input dtype (bf16 in training) right after, and measured on
# an H200 against the fp64 reference, tf32 left the bf16 output error unchanged at 3 digits on random inputs
# (4.06e-3 both) and raised it 3% on nearly identical keys without decay (3.45e-2 -> 3.55e-2, the
# worst-conditioned inverse), while tf32x3 made the per-chunk kernel that held the inverse 1.2-1.7x slower. fp32 inputs keep
# tf32x3 (fp32 accuracy), and the interpreter computes in ieee.
def merge_precision(dtype: torch.dtype) -> str:
    if INTERPRET:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def unit_lower_inverse(b_A, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """(I + A)^-1 of a strictly lower triangular [BT, BT] tile A, in fp32.

    Forward substitution inverts the BT / BC diagonal blocks of size BC together (step s computes row s of
    every block: the blocks occupy disjoint columns, so one reduction serves them all). Then blocks are
    merged pairwise: for [[D0, 0], [L, D1]] the inverse is D - D L D with D = diag(D0^-1, D1^-1).
    """
    o_i = tl.arange(0, BT)
    r, c = o_i[:, None], o_i[None, :]
    m_blk = (r // BC) == (c // BC)
    # Step s: row s of each block, Ai[s, :] = e_s - sum_j A[s, j] Ai[j, :]. A's row comes out of a reduction over
    # rows, indexed by column j, and multiplies Ai's rows j: b_a[:, None] converts its layout (through shared
    # memory), which on these small tiles costs less than the alternative, substituting on the transpose and
    # transposing the result with tl.trans, the pattern Triton 3.4-3.7.0 miscompiles on Hopper when the tile
    # descends from a matrix product (as A does, from k k^T).
    b_Ai = tl.where(r == c, 1., 0.)
    for s in range(1, BC):
        b_a = tl.sum(tl.where(((r % BC) == s) & m_blk, b_A, 0.), axis=0)  # [BT]: row s of each block, by column
        b_sub = tl.sum(b_a[:, None] * b_Ai, axis=0)  # [BT]: sum_j A[s, j] Ai[j, :] (Ai is block diagonal here)
        b_Ai = tl.where(((r % BC) == s) & m_blk, b_Ai - b_sub[None, :], b_Ai)
    for lvl in tl.static_range(0, 8):
        if (BC << lvl) < BT:
            # blocks of BC << lvl rows: same pair of blocks, different blocks <=> block indices differ in bit 0
            m_off = (((r // (BC << lvl)) ^ (c // (BC << lvl))) == 1) & (r > c)
            b_L = tl.where(m_off, b_A, 0.)
            b_Ai = b_Ai - tl.dot(tl.dot(b_Ai, b_L, input_precision=PRECISION), b_Ai, input_precision=PRECISION)
    return b_Ai


@triton.jit
def gate_and_beta(g, beta, A_log, dt_bias, t1, eos, i_hv, HV: tl.constexpr, BB: tl.constexpr,
                  GATE_IN_KERNEL: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr):
    """(log decay, beta) of rows t1.. (BB of them) of one value head, fp32; 0 past eos."""
    o_t = t1 + tl.arange(0, BB)
    m_t = o_t < eos
    b_g = tl.load(g + o_t * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    if GATE_IN_KERNEL:
        b_x = b_g + tl.load(dt_bias + i_hv).to(tl.float32)
        b_g = tl.where(m_t, -exp(tl.load(A_log + i_hv).to(tl.float32)) * softplus(b_x), 0.)
    b_beta = tl.load(beta + o_t * HV + i_hv, mask=m_t, other=0.).to(tl.float32)
    if BETA_SIGMOID:
        b_beta = tl.where(m_t, BETA_SCALE * sigmoid(b_beta), 0.)
    return b_g, b_beta


@triton.jit
def store_gates(G, beta_out, b_G, b_beta, t1, eos, i_hv, HV: tl.constexpr, BB: tl.constexpr):
    o_t = t1 + tl.arange(0, BB)
    tl.store(G + o_t * HV + i_hv, b_G, mask=o_t < eos)
    tl.store(beta_out + o_t * HV + i_hv, b_beta, mask=o_t < eos)


@triton.jit
def decayed_block(b_kk, b_Gi, b_Gj, b_beta, DIAGONAL: tl.constexpr, BB: tl.constexpr):
    """Block (i, j) of A = strict_lower(beta_r (k_r . k_c) exp(G_r - G_c)) from its k k^T block: every entry of
    a block below the diagonal is below it (G_r - G_c <= 0 there), a diagonal block keeps its strict lower part."""
    if DIAGONAL:
        o = tl.arange(0, BB)
        m = o[:, None] > o[None, :]
        return tl.where(m, b_kk * exp(tl.where(m, b_Gi[:, None] - b_Gj[None, :], 0.)) * b_beta[:, None], 0.)
    return b_kk * exp(b_Gi[:, None] - b_Gj[None, :]) * b_beta[:, None]


@triton.jit
def store_block(Ai, b_X, t0, eos, i_hv, HV: tl.constexpr, BT: tl.constexpr, i: tl.constexpr, j: tl.constexpr,
                BB: tl.constexpr):
    """Block (i, j) of the chunk's [BT, BT] inverse into its rows and columns of Ai ([rows, HV, BT])."""
    store_rows(Ai, b_X, t0 + i * BB, eos, i_hv, HV, BT, j * BB + tl.arange(0, BB), BB)


# The per-program work differs a lot with the head dim; the warps are tuned per shape, with the width BW of the
# column blocks of u and Aqk's products. The inverse's [16, 16] tiles are replicated across warps, so more warps
# barely lower the registers per thread (bf16, K = 128: 247 at 2 warps, 248 at 4, 192 at 8, no spills, before w, u
# and Aqk moved into this kernel; kernel_resources.py), while 2 warps let several programs share an SM. The
# separate w / u kernel took 64-wide blocks at 8 warps on an H200, 32-wide at 8 or 4 elsewhere. Fewer warps kept
# winning, so session 24 offered one and 64-wide blocks at two (H200, bf16, the kernel alone, as the model calls it):
# at the small preset (B8 T4096 H12 K64 V128) 32-wide at 1 warp takes 196 us where the best before, 32-wide at 2,
# took 256; at 1.3b (B4 T4096 H6 K256 V512) 64-wide at 2 warps 121 us against 140.
INTRA_CONFIGS = [triton.Config({"BW": bw}, num_warps=nw)
                 for bw, nw in ((32, 4), (64, 8), (32, 8), (32, 2), (32, 1), (64, 2))]


@triton.autotune(configs=configs(INTRA_CONFIGS),
                 key=["H", "HV", "K", "V", "BK", "GATE_IN_KERNEL", "BETA_SIGMOID"])
@triton.jit
def chunk_intra_kernel(q, k, v, g, beta, A_log, dt_bias, G, beta_out, Ai, Aqk, u, cu_seqlens, chunk_indices,
                       scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr,
                       GATE_IN_KERNEL: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """One chunk of one value head: G (the chunk-local cumsum of the gate), beta, Ai = (I + A)^-1, then from them
    u and Aqk (u_aqk_tiles).

    The chunk is cut into 4 blocks of BB = BT / 4 rows, and everything is computed on [BB, BB] tiles: the 10
    blocks of k k^T on or below the diagonal, the inverses of the 4 diagonal blocks of I + A (unit_lower_inverse),
    then the blocks below the diagonal by block forward substitution,
        Ai_ij = -Ai_ii sum_{j <= m < i} A_im Ai_mj,
    16 small products where whole-tile merges took 8 products of [BT, BT] tiles and masked most of their
    entries away. Ai is stored (input dtype, [rows, HV, BT], zeros above the diagonal) for the scans and the
    backward, which then never inverts again, and read back here by u_aqk_tiles after a barrier of the whole program (as
    triton_utils.transpose_via_scratch reads its tile), with G and beta: the [16, 16] blocks of the inverse are
    not one tile, and the rows each thread stored are not the rows it reads. One kernel instead of two saves
    reading k, G, beta and Ai once more from memory, and a launch.
    """
    tl.static_assert(BT == 64, "the block solve is written for 4 blocks of 16 rows")
    BB: tl.constexpr = BT // 4
    i_t, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    _, t0, eos = chunk_coords(cu_seqlens, chunk_indices, i_t, BT)
    t1, t2, t3 = t0 + BB, t0 + 2 * BB, t0 + 3 * BB

    # G: the cumsum within each block plus the sum of the blocks before it (padded rows repeat the last value)
    g0, be0 = gate_and_beta(g, beta, A_log, dt_bias, t0, eos, i_hv, HV, BB, GATE_IN_KERNEL, BETA_SIGMOID, BETA_SCALE)
    g1, be1 = gate_and_beta(g, beta, A_log, dt_bias, t1, eos, i_hv, HV, BB, GATE_IN_KERNEL, BETA_SIGMOID, BETA_SCALE)
    g2, be2 = gate_and_beta(g, beta, A_log, dt_bias, t2, eos, i_hv, HV, BB, GATE_IN_KERNEL, BETA_SIGMOID, BETA_SCALE)
    g3, be3 = gate_and_beta(g, beta, A_log, dt_bias, t3, eos, i_hv, HV, BB, GATE_IN_KERNEL, BETA_SIGMOID, BETA_SCALE)
    c1 = tl.sum(g0, axis=0)
    c2 = c1 + tl.sum(g1, axis=0)
    c3 = c2 + tl.sum(g2, axis=0)
    G0, G1, G2, G3 = tl.cumsum(g0, axis=0), tl.cumsum(g1, axis=0) + c1, tl.cumsum(g2, axis=0) + c2, \
        tl.cumsum(g3, axis=0) + c3
    store_gates(G, beta_out, G0, be0, t0, eos, i_hv, HV, BB)
    store_gates(G, beta_out, G1, be1, t1, eos, i_hv, HV, BB)
    store_gates(G, beta_out, G2, be2, t2, eos, i_hv, HV, BB)
    store_gates(G, beta_out, G3, be3, t3, eos, i_hv, HV, BB)

    kk00 = tl.zeros([BB, BB], dtype=tl.float32)
    kk10, kk11 = tl.zeros_like(kk00), tl.zeros_like(kk00)
    kk20, kk21, kk22 = tl.zeros_like(kk00), tl.zeros_like(kk00), tl.zeros_like(kk00)
    kk30, kk31, kk32, kk33 = tl.zeros_like(kk00), tl.zeros_like(kk00), tl.zeros_like(kk00), tl.zeros_like(kk00)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        k0, k0t = load_rows(k, t0, eos, i_h, H, K, o_k, BB), load_rows_t(k, t0, eos, i_h, H, K, o_k, BB)
        k1, k1t = load_rows(k, t1, eos, i_h, H, K, o_k, BB), load_rows_t(k, t1, eos, i_h, H, K, o_k, BB)
        k2, k2t = load_rows(k, t2, eos, i_h, H, K, o_k, BB), load_rows_t(k, t2, eos, i_h, H, K, o_k, BB)
        k3 = load_rows(k, t3, eos, i_h, H, K, o_k, BB)
        kk00 += tl.dot(k0, k0t)
        kk10 += tl.dot(k1, k0t)
        kk11 += tl.dot(k1, k1t)
        kk20 += tl.dot(k2, k0t)
        kk21 += tl.dot(k2, k1t)
        kk22 += tl.dot(k2, k2t)
        kk30 += tl.dot(k3, k0t)
        kk31 += tl.dot(k3, k1t)
        kk32 += tl.dot(k3, k2t)
        kk33 += tl.dot(k3, load_rows_t(k, t3, eos, i_h, H, K, o_k, BB))

    i0 = unit_lower_inverse(decayed_block(kk00, G0, G0, be0, True, BB), BB, BC, PRECISION)
    i1 = unit_lower_inverse(decayed_block(kk11, G1, G1, be1, True, BB), BB, BC, PRECISION)
    i2 = unit_lower_inverse(decayed_block(kk22, G2, G2, be2, True, BB), BB, BC, PRECISION)
    i3 = unit_lower_inverse(decayed_block(kk33, G3, G3, be3, True, BB), BB, BC, PRECISION)
    A10 = decayed_block(kk10, G1, G0, be1, False, BB)
    A20 = decayed_block(kk20, G2, G0, be2, False, BB)
    A21 = decayed_block(kk21, G2, G1, be2, False, BB)
    A30 = decayed_block(kk30, G3, G0, be3, False, BB)
    A31 = decayed_block(kk31, G3, G1, be3, False, BB)
    A32 = decayed_block(kk32, G3, G2, be3, False, BB)
    a10 = -tl.dot(tl.dot(i1, A10, input_precision=PRECISION), i0, input_precision=PRECISION)
    a21 = -tl.dot(tl.dot(i2, A21, input_precision=PRECISION), i1, input_precision=PRECISION)
    a32 = -tl.dot(tl.dot(i3, A32, input_precision=PRECISION), i2, input_precision=PRECISION)
    a20 = -tl.dot(i2, tl.dot(A20, i0, input_precision=PRECISION) + tl.dot(A21, a10, input_precision=PRECISION),
                  input_precision=PRECISION)
    a31 = -tl.dot(i3, tl.dot(A31, i1, input_precision=PRECISION) + tl.dot(A32, a21, input_precision=PRECISION),
                  input_precision=PRECISION)
    a30 = -tl.dot(i3, tl.dot(A30, i0, input_precision=PRECISION) + tl.dot(A31, a10, input_precision=PRECISION)
                  + tl.dot(A32, a20, input_precision=PRECISION), input_precision=PRECISION)
    zero = tl.zeros_like(kk00)
    store_block(Ai, i0, t0, eos, i_hv, HV, BT, 0, 0, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 0, 1, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 0, 2, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 0, 3, BB)
    store_block(Ai, a10, t0, eos, i_hv, HV, BT, 1, 0, BB)
    store_block(Ai, i1, t0, eos, i_hv, HV, BT, 1, 1, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 1, 2, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 1, 3, BB)
    store_block(Ai, a20, t0, eos, i_hv, HV, BT, 2, 0, BB)
    store_block(Ai, a21, t0, eos, i_hv, HV, BT, 2, 1, BB)
    store_block(Ai, i2, t0, eos, i_hv, HV, BT, 2, 2, BB)
    store_block(Ai, zero, t0, eos, i_hv, HV, BT, 2, 3, BB)
    store_block(Ai, a30, t0, eos, i_hv, HV, BT, 3, 0, BB)
    store_block(Ai, a31, t0, eos, i_hv, HV, BT, 3, 1, BB)
    store_block(Ai, a32, t0, eos, i_hv, HV, BT, 3, 2, BB)
    store_block(Ai, i3, t0, eos, i_hv, HV, BT, 3, 3, BB)
    tl.debug_barrier()  # every thread's Ai, G and beta stored (bar.sync: also visible to the program's threads)
    u_aqk_tiles(q, k, v, beta_out, G, Ai, Aqk, u, t0, eos, i_h, i_hv, scale, H, HV, K, V, BT, BW, BW)


@triton.jit
def decayed_causal(b_x, b_G, scale, BT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """scale * X_ij exp(G_i - G_j) where i >= j, else 0: the intra-chunk attention's decay and mask, on a [BT, BT]
    tile X of query rows i and key columns j. TRANSPOSED: the tile holds X^T (entry [j, i] is pair (i, j))."""
    o_t = tl.arange(0, BT)
    if TRANSPOSED:
        m = o_t[None, :] >= o_t[:, None]
        b_d = b_G[None, :] - b_G[:, None]
    else:
        m = o_t[:, None] >= o_t[None, :]
        b_d = b_G[:, None] - b_G[None, :]
    return tl.where(m, b_x * exp(tl.where(m, b_d, 0.)), 0.) * scale


@triton.jit
def u_aqk_tiles(q, k, v, beta, G, Ai, Aqk, u, t0, eos, i_h, i_hv, scale, H: tl.constexpr, HV: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One chunk of one value head, from the stored inverse: u and Aqk (see the module docstring)."""
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    b_G, _ = load_gates(G, t0, eos, i_hv, HV, BT)
    b_beta = tl.load(beta + (t0 + o_t) * HV + i_hv, mask=t0 + o_t < eos, other=0.)
    b_Ai = load_rows(Ai, t0, eos, i_hv, HV, BT, o_t, BT)  # [BT, BT]
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_qk += tl.dot(load_rows(q, t0, eos, i_h, H, K, o_k, BT), load_rows_t(k, t0, eos, i_h, H, K, o_k, BT))
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = load_rows(v, t0, eos, i_hv, HV, V, o_v, BT)  # [BT, BV]
        store_rows(u, tl.dot(b_Ai, (b_v * b_beta[:, None]).to(DT)), t0, eos, i_hv, HV, V, o_v, BT)
    store_rows(Aqk, decayed_causal(b_qk, b_G, scale, BT, False), t0, eos, i_hv, HV, BT, o_t, BT)


# Few programs (long sequences, few heads) want narrow V blocks; many programs want wide ones. Every config is
# pipelined (2 or 3 stages): an unpipelined (32, 8, 1) config raised "illegal memory access" on an H200 (Triton 3.6)
# whenever the grid was larger than a few hundred programs (B4 T4096 H6 K256 V512; 50 documents at K = 128),
# while it passed on small grids. The pipelined [BT, K] tiles take shared memory: with fp32 inputs and K > 64
# every config needs more than Hopper's 227 KB (262 KB at K = 128; benchmarks/kernel_resources.py --dtype fp32),
# so the Triton path takes fp32 inputs up to FP32_MAX_HEAD_DIM only (kernels/__init__.py falls back or says so).
# The forward also tries 4 warps at BV 32 / 64 and 3 stages: at B1 T32768 H16 (32 programs at BV 64) the autotuner
# took (16, 4, 3), and the states scan went from about 1.0 to 0.49 ms (H100, session 7): one warp group per program
# has no cross-group barrier in the chain of dependent products, and the third stage loads Ai, u and k two chunks
# ahead. The backward scan tries the same 4-warp ones at BV 16 / 32 (BV 64 at 4 warps needs 255 registers there).
# Each scan program reads the chunk's [64, K] tiles for its BV columns only, so at K = 256 the scans are bound by
# those reads (from L2): they read k once for both of its orientations, and Ai ([64, 64]) where they read w
# ([64, K]) until session 14, at the price of one more small product in the chain of each step. With that change
# (one H200, do_bench, bf16, the kernels alone): the reverse scan B4 T4096 H6 K256 V512 (the 1.3b preset) 811 ->
# 702 us, B8 T4096 H12 K64 V128 (small) 312 -> 214, B4 T4096 H16 K128 V128 250 -> 242; the states scan 426 -> 403,
# 138 -> 141 and 151 -> 138 us. At K = 256 the reverse scan's 64-wide blocks now fit shared memory (197 KB at 8
# warps and 2 stages; every 64-wide config was over the limit with w) and the autotuner takes them there: half
# the programs, so half the reads.
SCAN_BWD_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                    for bv, nw, ns in ((32, 8, 2), (16, 8, 2), (16, 4, 2), (64, 8, 2), (32, 4, 2), (32, 4, 3),
                                       (16, 4, 3))]
SCAN_FWD_CONFIGS = SCAN_BWD_CONFIGS + [triton.Config({"BV": 64}, num_warps=4, num_stages=2)]
FP32_MAX_HEAD_DIM = 64
# Warps of dqk_intra, whose [64, 64] fp32 product and decay tiles want 8; dqkw and wy autotune theirs (DQKW_CONFIGS,
# WY_CONFIGS).
CHUNK_WARPS = 8


@triton.jit
def scan_coords(cu_seqlens, chunk_offsets, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """Coordinates of a scan program (a flat grid of V blocks x sequences x value heads, so no grid axis
    limits the number of sequences): sequence, value head, q/k head, its rows [bos, eos), its first global
    chunk, and the program's [BK, BV] slice of a [K, V] state (column offsets, element offsets, mask)."""
    NV = tl.cdiv(V, BV)
    i_p = tl.program_id(0).to(tl.int64)
    i_v, i_n, i_hv = i_p % NV, i_p // NV // HV, i_p // NV % HV
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_s = (o_k < K)[:, None] & (o_v < V)[None, :]
    return i_n, i_hv, i_hv // (HV // H), bos, eos, c0, o_v, o_k[:, None] * V + o_v[None, :], m_s


@triton.jit
def load_state(ptr, i_n, i_hv, p_s, m_s, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, USE: tl.constexpr):
    """A program's [BK, BV] fp32 slice of state [i_n, i_hv] of an [N, HV, K, V] tensor; zeros if not USE."""
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE:
        b_S += tl.load(ptr + (i_n * HV + i_hv) * K * V + p_s, mask=m_s, other=0.).to(tl.float32)
    return b_S


@triton.autotune(configs=configs(SCAN_FWD_CONFIGS),
                 key=["H", "HV", "K", "V", "BK", "NSEQ", "STORE_O", "STORE_STATES"],
                 restore_value=[])
@triton.jit
def chunk_scan_fwd_kernel(q, k, Ai, beta, u, G, Aqk, h0, o, ht, h, vn, cu_seqlens, chunk_offsets, scale, NSEQ,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_O: tl.constexpr,
                          STORE_STATES: tl.constexpr):
    """The sequential pass over the chunks of one sequence, one value head, BV columns of the state.

    Writes o (STORE_O, the forward), or the state entering each chunk and vn (STORE_STATES, the backward's
    recomputation), and the final state. The state stays in fp32 registers, [BK >= K, BV].
    """
    i_n, i_hv, i_h, bos, eos, c0, o_v, p_s, m_s = scan_coords(cu_seqlens, chunk_offsets, H, HV, K, V, BK, BV)
    b_S = load_state(h0, i_n, i_hv, p_s, m_s, HV, K, V, BK, BV, USE_H0)
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    for i_c in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + i_c * BT
        m_t = t0 + o_t < eos
        if STORE_STATES:
            tl.store(h + ((c0 + i_c) * HV + i_hv) * K * V + p_s, b_S.to(h.dtype.element_ty), mask=m_s)
        b_k = load_rows(k, t0, eos, i_h, H, K, o_k, BT)  # [BT, BK]
        b_G, b_Glast = load_gates(G, t0, eos, i_hv, HV, BT)
        b_bg = tl.load(beta + (t0 + o_t) * HV + i_hv, mask=m_t, other=0.) * exp(b_G)
        # vn = u - w S, with w S = Ai (beta gamma (k S))
        b_wS = tl.dot(load_rows(Ai, t0, eos, i_hv, HV, BT, o_t, BT), (tl.dot(b_k, b_S.to(DT)) * b_bg[:, None]).to(DT))
        b_vn = load_rows(u, t0, eos, i_hv, HV, V, o_v, BT).to(tl.float32) - b_wS  # [BT, BV]
        if STORE_STATES:
            store_rows(vn, b_vn, t0, eos, i_hv, HV, V, o_v, BT)
        if STORE_O:
            b_q = load_rows(q, t0, eos, i_h, H, K, o_k, BT)
            b_Aqk = load_rows(Aqk, t0, eos, i_hv, HV, BT, o_t, BT)
            b_o = tl.dot(b_q, b_S.to(DT)) * (scale * exp(b_G))[:, None] + tl.dot(b_Aqk, b_vn.to(DT))
            store_rows(o, b_o, t0, eos, i_hv, HV, V, o_v, BT)
        b_vn = b_vn * exp(tl.where(m_t, b_Glast - b_G, 0.))[:, None]
        b_S = b_S * exp(b_Glast) + tl.dot(tl.trans(b_k), b_vn.to(DT))  # a loaded tile's transpose
    if STORE_HT:
        tl.store(ht + (i_n * HV + i_hv) * K * V + p_s, b_S, mask=m_s)


# Tiles of chunk_o_kernel ([BT, BV] of o per program, BK rows of the state at a time); no config spills or needs
# more than 227 KB of shared memory in bf16 or fp32 (benchmarks/kernel_resources.py).
O_CONFIGS = [triton.Config({"BK": bk, "BV": bv}, num_warps=nw, num_stages=ns)
             for bk, bv, nw, ns in ((64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2))]


@triton.autotune(configs=configs(O_CONFIGS), key=["H", "HV", "K", "V"])
@triton.jit
def chunk_o_kernel(q, h, vn, G, Aqk, o, cu_seqlens, chunk_indices, scale,
                   H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The split forward's output, for one chunk, value head and BV columns: o = scale gamma q S + Aqk vn, from
    the state S entering the chunk and vn, both stored by the scan (STORE_STATES) in the input dtype, which is
    also what the fused scan rounds them to for these products.

    A flat grid with the V blocks, then the value heads, varying fastest: the programs that read the same q
    and Aqk tiles run side by side.
    """
    NV = tl.cdiv(V, BV)
    i_p = tl.program_id(0).to(tl.int64)
    i_v, i_hv, i_t = i_p % NV, i_p // NV % HV, i_p // NV // HV
    i_h = i_hv // (HV // H)
    _, t0, eos = chunk_coords(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    p_h = h + (i_t * HV + i_hv) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_S = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.)
        b_o += tl.dot(load_rows(q, t0, eos, i_h, H, K, o_k, BT), b_S)
    b_G, _ = load_gates(G, t0, eos, i_hv, HV, BT)
    b_o = b_o * (scale * exp(b_G))[:, None] \
        + tl.dot(load_rows(Aqk, t0, eos, i_hv, HV, BT, o_t, BT), load_rows(vn, t0, eos, i_hv, HV, V, o_v, BT))
    store_rows(o, b_o, t0, eos, i_hv, HV, V, o_v, BT)


@triton.autotune(configs=configs(SCAN_BWD_CONFIGS),
                 key=["H", "HV", "K", "V", "BK", "NSEQ"], restore_value=[])
@triton.jit
def chunk_scan_bwd_kernel(q, k, Ai, beta, G, Aqk, do, dht, dh0, dh, dvn, cu_seqlens, chunk_offsets, scale, NSEQ,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    """The reverse pass: dS (the gradient of the state leaving each chunk, stored per chunk), dvn, dh0."""
    i_n, i_hv, i_h, bos, eos, c0, o_v, p_s, m_s = scan_coords(cu_seqlens, chunk_offsets, H, HV, K, V, BK, BV)
    b_dS = load_state(dht, i_n, i_hv, p_s, m_s, HV, K, V, BK, BV, USE_DHT)
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    NT = tl.cdiv(eos - bos, BT)
    for i_r in range(NT):
        i_c = NT - 1 - i_r
        t0 = bos + i_c * BT
        m_t = t0 + o_t < eos
        tl.store(dh + ((c0 + i_c) * HV + i_hv) * K * V + p_s, b_dS.to(dh.dtype.element_ty), mask=m_s)
        b_G, b_Glast = load_gates(G, t0, eos, i_hv, HV, BT)
        b_do = load_rows(do, t0, eos, i_hv, HV, V, o_v, BT)  # [BT, BV]
        b_AqkT = load_rows_t(Aqk, t0, eos, i_hv, HV, BT, o_t, BT)  # [BT, BT]
        b_k = load_rows(k, t0, eos, i_h, H, K, o_k, BT)  # [BT, BK]
        b_dvn = tl.dot(b_AqkT, b_do) \
            + tl.dot(b_k, b_dS.to(DT)) * exp(tl.where(m_t, b_Glast - b_G, 0.))[:, None]
        store_rows(dvn, b_dvn, t0, eos, i_hv, HV, V, o_v, BT)
        # w^T dvn = k^T (beta gamma (Ai^T dvn))
        b_bg = tl.load(beta + (t0 + o_t) * HV + i_hv, mask=m_t, other=0.) * exp(b_G)
        b_x = tl.dot(load_rows_t(Ai, t0, eos, i_hv, HV, BT, o_t, BT), b_dvn.to(DT)) * b_bg[:, None]  # [BT, BV]
        b_qt = load_rows_t(q, t0, eos, i_h, H, K, o_k, BT) * (scale * exp(b_G))[None, :]  # [BK, BT]
        b_dS = b_dS * exp(b_Glast) + tl.dot(b_qt.to(DT), b_do.to(DT)) - tl.dot(tl.trans(b_k), b_x.to(DT))
    if STORE_DH0:
        tl.store(dh0 + (i_n * HV + i_hv) * K * V + p_s, b_dS, mask=m_s)


@triton.jit
def chunk_bwd_dqk_intra_kernel(vn, do, G, dqk, cu_seqlens, chunk_indices, scale,
                               HV: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Per chunk and value head: the gradient of the intra-chunk attention before its decay and mask,
    d(q k^T) = scale * lower_incl((dO vn^T) exp(G_i - G_j)), stored fp32 [rows, HV, BT] for chunk_bwd_dqkw_kernel.

    Computed once here instead of in each of dqkw's K-block programs (K / 64 of them), which also read it
    transposed from memory for dk: a transpose of a register tile that is a matrix-multiply result is what
    Triton 3.4-3.7.0 miscompiles on Hopper, so they used to compute the transposed product a second time.
    """
    i_t, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    _, t0, eos = chunk_coords(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dO vn^T (the gradient of Aqk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_ds += tl.dot(load_rows(do, t0, eos, i_hv, HV, V, o_v, BT), load_rows_t(vn, t0, eos, i_hv, HV, V, o_v, BT))
    b_G, _ = load_gates(G, t0, eos, i_hv, HV, BT)
    store_rows(dqk, decayed_causal(b_ds, b_G, scale, BT, False), t0, eos, i_hv, HV, BT, o_t, BT)


# dqkw was half of the backward's time (B4 T4096 H16 on an H100: 1.03 of 1.92 ms, at BV 64, 8 warps, 3 stages and
# 216 registers: one program per SM). With the epilogue's tiles freed early (below), ptxas (sm_90a, bf16) reports
# 130 registers at 8 warps; at 4 warps, BV 32 takes 235 and 53 KB, BV 64 with 2 stages 255 and 66 KB: two
# programs per SM, so one's epilogue overlaps the other's loads. fp32 inputs: 64-wide blocks at 3 stages need 213 KB
# of shared memory; the autotuner skips what exceeds the GPU's (OutOfResources).
DQKW_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                for bv, nw, ns in ((64, 8, 3), (32, 8, 3), (32, 4, 3), (64, 4, 2))]
# K > 128 (the 1.3b preset's 256) in 128-wide K blocks (dqkw_block_k): two programs per chunk and head where 64-wide
# blocks take four, each reading the chunk's do, vn and dvn tiles ([64, V] each, 192 KB at V = 512) once more. The
# kernel alone at B4 T4096 H6 K256 V512 (H200, bf16, session 15, each config forced alone): (64, 8, 3) 480 us against
# 529 for the best 64-wide one (64, 4, 2); (32, 4, 3) 517, (32, 8, 3) 586. (64, 4, 2) is left out: at 128-wide
# blocks it computed dq, dk and dG wrong (2e-2 relative; docs/KERNELS.md, "Miscompiles seen on the card"); so is
# (32, 4, 3): at the 1.3b preset its dk and dg bits changed from run to run (H200, session 26, 2 of 5 runs; as wy's
# 32-wide 4-warp builds, WY_CONFIGS).
DQKW_WIDE_CONFIGS = [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
                     for bv, nw, ns in ((64, 8, 3), (32, 8, 3))]


def dqkw_block_k(K: int, element_size: int) -> int:
    """dqkw's K block: 128 columns for 2-byte inputs with K > 128 (DQKW_WIDE_CONFIGS), else 64 (at most K's power
    of two). fp32 tiles take twice the shared memory, so fp32 inputs keep 64."""
    return 128 if K > 128 and element_size == 2 else min(_pow2(K), 64)


@triton.jit
def dqkw_kernel(q, k, vn, G, h, dh, do, dvn, dqk, dq, dk, dw, dG, cu_seqlens, chunk_indices, scale, ROWS,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, INTRA: tl.constexpr):
    """Per chunk, head and BK columns of K: dq, dk (state and intra-chunk terms), dw = -dvn S^T, and the part of
    dG that comes from o and the state update (partial over K blocks; summed by the wy kernel).

    The intra-chunk terms need d(q k^T) in both orientations. With INTRA (one K block: K <= BK) the program computes
    it from the do and vn tiles it loads anyway, as two products, dO vn^T and vn dO^T (no tile of a product is
    transposed: the Hopper miscompile, docs/KERNELS.md); with several K blocks each would compute it again, so it
    comes from dqk, the output of chunk_bwd_dqk_intra_kernel, read in both orientations.

    A flat grid with the K blocks, then the value heads, varying fastest: the K / BK programs of a chunk and head
    read the same dvn, do and vn tiles (V columns each), and side by side they find them in L2. With the chunks
    varying fastest (until session 10) they ran a whole wave apart: at K = 256, V = 512 (1.3b) each program's three
    [64, V] tiles are 192 KB, a wave of programs' about L2's size. On an H100 at the 1.3b shape (B4 T4096 H6) dqkw
    went from 0.91 to 0.60 ms with this order; at K = 64 (one K block) from 0.30 to 0.29.
    """
    NK = tl.cdiv(K, BK)
    i_p = tl.program_id(0).to(tl.int64)
    i_k, i_hv, i_t = i_p % NK, i_p // NK % HV, i_p // NK // HV
    i_h = i_hv // (HV // H)
    _, t0, eos = chunk_coords(cu_seqlens, chunk_indices, i_t, BT)
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = t0 + o_t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_h = (i_t * HV + i_hv) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # vn dS^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # dvn S^T
    b_dgl = tl.zeros([BK], dtype=tl.float32)  # <S, dS> partial
    if INTRA:
        b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dO vn^T (the gradient of Aqk)
        b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # its transpose, vn dO^T
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_hv = (o_v < V)[:, None] & m_k[None, :]
        b_ht = tl.load(h + p_h + o_k[None, :] * V + o_v[:, None], mask=m_hv, other=0.)  # [BV, BK]
        b_dht = tl.load(dh + p_h + o_k[None, :] * V + o_v[:, None], mask=m_hv, other=0.)
        # dw's product first. With it last, after dq's, which shares the operand b_ht, Triton 3.6 on an H100
        # computed dw wrong (7-19% relative error) and differently run to run; dq and dk were exact. The same
        # with 2 pipeline stages or the stores reordered; right with 1 stage (10-40% slower) and in this order
        # (docs/KERNELS.md, "Miscompiles seen on the card"). test_same_inputs_same_outputs and the bf16 budgets
        # guard it.
        b_dw += tl.dot(load_rows(dvn, t0, eos, i_hv, HV, V, o_v, BT), b_ht)
        b_do = load_rows(do, t0, eos, i_hv, HV, V, o_v, BT)
        b_dq += tl.dot(b_do, b_ht)
        b_vn = load_rows(vn, t0, eos, i_hv, HV, V, o_v, BT)
        b_dk += tl.dot(b_vn, b_dht)
        b_dgl += tl.sum(b_ht.to(tl.float32) * b_dht.to(tl.float32), axis=0)
        if INTRA:
            b_ds += tl.dot(b_do, load_rows_t(vn, t0, eos, i_hv, HV, V, o_v, BT))
            b_dst += tl.dot(b_vn, load_rows_t(do, t0, eos, i_hv, HV, V, o_v, BT))

    # The epilogue in an order that ends each [BT, BT] / [BT, BK] tile's life early (register pressure): dw,
    # then dq with d(q k^T), then dk with its transpose.
    store_rows(dw, -b_dw, t0, eos, i_hv, HV, K, o_k, BT)
    b_q = load_rows(q, t0, eos, i_h, H, K, o_k, BT)  # [BT, BK]
    b_k = load_rows(k, t0, eos, i_h, H, K, o_k, BT)
    b_G, b_Glast = load_gates(G, t0, eos, i_hv, HV, BT)
    i_last = tl.minimum(eos - t0, BT) - 1
    b_dq = b_dq * (scale * exp(b_G))[:, None]
    b_dk = b_dk * exp(tl.where(m_t, b_Glast - b_G, 0.))[:, None]
    b_sk = tl.sum(b_dk * b_k.to(tl.float32), axis=1)
    b_dG = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - b_sk
    b_dG += tl.where(o_t == i_last, tl.sum(b_sk) + exp(b_Glast) * tl.sum(b_dgl), 0.)
    # d(q k^T) of the intra-chunk attention (decayed_causal, as chunk_bwd_dqk_intra_kernel stores it), and its transpose
    if INTRA:
        b_dsg = decayed_causal(b_ds, b_G, scale, BT, False)
    else:
        b_dsg = load_rows(dqk, t0, eos, i_hv, HV, BT, o_t, BT)
    b_P = b_dsg * tl.dot(b_q, load_rows_t(k, t0, eos, i_h, H, K, o_k, BT))  # dAqk * Aqk (this K block)
    b_dG += tl.sum(b_P, axis=1) - tl.sum(b_P, axis=0)
    tl.store(dG + (i_k * ROWS + t0 + o_t) * HV + i_hv, b_dG, mask=m_t)
    store_rows(dq, b_dq + tl.dot(b_dsg.to(DT), b_k), t0, eos, i_hv, HV, K, o_k, BT)
    if INTRA:
        b_dstg = decayed_causal(b_dst, b_G, scale, BT, True)
    else:
        b_dstg = load_rows_t(dqk, t0, eos, i_hv, HV, BT, o_t, BT)
    store_rows(dk, b_dk + tl.dot(b_dstg.to(DT), b_q), t0, eos, i_hv, HV, K, o_k, BT)


# One kernel, two candidate lists: 64-wide K blocks and 128-wide ones (dqkw_block_k picks).
chunk_bwd_dqkw_kernel = triton.autotune(configs=configs(DQKW_CONFIGS), key=["H", "HV", "K", "V"])(dqkw_kernel)
chunk_bwd_dqkw_wide_kernel = triton.autotune(configs=configs(DQKW_WIDE_CONFIGS),
                                             key=["H", "HV", "K", "V"])(dqkw_kernel)


# wy was the backward's slowest kernel against fla's (H100, B16 T2048 H32 K128 V128: 1.99 ms against 1.04 for fla's
# counterpart) at 64-wide blocks, 8 warps, 196 registers: one program per SM, whose loads, products and barrier run
# one after another. At 4 warps two programs share an SM (kernel_resources.py, sm_90a bf16, K = V = 128: 64-wide at
# 2 stages 254 registers and 56 KB shared), so one's loads overlap the other's products. 64-wide at 4 warps and 3
# stages (session 24): 275 us at the 1.3b preset against 303 for the best before (H200, bf16, the kernel alone).
# No 32-wide blocks: at 4 warps (2 or 3 stages) their build gave other dg and dbeta bits from run to run at the small
# preset (H200, Triton 3.6, session 26: in 1-275 of 32768 rows, 21 of 28 runs; dk and dv equal; the 64-wide builds
# the same bits in 27 of 27), a race in the compiled code, since no kernel here uses atomics. They were small's
# choice, 386 us against 397 for 64-wide at 4 warps and 3 stages (session 24): 0.13 ms of a step.
# test_every_autotuned_configuration_same_bits_run_to_run guards it. The first config is the interpreter's (fp32
# tests); fp32 inputs at 64-wide blocks take 254 registers at K = V = 64.
# Capped at 168 registers a thread (maxnreg), a 4-warp build's registers fit three programs an SM instead of two
# (3 x 128 x 168 of 65536), where its shared memory does too (Triton 3.6 at the small preset: 57 KB at 3 stages;
# kernel_resources.py); it spills a little. Session 30 (H200, bf16, the model's gated inputs, each config forced
# alone): at the small preset (B8 T4096 H12 K64 V128) 3 stages 295 us against 341 uncapped; at 1.3b (B4 T4096 H6
# K256 V512) 218 against 214 uncapped. The capped 2-stage build was 1.3b's fastest (208 us), but it gave other dg
# and dbeta bits from run to run at the heads-of-128 layer (5 of 5 runs; test_every_autotuned_configuration_same_
# bits_run_to_run): left out. A cap of 128 (four programs) spilled too much: 441-455 us at small.
WY_CONFIGS = [triton.Config({"BK": b, "BV": b}, num_warps=nw, num_stages=ns, maxnreg=cap)
              for b, nw, ns, cap in ((64, 4, 3, None), (64, 4, 3, 168), (64, 8, 3, None))]


# dk arrives holding dqkw's part and leaves with wy's added: the autotuner restores it between its timed runs.
@triton.autotune(configs=configs(WY_CONFIGS), key=["H", "HV", "K", "V"], restore_value=["dk"])
@triton.jit
def chunk_bwd_wy_kernel(k, v, G, beta, Ai, dw, dvn, dk, dv, dG, g, A_log, dt_bias,
                        dg, dbeta, dgate, dA_scratch, cu_seqlens, chunk_indices, ROWS,
                        H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                        GATE_IN_KERNEL: tl.constexpr, BETA_SIGMOID: tl.constexpr, BETA_SCALE: tl.constexpr):
    """Per chunk and head: back through w = Ai (beta gamma k), u = Ai (beta v) and Ai = (I + A)^-1.

    Adds to dk, writes dv, dbeta and dg (the reverse within-chunk cumsum of dG), and per-chunk partial sums
    of dA_log and ddt_bias when the gate is fused (dgate, [chunks, 2, HV]: dA_log's, then ddt_bias's).
    dA_scratch: one fp32 [BT, BT] tile per program ([chunks, HV, BT, BT]), through which the gradient of A is
    transposed (transpose_via_scratch).
    """
    i_t, i_hv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_hv // (HV // H)
    _, t0, eos = chunk_coords(cu_seqlens, chunk_indices, i_t, BT)
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = t0 + o_t < eos
    r, c = o_t[:, None], o_t[None, :]
    p_tok = (t0 + o_t) * HV + i_hv

    b_AiT = load_rows_t(Ai, t0, eos, i_hv, HV, BT, o_t, BT)  # [BT, BT]
    b_G, _ = load_gates(G, t0, eos, i_hv, HV, BT)
    b_beta = tl.load(beta + p_tok, mask=m_t, other=0.)
    b_gamma = exp(b_G)
    b_bg = b_beta * b_gamma
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)  # dL/dAi
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_v = load_rows(v, t0, eos, i_hv, HV, V, o_v, BT)  # [BT, BV]
        b_dvn = load_rows(dvn, t0, eos, i_hv, HV, V, o_v, BT)
        b_vt = load_rows_t(v, t0, eos, i_hv, HV, V, o_v, BT)  # [BV, BT]
        b_dT += tl.dot(b_dvn, (b_vt * b_beta[None, :]).to(DT))
        b_du = tl.dot(b_AiT, b_dvn)  # [BT, BV], d(beta v)
        store_rows(dv, b_du * b_beta[:, None], t0, eos, i_hv, HV, V, o_v, BT)
        b_dbeta += tl.sum(b_du * b_v.to(tl.float32), axis=1)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, t0, eos, i_h, H, K, o_k, BT)  # [BT, BK]
        b_kt = load_rows_t(k, t0, eos, i_h, H, K, o_k, BT)  # [BK, BT]
        b_dw = load_rows(dw, t0, eos, i_hv, HV, K, o_k, BT)
        b_dT += tl.dot(b_dw, (b_kt * b_bg[None, :]).to(DT))
        b_kk += tl.dot(b_k, b_kt)
    # dA = -Ai^T dAi Ai^T on the strict lower triangle
    b_dA = -tl.dot(tl.dot(b_AiT, b_dT.to(DT)).to(DT), b_AiT)
    b_dA = tl.where(r > c, b_dA * exp(tl.where(r > c, b_G[:, None] - b_G[None, :], 0.)), 0.)
    b_dAb = b_dA * b_beta[:, None]  # d(k_i . k_j) from A_ij, i > j
    # d(k k^T) takes both orientations (k_i . k_j = k_j . k_i). The transpose is added in fp32 before the one
    # rounding of the product that takes it, so the scratch tile holds fp32.
    p_scratch = dA_scratch + (i_t * HV + i_hv) * BT * BT
    b_M = b_dAb + transpose_via_scratch(b_dAb, p_scratch, BT)
    b_dbeta += tl.sum(b_dA * b_kk, axis=1)
    b_P = b_dA * b_kk * b_beta[:, None]  # dA * A
    b_dG += tl.sum(b_P, axis=1) - tl.sum(b_P, axis=0)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = load_rows(k, t0, eos, i_h, H, K, o_k, BT)
        b_dkb = tl.dot(b_AiT, load_rows(dw, t0, eos, i_hv, HV, K, o_k, BT))  # d(beta gamma k)
        b_dk = load_rows(dk, t0, eos, i_hv, HV, K, o_k, BT) + b_dkb * b_bg[:, None] + tl.dot(b_M.to(DT), b_k)
        store_rows(dk, b_dk, t0, eos, i_hv, HV, K, o_k, BT)
        b_s = tl.sum(b_dkb * b_k.to(tl.float32), axis=1)
        b_dbeta += b_s * b_gamma
        b_dG += b_s * b_bg

    for i_k in range(NK):
        b_dG += tl.load(dG + i_k * ROWS * HV + p_tok, mask=m_t, other=0.)
    b_dG = tl.where(m_t, b_dG, 0.)
    b_dg = tl.sum(b_dG, axis=0) - tl.cumsum(b_dG, axis=0) + b_dG  # sum over the rows at and after each row
    if GATE_IN_KERNEL:
        b_x = tl.load(g + p_tok, mask=m_t, other=0.).to(tl.float32) + tl.load(dt_bias + i_hv).to(tl.float32)
        b_a = exp(tl.load(A_log + i_hv).to(tl.float32))
        tl.store(dgate + i_t * 2 * HV + i_hv, tl.sum(tl.where(m_t, -b_a * softplus(b_x) * b_dg, 0.)))
        b_dg = tl.where(m_t, -b_a * sigmoid(b_x) * b_dg, 0.)
        tl.store(dgate + (i_t * 2 + 1) * HV + i_hv, tl.sum(b_dg))
    tl.store(dg + p_tok, b_dg.to(dg.dtype.element_ty), mask=m_t)
    if BETA_SIGMOID:
        b_dbeta = b_dbeta * b_beta * (1. - b_beta / BETA_SCALE)
    tl.store(dbeta + p_tok, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def _pow2(n: int, least: int = 16) -> int:
    return max(triton.next_power_of_2(n), least)


def _intra(q, k, v, g, beta, A_log, dt_bias, scale, cu_seqlens, chunk_indices, gate_in_kernel, beta_scale):
    """Launch chunk_intra_kernel on packed [rows, heads, dim] inputs: (G, beta, Ai, Aqk, u)."""
    rows, H, K = k.shape
    HV, V = v.shape[1:]
    dev = k.device
    G = torch.empty(rows, HV, dtype=torch.float32, device=dev)
    beta_f = torch.empty_like(G)
    Ai = torch.empty(rows, HV, CHUNK, dtype=k.dtype, device=dev)
    Aqk = torch.empty(rows, HV, CHUNK, dtype=k.dtype, device=dev)
    u = torch.empty(rows, HV, V, dtype=k.dtype, device=dev)
    chunk_intra_kernel[(len(chunk_indices), HV)](
        q, k, v, g, beta, A_log if gate_in_kernel else G, dt_bias if gate_in_kernel else G, G, beta_f, Ai, Aqk, u,
        cu_seqlens, chunk_indices, scale, H=H, HV=HV, K=K, V=V, BT=CHUNK, BC=SUB_CHUNK, BK=min(_pow2(K), 64),
        GATE_IN_KERNEL=gate_in_kernel, BETA_SIGMOID=beta_scale is not None, BETA_SCALE=beta_scale or 1.0,
        PRECISION=merge_precision(k.dtype))
    return G, beta_f, Ai, Aqk, u


def _scan_fwd(q, k, Ai, beta, u, G, Aqk, h0, cu_seqlens, chunk_offsets, num_chunks, scale, output_final_state,
              store_o, store_states):
    """The forward scan: o (store_o), the per-chunk states h and vn (store_states), and the final state; each None
    when not asked for."""
    rows, H, K = k.shape
    HV, V = u.shape[1:]
    N = len(cu_seqlens) - 1
    dev = k.device
    o = h = vn = None
    if store_o:
        o = torch.empty(rows, HV, V, dtype=k.dtype, device=dev)
    if store_states:
        h = torch.empty(num_chunks, HV, K, V, dtype=k.dtype, device=dev)
        vn = torch.empty(rows, HV, V, dtype=k.dtype, device=dev)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]) * N * HV,)  # noqa: E731
    chunk_scan_fwd_kernel[grid](
        q, k, Ai, beta, u, G, Aqk, h0 if h0 is not None else G, o if o is not None else G, ht if ht is not None else G,
        h if h is not None else G, vn if vn is not None else G, cu_seqlens, chunk_offsets, scale,
        triton.next_power_of_2(N * HV), H=H, HV=HV, K=K, V=V, BT=CHUNK, BK=_pow2(K),
        USE_H0=h0 is not None, STORE_HT=output_final_state, STORE_O=store_o, STORE_STATES=store_states)
    return o, h, vn, ht


def _o(q, h, vn, G, Aqk, scale, cu_seqlens, chunk_indices):
    """Launch chunk_o_kernel: o from the per-chunk states h and vn of the scan (the split forward)."""
    rows, H, K = q.shape
    HV, V = vn.shape[1:]
    o = torch.empty(rows, HV, V, dtype=q.dtype, device=q.device)
    grid = lambda meta: (len(chunk_indices) * HV * triton.cdiv(V, meta["BV"]),)  # noqa: E731
    chunk_o_kernel[grid](q, h, vn, G, Aqk, o, cu_seqlens, chunk_indices, scale, H=H, HV=HV, K=K, V=V, BT=CHUNK)
    return o


def split_o(num_seqs: int, HV: int, K: int, V: int, sms: int) -> bool:
    """Whether the forward stores the per-chunk states and computes o in chunk_o_kernel (the split path)
    rather than inside the scan (the fused path, which stores the states too when they are kept for the backward).
    Tests replace this function to force either path.

    The fused scan computes q S and Aqk vn, and loads q and Aqk, inside its sequential pass over the chunks. With enough
    programs to keep the SMs busy, that work overlaps other programs' and the fused path saves the o kernel's reading
    the states (K V / 64 values per token and head) and q and Aqk again. With few programs the SMs idle and the time is
    the chain of chunk steps of one program; the split path shortens each step and computes o with every chunk in
    parallel. Measured on an H100 (132 SMs; K = V = 128; programs counted with 64-wide V blocks, N x HV x V / 64), fused
    scan against states scan + o kernel, ms: 32 programs (B1 T8192 H16) 0.274 / 0.275, 32 (B1 T32768 H16) 1.069 / 1.038,
    64 (B2 T4096 H16) 0.202 / 0.193, 64 (B1 T32768 H32) 1.486 / 1.400, 128 (B4 T4096 H16) 0.247 / 0.323, 256 (B8 T2048
    H16) 0.244 / 0.322. So: split up to half as many programs as SMs.

    K > 128 splits whatever the count: the fused scan holds q's [64, K] tile too, so at K = 256 only its 16-wide
    V blocks fit shared memory (bf16: 223 KB, one program per SM; 32-wide: 234 KB, over Hopper's 227), and every
    16 columns reload q and k; B8 T2048 H6 K256 V512 (384 programs by the count above): fused 1.00 ms, split
    0.36 + 0.23 (H100). The states-only scan fits 64-wide blocks at K = 256 (189 KB; kernel_resources.py). These
    are the scans that read w; without it (session 14) the fused scan fits 32-wide blocks at K = 256 (189 KB),
    and this rule has not been measured again.
    """
    return num_seqs * HV * triton.cdiv(V, 64) <= sms // 2 or K > 128


def _scan_bwd(q, k, Ai, beta, G, Aqk, do, dht, cu_seqlens, chunk_offsets, num_chunks, scale, need_dh0):
    rows, H, K = k.shape
    HV, V = do.shape[1:]
    N = len(cu_seqlens) - 1
    dev = k.device
    dh = torch.empty(num_chunks, HV, K, V, dtype=k.dtype, device=dev)
    dvn = torch.empty(rows, HV, V, dtype=k.dtype, device=dev)
    dh0 = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev) if need_dh0 else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]) * N * HV,)  # noqa: E731
    chunk_scan_bwd_kernel[grid](
        q, k, Ai, beta, G, Aqk, do, dht if dht is not None else G, dh0 if dh0 is not None else G, dh, dvn,
        cu_seqlens, chunk_offsets, scale, triton.next_power_of_2(N * HV), H=H, HV=HV, K=K, V=V, BT=CHUNK,
        BK=_pow2(K), USE_DHT=dht is not None, STORE_DH0=need_dh0)
    return dh, dvn, dh0


# The forward keeps the per-chunk states (and vn) for the backward when they take at most this many bytes, so the
# backward need not run the forward scan again; beyond, the backward recomputes them. They take K V / 64 values per
# token and value head (the 1.3b preset, K = 256, V = 512: 0.4 GB per layer at 4 x 4096 tokens, 6.4 GB at 256K, where
# memory is what limits). 0 always recomputes (the memory of fla's backward); tests force either.
KEEP_STATES_MAX_BYTES = 2 << 30


def keep_states(num_chunks: int, HV: int, K: int, V: int, element_size: int) -> bool:
    return num_chunks * HV * K * V * element_size <= KEEP_STATES_MAX_BYTES


def chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, tables, A_log=None,
              dt_bias=None, beta_scale=None, need_grad=False):
    """Forward on packed inputs (q, k: [rows, H, K]; v: [rows, HV, V]; g, beta: [rows, HV]), with
    tables = triton_utils.chunk_tables(cu_seqlens).

    Returns (o, ht, saved): saved = (G, beta, Ai, Aqk, u, h, vn) is what the backward reuses instead of
    recomputing. With need_grad and states within KEEP_STATES_MAX_BYTES, the scan stores the per-chunk states h and
    vn, which the forward keeps (u, which only served to compute vn, is dropped: None); otherwise h and vn are None
    and the backward recomputes them from u.

    Kept states are stored by whichever scan split_o picks: the fused one computes o as well, the split one leaves
    it to chunk_o_kernel. Until session 30 kept states always took the split path; the fused scan storing them too
    (H200, bf16, forward+backward chunk kernels with the L2 norm, min of 3 rounds) took the small preset's heads
    (B8 T4096 H12 K64 V128) from 1536 to 1528 us, B8 T4096 H16 K64 V128 from 2029 to 1964, B4 T4096 H16 K128
    V128 from 1737 to 1729: its scan (230 us at small) costs less than the states scan and o kernel (138 + 101).
    """
    chunk_indices, chunk_offsets = tables
    num_chunks = len(chunk_indices)
    G, beta_f, Ai, Aqk, u = _intra(q, k, v, g, beta, A_log, dt_bias, scale, cu_seqlens, chunk_indices,
                                      A_log is not None, beta_scale)
    HV, V = v.shape[1:]
    K = k.shape[2]
    keep = need_grad and keep_states(num_chunks, HV, K, V, k.element_size())
    split = split_o(len(cu_seqlens) - 1, HV, K, V, sm_count(k.device))
    # The scan stores vn, which it computes anyway, rather than the o kernel recomputing it as u - w S: that would
    # read k (as large as q) in every V block and add a product as large as q S, where storing vn costs one write
    # and one read of a tensor the size of u.
    o, h, vn, ht = _scan_fwd(q, k, Ai, beta_f, u, G, Aqk, initial_state, cu_seqlens, chunk_offsets, num_chunks,
                             scale, output_final_state, store_o=not split, store_states=keep or split)
    if split:
        o = _o(q, h, vn, G, Aqk, scale, cu_seqlens, chunk_indices)
    if keep:
        return o, ht, (G, beta_f, Ai, Aqk, None, h, vn)
    return o, ht, (G, beta_f, Ai, Aqk, u, None, None)


def chunk_bwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, tables, do, dht, saved, A_log=None, dt_bias=None,
              beta_scale=None):
    """Backward on packed inputs, from the forward's saved (G, beta, Ai, Aqk, u, h, vn) (chunk_fwd): the states
    h and vn (recomputed from u when the forward did not keep them), then the reverse scan, dqkw and wy.

    Returns dq, dk ([rows, HV, K] per value head; bf16 for bf16 inputs, else fp32), dv, dg, dbeta, dh0, dA_log,
    ddt_bias.
    """
    chunk_indices, chunk_offsets = tables
    num_chunks = len(chunk_indices)
    rows, H, K = k.shape
    HV, V = v.shape[1:]
    gate = A_log is not None
    G, beta_f, Ai, Aqk, u, h, vn = saved
    if h is None:
        _, h, vn, _ = _scan_fwd(q, k, Ai, beta_f, u, G, Aqk, initial_state, cu_seqlens, chunk_offsets, num_chunks,
                                scale, False, store_o=False, store_states=True)
    # fp32 tiles take twice the shared memory: 32-wide V blocks for fp32 inputs in dqk_intra (dqkw and wy autotune)
    wide = 64 if k.element_size() == 2 else 32
    BK, BV = dqkw_block_k(K, k.element_size()), min(_pow2(V), wide)
    NK = triton.cdiv(K, BK)
    dev = k.device
    # One K block computes d(q k^T) inside dqkw (INTRA); several read it from dqk_intra, once per chunk and head.
    # At K = 64 (B8 T4096 H12 V128, the small preset) dqk_intra took 0.11 of the 0.49 ms the two took, and the
    # small --cuda-graph step lost 2.5 ms with INTRA (H100, session 12).
    intra = NK == 1
    # dqk_intra needs nothing from the reverse scan, so on a GPU it runs beside it, on a side stream launched
    # after the scan: the scan is a chain of chunk steps with one program per SM (at `1.3b` 192 programs, two
    # waves, the second on 60 of 132 SMs), and dqk_intra's short programs take the SMs it leaves idle. The op's
    # forward+backward at that shape (H200, session 19, CUDA events): 2209-2213 -> 2166-2171 us a layer.
    side = side_stream(dev) if not intra and dev.type == "cuda" else None
    dqk = G  # unread with INTRA
    if not intra:
        dqk = torch.empty(rows, HV, CHUNK, dtype=torch.float32, device=dev)
    if side is not None:
        # Recorded after dqk's allocation: whatever an allocation enqueues on this stream must come before the side
        # stream's writes (the GPU tests' torch.empty fills each tensor with NaN; recorded before it, that fill
        # could land after dqk_intra's results).
        inputs_ready = torch.cuda.Event()
        inputs_ready.record(torch.cuda.current_stream(dev))
    dh, dvn, dh0 = _scan_bwd(q, k, Ai, beta_f, G, Aqk, do, dht, cu_seqlens, chunk_offsets, num_chunks, scale,
                             initial_state is not None)
    # dq and dk are summed in fp32 inside each kernel but stored in bf16 for bf16 inputs: dqkw writes both, wy reads
    # dk and writes it back with its part added, the L2 norm's backward (or the sum over value heads) reads both,
    # so fp32 cost 8 more bytes per element and value head (fla stores them in bf16 too). fp16 inputs keep fp32:
    # before the L2 norm's backward dk is the final gradient times |k|, which can leave fp16's range where the
    # final one does not.
    dq = torch.empty(rows, HV, K, dtype=torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32, device=dev)
    dk = torch.empty_like(dq)
    dw = torch.empty(rows, HV, K, dtype=k.dtype, device=dev)  # wy reads it as a matrix operand: in k's dtype
    dG = torch.empty(NK, rows, HV, dtype=torch.float32, device=dev)
    if not intra:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                side.wait_event(inputs_ready)
            chunk_bwd_dqk_intra_kernel[(num_chunks, HV)](
                vn, do, G, dqk, cu_seqlens, chunk_indices, scale, HV=HV, V=V, BT=CHUNK, BV=BV,
                num_warps=CHUNK_WARPS)
        if side is not None:
            # dqk and the inputs belong to this stream and live past this join: their memory cannot be handed out
            # again while the side stream still uses it
            torch.cuda.current_stream(dev).wait_stream(side)
    dqkw = chunk_bwd_dqkw_wide_kernel if BK == 128 else chunk_bwd_dqkw_kernel
    dqkw[(num_chunks * NK * HV,)](
        q, k, vn, G, h, dh, do, dvn, dqk, dq, dk, dw, dG, cu_seqlens, chunk_indices, scale, rows,
        H=H, HV=HV, K=K, V=V, BT=CHUNK, BK=BK, INTRA=intra)
    del h, dh, vn, dqk  # the per-chunk states and their gradients (K x V per chunk and head) are done with
    dv = torch.empty_like(v)
    dg = torch.empty(rows, HV, dtype=g.dtype, device=dev)
    dbeta = torch.empty(rows, HV, dtype=beta.dtype, device=dev)
    dgate = torch.empty(num_chunks, 2, HV, dtype=torch.float32, device=dev) if gate else G
    dA_scratch = torch.empty(num_chunks, HV, CHUNK, CHUNK, dtype=torch.float32, device=dev)
    chunk_bwd_wy_kernel[(num_chunks, HV)](
        k, v, G, beta_f, Ai, dw, dvn, dk, dv, dG, g, A_log if gate else G, dt_bias if gate else G,
        dg, dbeta, dgate, dA_scratch, cu_seqlens, chunk_indices, rows,
        H=H, HV=HV, K=K, V=V, BT=CHUNK, NK=NK, GATE_IN_KERNEL=gate, BETA_SIGMOID=beta_scale is not None,
        BETA_SCALE=beta_scale or 1.0)
    dA_log = ddt_bias = None
    if gate:
        # rows 16 bytes apart: the fused AdamW kernel takes 16-byte aligned gradients (the optimizer falls back to
        # torch's slower fused step for any other)
        sums = torch.empty(2, triton.cdiv(HV, 4) * 4, dtype=torch.float32, device=dev)[:, :HV]
        dA_log, ddt_bias = sum_partials(dgate, sums)
        dA_log, ddt_bias = dA_log.to(A_log.dtype), ddt_bias.to(dt_bias.dtype)
    return dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Autograd over chunk_fwd / chunk_bwd, with the optional in-kernel q/k L2 norm, gate and beta sigmoid.

    Saves the (normalised) inputs and, from the forward, G, beta, the inverse Ai and Aqk (BT values per token and
    value head each), and either the per-chunk states with vn (chunk_fwd: within KEEP_STATES_MAX_BYTES) or u
    (V per token and value head), from which the backward recomputes them. Keeping Aqk (and, until session 14,
    w, which the scans no longer read) saves the backward computing them again, which read q, k, v and Ai again
    (H100, B16 T2048 H32 K128 V128: 0.69 ms of a 10.0 ms forward+backward, as a kernel of its own); keeping the
    states saves it the forward scan.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm, A_log, dt_bias, beta_scale):
        B, T, H, K = q.shape
        HV, V = v.shape[2:]
        q, k, v = (x.reshape(B * T, x.shape[2], x.shape[3]).contiguous() for x in (q, k, v))
        g, beta = (x.reshape(B * T, HV).contiguous() for x in (g, beta))
        q_rstd = k_rstd = None
        if use_qk_l2norm:
            q, q_rstd = l2norm_fwd(q)
            k, k_rstd = l2norm_fwd(k)
        cu = cu_seqlens_int32(cu_seqlens, B, T, q.device)
        tables = chunk_tables(cu, dense=(B, T) if cu_seqlens is None else None)
        h0 = initial_state.contiguous() if initial_state is not None else None
        o, ht, saved = chunk_fwd(q, k, v, g, beta, scale, h0, output_final_state, cu, tables, A_log, dt_bias,
                                 beta_scale, need_grad=any(ctx.needs_input_grad))
        ctx.save_for_backward(q, k, v, g, beta, h0, cu, q_rstd, k_rstd, A_log, dt_bias, *saved)
        ctx.meta = (B, T, scale, beta_scale, tables)  # the tables: integer constants, cached by value
        return o.reshape(B, T, HV, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, cu, q_rstd, k_rstd, A_log, dt_bias, *saved = ctx.saved_tensors
        B, T, scale, beta_scale, tables = ctx.meta
        rows, H, K = q.shape
        HV, V = v.shape[1:]
        do = do.reshape(rows, HV, V).contiguous().to(v.dtype)
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = chunk_bwd(
            q, k, v, g, beta, scale, h0, cu, tables, do, dht, saved, A_log, dt_bias, beta_scale)
        if HV != H:  # value heads of one q/k head share its gradient
            dq = dq.view(rows, H, HV // H, K).sum(2)
            dk = dk.view(rows, H, HV // H, K).sum(2)
        if q_rstd is not None:
            dq = l2norm_bwd(q, q_rstd, dq, q.dtype)
            dk = l2norm_bwd(k, k_rstd, dk, k.dtype)
        dq, dk = dq.to(q.dtype).view(B, T, H, K), dk.to(k.dtype).view(B, T, H, K)
        return (dq, dk, dv.view(B, T, HV, V), dg.view(B, T, HV), dbeta.view(B, T, HV), None, dh0, None, None,
                None, dA_log, ddt_bias, None)


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                  cu_seqlens=None, use_qk_l2norm_in_kernel=False, A_log=None, dt_bias=None,
                                  beta_scale=None):
    """The Triton chunked op. g is the log decay, or the raw gate logits when A_log and dt_bias are given;
    beta is beta, or its logits when beta_scale is given (beta = beta_scale * sigmoid(logits))."""
    return ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state,
                                             cu_seqlens, use_qk_l2norm_in_kernel, A_log, dt_bias, beta_scale)
