"""LayerNorm (no affine) followed by adaLN modulation, x * (1 + scale) + shift: the prologue of every
self-attention and FFN branch. This file holds the plain PyTorch reference; faster implementations must match it."""

from __future__ import annotations

import torch


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift. x: (B, N, D); shift, scale broadcast to it."""
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xn * (1 + scale.float()) + shift.float()).to(x.dtype)
