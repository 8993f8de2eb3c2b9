"""Triton SiLU + depthwise 3x3 + GLU gate in one pass; the semantics are `glu_conv_ref` in glu_conv.py.

Unfused, the FFN's middle reads and writes its (N, 2C) activation several times (SiLU, the convolution, and the
layout copies around it, then the gate), about 2.3 GB a block for a 10-latent-frame chunk at 480p. Here a program
owns a strip of one frame (a row's width, ROWS rows) for a block of C output channels (and their C gate channels)
and sweeps it top to bottom: each input row is read once from memory, SiLU'd, and weighed by the three kernel rows
at once, into the three output rows it touches; the row above it is then complete, gated and written. The rolling
accumulators stay in fp32 registers, so the input is read once and the output written once: about 0.63 GB a block.

The kernel's time goes to issuing instructions, not to memory (the floor is 0.21 ms a block on the H200). The row
is held as K tiles of BLOCK_X columns, tile j the columns j, j + K, j + 2K, ... (the "phases"), so that the left
and right neighbours of tile j's columns are tiles j - 1 and j + 1, already SiLU'd in registers; only tile 0's left
and tile K - 1's right neighbours are loaded (from L1) and SiLU'd a second time, K + 2 tiles a row instead of 3K.
At 480p a row is 52 columns: 7 tiles of 8 (56 lanes) or 4 of 16 (64). The taps (9, 2C) come in fp32, tap-major,
loaded once per program; the SiLU of the bf16 input can run two elements an instruction ("tanh_bf16x2").

What a row step issues beyond its 252 multiply-adds (a thread's 14 pixels of both halves, 9 taps each) is kept
small: the frame's height, width and channels are compile-time constants (one build per resolution), so every load
and store of a step is a fixed offset from one address, not a 64-bit address computed per tile; the packed SiLU
hands its two results out as fp32 (a shift and a mask); the gate half sums g / 2 (its taps and bias halved, exact),
which is what its SiLU takes; the sums are written as FMAs (Triton 3.9 left some as a multiply and an add).
Compiled for sm_90 on a CPU (`tests/test_kernels.py` counts it), the default setting's row step is 494 SASS
instructions with Triton 3.6 and 496 with 3.9, against 627 and 641 before, and 1,351 for 16 pixels in the kernel
before the phases (3x the SiLUs, the taps converted from bf16 in every step).

Tried and dropped: a pixel's neighbours taken from other lanes (tl.gather, warp shuffles) rather than loaded again
was slower than loading (1,113 against 857 us a block, H200), rows loaded through a Hopper TMA descriptor no faster
(692 against 653 us, H100), and reading each pixel's 9 neighbours per output tile slower than unfused code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common

SILU_MODES = ("exp", "tanh", "tanh_bf16x2")


@dataclass
class GluConvConfig:
    """Tiling and SiLU: the fastest measured on an H100 (Triton 3.6), 379.6 us a block against 909.1 us for the
    reference compiled by inductor (benchmarks/RESULTS.md, 2026-12-07; before the row step's cut above, which is not
    timed yet). benchmarks/kernels.py --sweep tunes them."""
    phases: int = 7  # K: a strip's row as K interleaved tiles (above); a strip is K x block_x columns
    block_x: int = 8  # columns of a tile, a power of 2: 7 x 8 covers a 52-pixel row at 480p with 4 lanes to spare
    block_c: int = 32  # output channels per program
    rows: int = 32  # output rows per strip, at most: a whole 30-row frame at 480p; fewer give more, shorter programs
    num_warps: int = 4
    num_stages: int = 1  # >1: the row loop software-pipelined (the next row's loads in flight while one is weighed)
    silu: str = "tanh_bf16x2"  # "exp": x / (1 + exp(-x)), what the interpreter runs whatever this says; "tanh":
    # x/2 + x/2 tanh(x/2) through the GPU's tanh.approx.f32, one special-function op instead of exp and a
    # reciprocal; "tanh_bf16x2": the same on two bf16 inputs an instruction (sm_90), the SiLU rounded to bf16 as
    # the unfused module rounds it (other dtypes and GPUs run "tanh")


CONFIG = GluConvConfig()


@triton.jit
def _silu_of_double(h, TANH: tl.constexpr):
    """fp32 h -> SiLU(2 h) = 2h sigmoid(2h) = h + h tanh(h): one FMA after the tanh."""
    if TANH:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True, pack=1)
        return tl.fma(h, t, h)
    x = 2.0 * h
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _silu_bf16x2(x):
    """bf16 x -> SiLU(x) rounded to bf16, returned in fp32: h = x/2 (exact), h + h tanh(h), two elements an
    instruction (sm_90); the bf16 pair comes out as two fp32 values (a shift and a mask), not unpacked by the caller."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 c, h, t, s; mov.b32 c, 0x3F003F00; mul.rn.bf16x2 h, $2, c; tanh.approx.bf16x2 t, h; "
        "fma.rn.bf16x2 s, h, t, h; shl.b32 $0, s, 16; and.b32 $1, s, 0xffff0000; }", "=r,=r,r", [x],
        dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _silu_row(h_frame, r, x, half, c, H, W, C, SILU: tl.constexpr, EVEN_C: tl.constexpr):
    """SiLU of input row r of this frame at columns x, channels c of half `half` (0: a, 1: its gate g), fp32, zero
    outside the frame (the convolution's padding: SiLU(0) = 0). SILU: an index of SILU_MODES."""
    rr = x * 0 + r  # (a vector: the interpreter's masks take no scalar comparisons)
    ok = ((rr >= 0) & (rr < H) & (x >= 0) & (x < W))[:, None]
    if not EVEN_C:
        ok = ok & (c < C)[None, :]
    h = tl.load(h_frame + (r * W + x)[:, None] * (2 * C) + half * C + c[None, :], mask=ok, other=0.0)
    if SILU == 2:
        return _silu_bf16x2(h)
    return _silu_of_double(0.5 * h.to(tl.float32), SILU == 1)


