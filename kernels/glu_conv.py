"""The middle of the MixFFN: SiLU, a depthwise 3x3 convolution over each frame, then the GLU gate a * SiLU(g).

For the up-projection's output h (B, N, 2C), tokens ordered (frame, row, column), channels last:

    u = conv3x3_depthwise(SiLU(h), weight, bias)      zero padding, per frame, per channel
    a, g = u[..., :C], u[..., C:]
    out = a * SiLU(g)                                  (B, N, C)

This file holds the plain PyTorch reference, which faster implementations must match, and the entry point
`glu_conv`, which runs the Triton kernel (triton_glu_conv.py) on GPUs (TRITON_AUTO) and the reference elsewhere, or
either by name (backend=, LONGSANA_KERNELS). The kernel reads the input once and writes the output once; its floor
is 0.21 ms for a block's 15,600 x 13,440 input on an H100. There (benchmarks/RESULTS.md, 2026-12-07) it took
0.38 ms against 0.91 ms for the reference compiled by inductor (around cuDNN's depthwise conv). Either way
differentiable (the Triton op's backward is the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton

if HAS_TRITON:
    from longsana.kernels.triton_glu_conv import glu_conv_triton

TRITON_AUTO = True  # whether "auto" runs the kernel on GPUs: measured faster than the compiled reference (H100, H200)


def glu_conv_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """h: (B, N, 2C) with N = frames * height * width; weight: (2C, 1, 3, 3); bias: (2C,). Returns (B, N, C) in h's
    dtype, each op rounding to it (as the module calls would)."""
    B, N, C2 = h.shape
    u = F.silu(h).view(-1, height, width, C2).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    u = F.conv2d(u, weight, bias, padding=1, groups=C2).permute(0, 2, 3, 1)
    a, g = u.chunk(2, dim=-1)
    return (a * F.silu(g)).reshape(B, N, C2 // 2)


if HAS_TRITON:
    register_reference_backward(glu_conv_triton, glu_conv_ref)


def glu_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, height: int, width: int,
             backend: str | None = None) -> torch.Tensor:
    """`glu_conv_ref`'s contract, run by the Triton kernel where `use_triton` says so."""
    if not use_triton(h, backend, auto=TRITON_AUTO):
        return glu_conv_ref(h, weight, bias, height, width)
    return glu_conv_triton(h, weight, bias, height, width)
