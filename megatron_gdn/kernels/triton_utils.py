"""Helpers shared by the Triton kernels: interpreter detection, chunk bookkeeping, tile loads, stores, transposes.

Whether Triton runs kernels compiled or in its interpreter is decided when ``@triton.jit`` decorates a
function, from the environment variable TRITON_INTERPRET. The kernel modules are therefore imported lazily
(by ``megatron_gdn.kernels``) on the first Triton call, and ``INTERPRET`` below records the mode they got.

Every kernel sees its inputs packed: the rows of all sequences one after the other ([B * T, heads, dim],
which is the memory layout of a contiguous [B, T, heads, dim] tensor), with ``cu_seqlens`` marking the
sequences. Dense batches get ``cu_seqlens = [0, T, 2T, ...]``, so one code path serves both.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Read the way triton.jit reads it (Triton >= 3.4 through its knobs, older versions from the environment).
try:
    from triton import knobs
    INTERPRET: bool = bool(knobs.runtime.interpret)
except ImportError:  # pragma: no cover - Triton < 3.4
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Chunk length of the chunked algorithm (the tile height of every chunk kernel).
CHUNK = 64


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotuning candidates; the interpreter gets only the first (timing it would be meaningless)."""
    return candidates[:1] if INTERPRET else candidates


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100 / H200's) elsewhere, so that the interpreter
    takes the path such a GPU would."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second CUDA stream of the device, for a kernel that runs beside another (chunk_bwd's dqk_intra beside
    the reverse scan); one per device. Usable in CUDA-graph capture: work on it joins the capture through an
    event of the capturing stream and rejoins it before the capture ends."""
    return torch.cuda.Stream(device)


def row_loop_programs(blocks: int, device: torch.device, per_sm: int) -> int:
    """Programs of a kernel that loops over `blocks` row blocks (the norms' backward, each program summing its
    part of the weight gradient in registers): at most per_sm a streaming multiprocessor, at least one."""
    return max(1, min(blocks, sm_count(device) * per_sm))


@functools.lru_cache(maxsize=64)
def dense_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """[0, T, 2T, ..., BT] int32: a dense batch seen as packed sequences (cached: decoding calls this per token)."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def cu_seqlens_int32(cu_seqlens: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """The kernels' int32 cu_seqlens: the given one, or the dense batch's."""
    if cu_seqlens is None:
        return dense_cu_seqlens(batch, seqlen, device)
    return cu_seqlens.to(torch.int32)


@functools.lru_cache(maxsize=64)
def _chunk_tables(bounds: tuple[int, ...], chunk: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts = [-(-(b - a) // chunk) for a, b in zip(bounds[:-1], bounds[1:])]
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    indices = [(n, c) for n, count in enumerate(counts) for c in range(count)]
    chunk_indices = torch.tensor(indices or [(0, 0)], dtype=torch.int32).reshape(-1, 2)[: len(indices)]
    return chunk_indices.to(device), torch.tensor(offsets, dtype=torch.int32, device=device)


def chunk_tables(cu_seqlens: torch.Tensor, dense: tuple[int, int] | None = None,
                 chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_indices [NT, 2] int32: (sequence, chunk within it); chunk_offsets [N + 1] int32).

    Chunks never straddle two sequences. The tables are cached by the offsets' values. Packed documents cost one
    host sync to read cu_seqlens; dense=(B, T) says the batch is dense, whose offsets the host knows, so the call
    does not wait for the GPU (a sync per layer would stop the host from queueing kernels ahead of the GPU).
    """
    bounds = tuple(i * dense[1] for i in range(dense[0] + 1)) if dense else tuple(cu_seqlens.tolist())
    return _chunk_tables(bounds, chunk, str(cu_seqlens.device))


@triton.jit
def load_rows(ptr, t0, eos, i_h, NH: tl.constexpr, D: tl.constexpr, o_d, BT: tl.constexpr):
    """The [BT, len(o_d)] tile of rows t0.. of a [rows, NH, D] tensor at head i_h; zero past eos and D."""
    o_t = t0 + tl.arange(0, BT)
    m = (o_t < eos)[:, None] & (o_d < D)[None, :]
    return tl.load(ptr + (o_t[:, None] * NH + i_h) * D + o_d[None, :], mask=m, other=0.)


@triton.jit
def load_rows_t(ptr, t0, eos, i_h, NH: tl.constexpr, D: tl.constexpr, o_d, BT: tl.constexpr):
    """The transpose of load_rows, [len(o_d), BT], read straight from memory (no tl.trans of a register tile,
    which Triton 3.4-3.7.0 miscompiles on Hopper when the tile is a matrix-multiply result)."""
    o_t = t0 + tl.arange(0, BT)
    m = (o_d < D)[:, None] & (o_t < eos)[None, :]
    return tl.load(ptr + (o_t[None, :] * NH + i_h) * D + o_d[:, None], mask=m, other=0.)


