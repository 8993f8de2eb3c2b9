"""Triton SiLU + depthwise 3x3 + GLU gate in one pass; the semantics are `glu_conv_ref` in glu_conv.py.

Unfused, the FFN's middle reads and writes its (N, 2C) activation several times (SiLU, the convolution, and the
layout copies around it, then the gate), about 2.3 GB a block for a 10-latent-frame chunk at 480p. Here a program
owns a strip of one frame (BLOCK_X columns x ROWS rows) for a block of C output channels (and their C gate channels)
and sweeps it top to bottom: each input row is read once from memory (its left and right neighbours again, from L1),
SiLU'd, and weighed by the three kernel rows at once, into the three output rows it touches; the row above it is
then complete, gated and written. The two rolling accumulators stay in fp32 registers, so the input is read once and
the output written once: about 0.63 GB a block. A program's rows follow one another, so the loop can be
software-pipelined (`num_stages`: the next row's loads in flight while one is weighed). An earlier version read
each pixel's 9 neighbours per output tile, 9 reads of every input row from cache, and was slower than the unfused
code (1.37 against 0.75 ms, H200).

Each input element is weighed by three column taps. Without `gather` the row is loaded three times, shifted by a
column each way (from L1), and SiLU'd each time (the default: the faster on the H200); `gather` loads and SiLUs it
once and takes the shifted copies from the registers of neighbouring lanes (tl.gather along the columns, warp
shuffles on sm_90: ptxas shows no shared memory), a third of the special-function work. A tile's edge columns then
lack a neighbour, so gathering strips overlap by two columns and write only their inner ones.

The taps come as (9, 2C), a tap's channels side by side, so that a tap is one vector copy per thread (as (2C, 9)
they were a 2-byte load per channel and tap). Rows loaded through a Hopper TMA descriptor instead of pointers were
tried (2026-12-07, H100): no faster (692 against 653 us a block at the best settings of each), so the loads are
plain pointer loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common


@dataclass
class GluConvConfig:
    """Tiling: the fastest measured on the H200 (Triton 3.6), 633.6 us a block against 746.7 us for the reference
    compiled by inductor (benchmarks/RESULTS.md, 2026-12-07). benchmarks/kernels.py --sweep tunes it on a GPU."""
    block_x: int = 64  # columns per strip: a whole 52-pixel row at 480p, so no column is read by two programs
    block_c: int = 32  # output channels per program
    rows: int = 32  # output rows per strip: a whole 30-row frame at 480p; fewer give more, shorter programs
    num_warps: int = 4  # 16 elements of a tile per thread. Triton 3.9's ptxas spills 24-80 bytes a thread here (0
    # at 8 warps), yet under Triton 3.6 on the H200 8 warps took 856.5 us a block against 633.6
    num_stages: int = 1  # >1: the row loop software-pipelined (the next row's loads in flight while one is weighed);
    # on the H200 two stages took 1095.9 us a block against 856.5 with one (8 warps)
    tanh_silu: bool = True  # SiLU through the GPU's tanh.approx: one special-function op instead of exp and a
    # reciprocal; GPUs only (the interpreter runs exp)
    gather: bool = False  # SiLU each input element once and take its left and right neighbours from registers
    # (tl.gather along the columns) instead of loading and SiLU-ing them again; strips then overlap by 2 columns. On
    # the H200 it took 1113.0 us a block against 856.5 without (8 warps)


CONFIG = GluConvConfig()


@triton.jit
def _silu(x, TANH: tl.constexpr = False):
    if TANH:  # x * sigmoid(x), sigmoid(x) = (1 + tanh(x / 2)) / 2
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * x * (1.0 + t)
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _load_row(h_frame, r, x, half, c0, H, W, C, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input row r of this frame, columns x .. x + BLOCK_X - 1, channels c0 .. c0 + BLOCK_C - 1 of half `half`
    (0: a, 1: its gate g), zero outside the frame (the convolution's padding: SiLU(0) = 0)."""
    xs = x + tl.arange(0, BLOCK_X)
    c = c0 + tl.arange(0, BLOCK_C)
    rr = xs * 0 + r  # (a vector: the interpreter's masks take no scalar comparisons)
    ok = ((rr >= 0) & (rr < H) & (xs >= 0) & (xs < W))[:, None] & (c < C)[None, :]
    return tl.load(h_frame + (r * W + xs)[:, None] * (2 * C) + half * C + c[None, :], mask=ok, other=0.0)