@triton.jit
def _taps(w_ptr, half, c, C, scale, EVEN_C: tl.constexpr):
    """The nine fp32 taps of half `half` for channels c times `scale`, kernel row-major, each (1, BLOCK_C); w_ptr:
    (9, 2C)."""
    taps = ()
    for t in tl.static_range(9):
        w = w_ptr + t * 2 * C + half * C + c
        if EVEN_C:
            taps = taps + (scale * tl.load(w)[None, :],)
        else:
            taps = taps + (scale * tl.load(w, mask=c < C, other=0.0)[None, :],)
    return taps


@triton.jit
def _sweep_row(h_frame, r, xk, half, c, H, W, C, above, level, bias, taps, K: tl.constexpr, SILU: tl.constexpr,
               EVEN_C: tl.constexpr):
    """Input row r, SiLU'd, into the accumulators of output rows r - 1 (`above`: complete after it) and r, and new
    ones for row r + 1; each K tiles, tile j the columns xk + j. s holds the row's tiles shifted by -1 .. K columns,
    so tile j's left, own and right columns are s[j], s[j + 1], s[j + 2]. taps: the half's 9, kernel row-major."""
    s = (_silu_row(h_frame, r, xk - 1, half, c, H, W, C, SILU, EVEN_C),)
    for j in tl.static_range(K + 1):
        s = s + (_silu_row(h_frame, r, xk + j, half, c, H, W, C, SILU, EVEN_C),)
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = taps  # w0..w2: kernel row 0, for the output row below the input row
    new_above = ()
    new_level = ()
    below = ()
    for j in tl.static_range(K):
        left, mid, right = s[j], s[j + 1], s[j + 2]
        new_above = new_above + (tl.fma(right, w8, tl.fma(mid, w7, tl.fma(left, w6, above[j]))),)
        new_level = new_level + (tl.fma(right, w5, tl.fma(mid, w4, tl.fma(left, w3, level[j]))),)
        below = below + (tl.fma(right, w2, tl.fma(mid, w1, tl.fma(left, w0, bias))),)
    return new_above, new_level, below