@triton.jit
def transpose_via_scratch(tile, scratch, BT: tl.constexpr):
    """The transpose of a [BT, BT] register tile, read back from a [BT, BT] tile of global memory at ``scratch``.

    Why not tl.trans: Triton 3.4-3.7.0 miscompiles tl.trans of a matrix-multiply result on Hopper, and the
    tiles the kernels transpose are (elementwise functions of) such results. So the tile is stored row-major in the
    scratch dtype (which is where it is rounded, if it is narrower than the tile), every thread of the program
    waits at the barrier (a bar.sync of the whole block, which also makes the other threads' stores visible),
    and the tile is read back with transposed offsets, as load_rows_t reads one. Written and read at once, the
    scratch tile is served from L2. Each program needs its own scratch tile, and uses it once: a second store
    to it could overwrite values that other threads have not read yet.
    """
    o = tl.arange(0, BT)
    tl.store(scratch + o[:, None] * BT + o[None, :], tile.to(scratch.dtype.element_ty))
    tl.debug_barrier()
    return tl.load(scratch + o[None, :] * BT + o[:, None])


@triton.jit
def store_rows(ptr, value, t0, eos, i_h, NH: tl.constexpr, D: tl.constexpr, o_d, BT: tl.constexpr):
    """Store a [BT, len(o_d)] tile into rows t0.. of a [rows, NH, D] tensor, skipping rows past eos."""
    o_t = t0 + tl.arange(0, BT)
    m = (o_t < eos)[:, None] & (o_d < D)[None, :]
    tl.store(ptr + (o_t[:, None] * NH + i_h) * D + o_d[None, :], value.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def chunk_coords(cu_seqlens, chunk_indices, i_t, BT: tl.constexpr):
    """(sequence, first row of the chunk, end row of its sequence) of global chunk i_t, all int64."""
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return i_n, bos + i_c * BT, eos


@triton.jit
def load_gates(G, t0, eos, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    """(G of rows t0.., G of the chunk's last row) from the [rows, HV] cumulative log decay.

    Rows past eos repeat the last value, as the cumsum would: then G_i - G_j <= 0 for every i >= j of the
    tile, padded rows included, so no masked exponent can overflow.
    """
    o_t = tl.arange(0, BT)
    b_Glast = tl.load(G + (tl.minimum(eos, t0 + BT) - 1) * HV + i_hv)
    b_G = tl.load(G + (t0 + o_t) * HV + i_hv, mask=t0 + o_t < eos, other=0.)
    return tl.where(t0 + o_t < eos, b_G, b_Glast), b_Glast


# INTERPRET for @triton.jit code, which reads module globals only as constexprs: libdevice exists compiled only.
COMPILED = tl.constexpr(not INTERPRET)


@triton.jit
def exp(x):
    """e^x of fp32 x as tl.exp compiles it (ex2.approx of x log2(e)), without the range check and fix-ups around
    it for results below 2^-126 (3 of its 5 instructions an element): libdevice's fast form, which flushes those
    subnormal results to zero; every other result is the same. Compiled for sm_90 (Triton 3.9, session 23) the
    chunk kernels' code shrinks by 4-10% (chunk_intra), 6-13% (chunk_bwd_wy) and 7-19% (dqkw) at heads of 64;
    fla 0.6.0's compiled chunk kernels (the H200's Triton cache) have no such checks either. Triton's interpreter
    has no libdevice: there it is tl.exp."""
    if COMPILED:
        return libdevice.fast_expf(x)
    else:
        return tl.exp(x)


@triton.jit
def softplus(x):
    # log(1 + e^x), linear above 20 like torch.nn.functional.softplus (its exp would overflow).
    return tl.where(x > 20., x, tl.log(1. + exp(tl.minimum(x, 20.))))


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x) in fp32 from the approximate exp2 and division with subnormals flushed (libdevice's fast
    forms: 5 instructions an element, 2 of them special-function ones). tl.sigmoid compiles to 11, the exp and the
    division each wrapped in range checks and fix-ups that only matter for subnormal values; in the short
    convolution's backward that was 6 of its 47 instructions an element (SASS for sm_90). The fast forms err by
    about 2 ulp. Triton's interpreter has no libdevice: there it is tl.sigmoid."""
    if COMPILED:
        return libdevice.fast_dividef(1., 1. + exp(-x))
    else:
        return tl.sigmoid(x)
