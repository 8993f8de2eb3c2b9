"""Row-wise FP8 (e4m3) quantization: the reference that the FP8 matrix products (longsana/fp8.py) and every kernel
that writes their input already quantized (`ln_modulate_fp8`) must match, and the entry point `quantize_rows`.

A row x (one token's channels) becomes x_q * s: s = max|x| / FP8_MAX, x_q = x / s rounded to the nearest e4m3
number, so each row uses e4m3's whole range and one outlier token costs no other token its precision.

`quantize_rows` runs the Triton kernel (triton_quantize.py: each row read once) on GPUs and the reference elsewhere,
or either by name (backend=, LONGSANA_KERNELS); inference only, like the products it feeds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from longsana.kernels.backend import HAS_TRITON, use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: a row's largest magnitude maps here
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero

if HAS_TRITON:  # after the constants, which the kernel's module reads from this one
    from longsana.kernels import triton_quantize


class QuantizedRows(NamedTuple):
    """x ~ q * scale: q (..., K) e4m3, scale (..., 1) fp32."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """q * scale in fp32: the values a product of these rows sees."""
        return self.q.float() * self.scale


def quantize_rows_ref(x: torch.Tensor) -> QuantizedRows:
    """x (..., K) in any float dtype -> its rows quantized, computed in fp32. Rounding to nearest; a NaN stays NaN,
    an infinity makes its row NaN (not silently finite)."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    return QuantizedRows((x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s)


def quantize_rows(x: torch.Tensor, backend: str | None = None) -> QuantizedRows:
    """`quantize_rows_ref`'s contract, run by the Triton kernel where `use_triton` says so and the rows fit it."""
    if not use_triton(x, backend) or not triton_quantize.supports(x):
        return quantize_rows_ref(x)
    return QuantizedRows(*triton_quantize.quantize_rows_triton(x))
