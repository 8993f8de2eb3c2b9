"""The middle of the MixFFN: SiLU, a depthwise 3x3 convolution over each frame, then the GLU gate a * SiLU(g).

For the up-projection's output h (B, N, 2C), tokens ordered (frame, row, column), channels last:

    u = conv3x3_depthwise(SiLU(h), weight, bias)      zero padding, per frame, per channel
    a, g = u[..., :C], u[..., C:]
    out = a * SiLU(g)                                  (B, N, C)

This file holds the plain PyTorch reference, which faster implementations must match, and the entry point
`glu_conv`, which runs the reference unless the Triton kernel (triton_glu_conv.py) is asked for by name
(backend="triton" or LONGSANA_KERNELS=triton) or TRITON_AUTO is set. The kernel reads the input once and writes the
output once; its floor is 0.21 ms for a block's 15,600 x 13,440 input on the H200, where inductor's best around
cuDNN's depthwise conv took 0.75 ms. On an H100 (benchmarks/RESULTS.md, 2026-12-05) the kernel took 1.19 ms at its
default tiling and 0.76 ms at the best the sweep found, against 0.90 ms for the compiled reference; it is not yet
timed on the H200 (the reference there: 0.75 ms), so "auto" keeps the reference (`benchmarks.fps --tune` times both
and sets TRITON_AUTO in its own process). Either way differentiable (the Triton op's backward is the reference's).
The kernel's `tma` loads and its taps as (9, 2C) (triton_glu_conv.py) came after those timings and are not yet
timed on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton

if HAS_TRITON:
    from longsana.kernels.triton_glu_conv import glu_conv_triton

TRITON_AUTO = False  # whether "auto" runs the kernel on GPUs: once it is measured faster than the reference


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