@triton.jit
def _glu_conv_kernel(
    h_ptr, w_ptr, b_ptr, o_ptr,  # h: (frames, H*W, 2C) contiguous; w: (9, 2C) fp32; b: (2C,); o: (frames, H*W, C)
    H: tl.constexpr, W: tl.constexpr, C: tl.constexpr,  # constants: each row step's loads at fixed offsets
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, K: tl.constexpr, SILU: tl.constexpr,
    STAGES: tl.constexpr, EVEN_C: tl.constexpr,  # EVEN_C: C is a multiple of BLOCK_C, no channel masks
):
    frame, strip, cblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    strips_x = tl.cdiv(W, K * BLOCK_X)
    y0 = (strip // strips_x) * ROWS
    xk = (strip % strips_x) * K * BLOCK_X + K * tl.arange(0, BLOCK_X)  # tile j's columns: xk + j
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)  # a is channel c of h, its gate g channel C + c
    c_ok = c < C
    h_frame = h_ptr + frame.to(tl.int64) * H * W * 2 * C  # 64-bit: a batch of chunks may pass 2^31 elements
    o_frame = o_ptr + frame.to(tl.int64) * H * W * C
    zero = tl.zeros((BLOCK_X, BLOCK_C), tl.float32)
    bias_a = zero + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias_g = zero + 0.5 * tl.load(b_ptr + C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    zeros = ()
    level_a = ()
    level_g = ()
    for j in tl.static_range(K):
        zeros = zeros + (zero,)
        level_a = level_a + (bias_a,)
        level_g = level_g + (bias_g,)
    # step r reads input row r; before it, (above, level) accumulate output rows r - 1 and r. The first step reads
    # the row above the strip (none above the frame's first row), the last the row below it (below the frame's last
    # row, the padding: its loads are masked off)
    y1 = tl.minimum(y0 + ROWS, H)  # past the strip's last row
    above_a, above_g = zeros, zeros
    # the taps in registers for the whole sweep (loaded in the loop, they cost more instructions and registers); the
    # gate half's halved, as its bias is, so that it sums g / 2 (exact in fp32), what its SiLU takes (_silu_of_double)
    taps_a, taps_g = _taps(w_ptr, 0, c, C, 1.0, EVEN_C), _taps(w_ptr, 1, c, C, 0.5, EVEN_C)
    for r in tl.range(tl.maximum(y0 - 1, 0), y1 + 1, num_stages=STAGES):
        a, level_a, below_a = _sweep_row(h_frame, r, xk, 0, c, H, W, C, above_a, level_a, bias_a, taps_a, K, SILU,
                                         EVEN_C)
        g, level_g, below_g = _sweep_row(h_frame, r, xk, 1, c, H, W, C, above_g, level_g, bias_g, taps_g, K, SILU,
                                         EVEN_C)
        for j in tl.static_range(K):  # output row r - 1 is complete: store it if it is one of this strip's rows
            x = xk + j
            y = x * 0 + r - 1
            ok = ((y >= y0) & (y < y1) & (x < W))[:, None] & c_ok[None, :]
            gated = a[j] * _silu_of_double(g[j], SILU > 0)
            tl.store(o_frame + (y * W + x)[:, None] * C + c[None, :], gated.to(o_ptr.dtype.element_ty), mask=ok)
        above_a, level_a, above_g, level_g = level_a, below_a, level_g, below_g


def silu_mode(h: torch.Tensor) -> int:
    """CONFIG.silu for this input, as the kernel's SILU (its index in SILU_MODES): "exp" off GPUs (the interpreter),
    "tanh_bf16x2" only for bf16 on sm_90 and later ("tanh" elsewhere)."""
    if CONFIG.silu not in SILU_MODES:
        raise ValueError(f"GluConvConfig.silu: one of {SILU_MODES}, got {CONFIG.silu!r}")
    mode = CONFIG.silu if h.is_cuda else "exp"
    if mode == "tanh_bf16x2" and (h.dtype != torch.bfloat16 or torch.cuda.get_device_capability(h.device) < (9, 0)):
        mode = "tanh"
    return SILU_MODES.index(mode)


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
    taps = weight.new_empty((9, C2), dtype=torch.float32).copy_(weight.reshape(C2, 9).t())
    strips = triton.cdiv(height, CONFIG.rows) * triton.cdiv(width, CONFIG.phases * CONFIG.block_x)
    grid = (frames, strips, triton.cdiv(C, CONFIG.block_c))
    wrap_triton(_glu_conv_kernel)[grid](h, taps, bias.contiguous(), o, H=height, W=width, C=C,
                                        BLOCK_X=CONFIG.block_x, BLOCK_C=CONFIG.block_c, ROWS=CONFIG.rows,
                                        K=CONFIG.phases, SILU=silu_mode(h), STAGES=CONFIG.num_stages,
                                        EVEN_C=C % CONFIG.block_c == 0, num_warps=CONFIG.num_warps)
    return o