@triton.jit
def _sweep_row(h_frame, r, x0, half, c0, H, W, C, above, level, bias, w_ptr, c, c_ok,
               BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, TANH: tl.constexpr, GATHER: tl.constexpr):
    """Input row r (columns x0 - 1 .. on), SiLU'd, into the accumulators of output rows r - 1 (`above`: complete
    after it) and r, and a new one for row r + 1. w_ptr: the (9, 2C) taps, tap-major, so that a tap's channels are
    one vector load. GATHER: row r is loaded once, and a tile's first and last columns get wrong neighbours (not
    stored)."""
    below = bias
    w = w_ptr + half * C + c
    if GATHER:
        s_mid = _silu(_load_row(h_frame, r, x0 - 1, half, c0, H, W, C, BLOCK_X, BLOCK_C).to(tl.float32), TANH)
        i = tl.broadcast_to(tl.arange(0, BLOCK_X)[:, None], s_mid.shape)
    for dx in tl.static_range(3):
        if GATHER:
            s = s_mid if dx == 1 else tl.gather(s_mid, tl.minimum(tl.maximum(i + dx - 1, 0), BLOCK_X - 1), 0)
        else:
            s = _silu(_load_row(h_frame, r, x0 + dx - 1, half, c0, H, W, C, BLOCK_X, BLOCK_C).to(tl.float32), TANH)
        below += s * tl.load(w + dx * 2 * C, mask=c_ok, other=0.0).to(tl.float32)[None, :]  # kernel row 0
        level += s * tl.load(w + (3 + dx) * 2 * C, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        above += s * tl.load(w + (6 + dx) * 2 * C, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return above, level, below


@triton.jit
def _glu_conv_kernel(
    h_ptr, w_ptr, b_ptr, o_ptr,  # h: (frames, H*W, 2C) contiguous; w: (9, 2C); b: (2C,); o: (frames, H*W, C)
    H, W, C,
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, TANH: tl.constexpr, STAGES: tl.constexpr,
    GATHER: tl.constexpr,
):
    frame, strip, cblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALO: tl.constexpr = 1 if GATHER else 0  # a gathering tile's edge columns only feed their neighbours
    strips_x = tl.cdiv(W, BLOCK_X - 2 * HALO)
    y0 = (strip // strips_x) * ROWS
    x0 = (strip % strips_x) * (BLOCK_X - 2 * HALO)  # the first column this strip writes
    c0 = cblock * BLOCK_C
    i = tl.arange(0, BLOCK_X)
    xs = x0 - HALO + i
    mine = (i >= HALO) & (i < BLOCK_X - HALO) & (xs < W)  # the columns this strip writes
    c = c0 + tl.arange(0, BLOCK_C)  # a is channel c of h, its gate g channel C + c
    c_ok = c < C
    h_frame = h_ptr + frame.to(tl.int64) * H * W * 2 * C  # 64-bit: a batch of chunks may pass 2^31 elements
    o_frame = o_ptr + frame.to(tl.int64) * H * W * C
    zero = tl.zeros((BLOCK_X, BLOCK_C), tl.float32)
    bias_a = zero + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias_g = zero + tl.load(b_ptr + C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    # step r reads input row r; before it, (above, level) accumulate output rows r - 1 and r
    above_a, level_a, above_g, level_g = zero, bias_a, zero, bias_g
    for r in tl.range(y0 - 1, y0 + ROWS + 1, num_stages=STAGES):
        a, level_a, below_a = _sweep_row(h_frame, r, x0, 0, c0, H, W, C, above_a, level_a, bias_a, w_ptr, c, c_ok,
                                         BLOCK_X, BLOCK_C, TANH, GATHER)
        g, level_g, below_g = _sweep_row(h_frame, r, x0, 1, c0, H, W, C, above_g, level_g, bias_g, w_ptr, c, c_ok,
                                         BLOCK_X, BLOCK_C, TANH, GATHER)
        y = xs * 0 + r - 1  # complete: store it if it is one of this strip's rows
        ok = ((y >= y0) & (y < H) & (y < y0 + ROWS) & mine)[:, None] & c_ok[None, :]
        tl.store(o_frame + (y * W + xs)[:, None] * C + c[None, :], (a * _silu(g, TANH)).to(o_ptr.dtype.element_ty),
                 mask=ok)
        above_a, level_a, above_g, level_g = level_a, below_a, level_g, below_g


@triton_op("longsana::glu_conv", mutates_args=())
def glu_conv_triton(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, height: int,
                    width: int) -> torch.Tensor:
    """h: (B, N, 2C), N a whole number of height x width frames; weight (2C, 1, 3, 3); bias (2C,). (B, N, C)."""
    B, N, C2 = h.shape
    if C2 % 2 or N % (height * width) or weight.shape != (C2, 1, 3, 3) or bias.shape != (C2,):
        raise ValueError(f"glu_conv: h (B, N, 2C) with N a multiple of {height} x {width}, weight (2C, 1, 3, 3) and "
                         f"bias (2C,), got {tuple(h.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    h = h.contiguous()
    frames, C = B * N // (height * width), C2 // 2
    o = triton_common.empty((B, N, C), h.dtype, h.device)
    written = CONFIG.block_x - 2 if CONFIG.gather else CONFIG.block_x  # columns a strip writes (the kernel's HALO)
    strips = triton.cdiv(height, CONFIG.rows) * triton.cdiv(width, written)
    grid = (frames, strips, triton.cdiv(C, CONFIG.block_c))
    wrap_triton(_glu_conv_kernel)[grid](h, weight.reshape(C2, 9).t().contiguous(), bias.contiguous(), o,
                                        height, width, C, BLOCK_X=CONFIG.block_x, BLOCK_C=CONFIG.block_c,
                                        ROWS=CONFIG.rows, TANH=CONFIG.tanh_silu and h.is_cuda, STAGES=CONFIG.num_stages,
                                        GATHER=CONFIG.gather, num_warps=CONFIG.num_warps)
    return o

