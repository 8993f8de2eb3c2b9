"""The middle of the MixFFN: SiLU, a depthwise 3x3 convolution over each frame, then the GLU gate a * SiLU(g).

For the up-projection's output h (B, N, 2C), tokens ordered (frame, row, column), channels last:

    u = conv3x3_depthwise(SiLU(h), weight, bias)      zero padding, per frame, per channel
    a, g = u[..., :C], u[..., C:]
    out = a * SiLU(g)                                  (B, N, C)

This file holds the plain PyTorch reference, which faster implementations must match, and the entry point
`glu_conv`, which runs the reference unless the Triton kernel (triton_glu_conv.py) is asked for by name
(backend="triton" or LONGSANA_KERNELS=triton): on the H200 the kernel takes 1.37 ms for a block's 15,600 x 13,440
input against 0.75 ms for the reference compiled by inductor (cuDNN's depthwise conv between fused SiLU and gate
kernels), so inside the compiled pass the reference is the faster path (TRITON_AUTO). Its floor is 0.21 ms: the
kernel reads each input tile once per tap (9 times, from cache), where a faster version has to reuse a halo tile.
Either way differentiable (the Triton op's backward is the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton

if HAS_TRITON:
    from longsana.kernels.triton_glu_conv import glu_conv_triton

TRITON_AUTO = False  # the Triton kernel is slower than the compiled reference on the H200 (above)


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
    """`glu_conv_ref`'s contract, run by the Triton kernel where `use_triton` says so (by name only, TRITON_AUTO)."""
    if not use_triton(h, backend, auto=TRITON_AUTO):
        return glu_conv_ref(h, weight, bias, height, width)
    return glu_conv_triton(h, weight, bias, height, width)
