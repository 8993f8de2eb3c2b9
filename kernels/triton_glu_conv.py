"""Triton SiLU + depthwise 3x3 + GLU gate in one pass; the semantics are `glu_conv_ref` in glu_conv.py.

Unfused, the FFN's middle reads and writes its (N, 2C) activation several times (SiLU, the convolution, and the
layout copies around it, then the gate), about 1.9 GB a block for a 10-latent-frame chunk at 480p. Here each
program takes a tile of pixels of one frame x a block of C output channels, reads the 9 neighbours of each pixel in
the a and the g channels (the rows above and below come from cache: other programs read them too), keeps SiLU, the
convolution and the gate in fp32 registers, and writes the (N, C) output once: about 0.5 GB a block.
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
    """Tiling, the best of benchmarks/kernels.py --sweep on the H200 (1.37 ms; 32 x 128: 1.84 ms)."""
    block_p: int = 16  # pixels of one frame per program
    block_c: int = 128  # output channels per program
    num_warps: int = 4


CONFIG = GluConvConfig()


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _glu_conv_kernel(
    h_ptr, w_ptr, b_ptr, o_ptr,  # h: (frames, H*W, 2C) contiguous; w: (2C, 9); b: (2C,); o: (frames, H*W, C)
    H, W, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    frame, tile, cblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels of the frame, row-major
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels: a is channel c of h, g is channel C + c
    y, x = p // W, p % W
    p_ok, c_ok = p < H * W, c < C
    h_frame = h_ptr + frame.to(tl.int64) * H * W * 2 * C  # 64-bit: a batch of chunks may pass 2^31 elements
    a = tl.zeros((BLOCK_P, BLOCK_C), tl.float32) + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    g = tl.zeros((BLOCK_P, BLOCK_C), tl.float32) + tl.load(b_ptr + C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for t in range(9):  # a loop, not unrolled: unrolled, all 18 tile loads are kept in flight and spill
        yy, xx = y + t // 3 - 1, x + t % 3 - 1
        inside = p_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)  # outside: the zero padding
        ok = inside[:, None] & c_ok[None, :]
        at = h_frame + (yy * W + xx)[:, None] * 2 * C + c[None, :]
        wa = tl.load(w_ptr + c * 9 + t, mask=c_ok, other=0.0).to(tl.float32)
        wg = tl.load(w_ptr + (C + c) * 9 + t, mask=c_ok, other=0.0).to(tl.float32)
        a += _silu(tl.load(at, mask=ok, other=0.0).to(tl.float32)) * wa[None, :]
        g += _silu(tl.load(at + C, mask=ok, other=0.0).to(tl.float32)) * wg[None, :]
    out = o_ptr + (frame.to(tl.int64) * H * W + p)[:, None] * C + c[None, :]
    tl.store(out, (a * _silu(g)).to(o_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


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
    grid = (frames, triton.cdiv(height * width, CONFIG.block_p), triton.cdiv(C, CONFIG.block_c))
    wrap_triton(_glu_conv_kernel)[grid](h, weight.reshape(C2, 9).contiguous(), bias.contiguous(), o,
                                        height, width, C, BLOCK_P=CONFIG.block_p, BLOCK_C=CONFIG.block_c,
                                        num_warps=CONFIG.num_warps)
    return o
