"""LayerNorm (no affine) followed by adaLN modulation, x * (1 + scale) + shift: the prologue of every
self-attention and FFN branch. This file holds the plain PyTorch reference, which faster implementations must
match, and the entry point `ln_modulate`, which runs the Triton kernel (triton_ln_modulate.py) on CUDA tensors and
the reference elsewhere (kernels/backend.py); either way differentiable (the Triton op's backward is the
reference's). `ln_modulate_fp8` is the same with its output quantized per row for an FP8 matrix product
(kernels/quantize.py), computed from the fp32 result (no bf16 rounding in between); inference only.
`add_ln_modulate` and `add_ln_modulate_fp8` take the residual add that precedes a norm, (x + a, norm of x + a),
in the same pass: the sum is the residual stream the block carries on with, and the norm reads it from registers."""

from __future__ import annotations

import torch

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton
from longsana.kernels.quantize import QuantizedRows, quantize_rows_ref

if HAS_TRITON:
    from longsana.kernels.triton_ln_modulate import (add_ln_modulate_fp8_triton, add_ln_modulate_triton,
                                                     ln_modulate_fp8_triton, ln_modulate_triton)


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift. x: (B, N, D); shift, scale broadcast to it."""
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xn * (1 + scale.float()) + shift.float()).to(x.dtype)


def add_ln_modulate_ref(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, ln_modulate_ref(x + a, shift, scale)): a residual add and the norm that reads its result."""
    total = x + a
    return total, ln_modulate_ref(total, shift, scale, eps)


if HAS_TRITON:
    register_reference_backward(ln_modulate_triton, ln_modulate_ref)
    register_reference_backward(add_ln_modulate_triton, add_ln_modulate_ref)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                backend: str | None = None) -> torch.Tensor:
    """`ln_modulate_ref`'s contract, run by the Triton kernel where `use_triton` says so."""
    if not use_triton(x, backend):
        return ln_modulate_ref(x, shift, scale, eps)
    return ln_modulate_triton(x, shift, scale, eps)


def add_ln_modulate(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_ln_modulate_ref`'s contract, run by the Triton kernel where `use_triton` says so; a: x's shape and
    dtype there."""
    if not use_triton(x, backend):
        return add_ln_modulate_ref(x, a, shift, scale, eps)
    return add_ln_modulate_triton(x, a, shift, scale, eps)


def ln_modulate_fp8_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6) -> QuantizedRows:
    """`ln_modulate_ref` in fp32, its rows quantized: what an FP8 product of the result reads."""
    return quantize_rows_ref(ln_modulate_ref(x.float(), shift, scale, eps))


def ln_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                    backend: str | None = None) -> QuantizedRows:
    """`ln_modulate_fp8_ref`'s contract, run by the Triton kernel where `use_triton` says so."""
    if not use_triton(x, backend):
        return ln_modulate_fp8_ref(x, shift, scale, eps)
    return QuantizedRows(*ln_modulate_fp8_triton(x, shift, scale, eps))


def add_ln_modulate_fp8_ref(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                            eps: float = 1e-6) -> tuple[torch.Tensor, QuantizedRows]:
    """(x + a, ln_modulate_fp8_ref of it)."""
    total = x + a
    return total, ln_modulate_fp8_ref(total, shift, scale, eps)


def add_ln_modulate_fp8(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6, backend: str | None = None) -> tuple[torch.Tensor, QuantizedRows]:
    """`add_ln_modulate_fp8_ref`'s contract, run by the Triton kernel where `use_triton` says so."""
    if not use_triton(x, backend):
        return add_ln_modulate_fp8_ref(x, a, shift, scale, eps)
    total, q, s = add_ln_modulate_fp8_triton(x, a, shift, scale, eps)
    return total, QuantizedRows(q, s)
