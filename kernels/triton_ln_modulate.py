"""Triton LayerNorm-modulate, x_hat * (1 + scale) + shift; semantics: `ln_modulate_ref` and `ln_modulate_fp8_ref`
in ln_modulate.py.

Each program takes a few token rows whole (D = 2240 for the 2B model, padded to the next power of 2 with a mask):
each row is read once, its mean and variance taken in fp32 from registers, and the output written once. shift and
scale are read through strides, so per-sample (B, 1, D), per-token (B, N, D) and strided views (rows of a
(B, N, 6, D) tensor of modulations) all work without a copy.

Because a program holds whole rows, the FP8 variant (QUANT) quantizes each row from registers too
(`triton_quantize.quantized_rows`, from its largest magnitude) and writes e4m3 and one scale per row: the next
matrix product's input in half the bytes, without a bf16 round trip through memory.

The residual variant (ADD) takes the branch output a that the block adds to its residual stream just before the
norm (the cross-attention's, before the FFN's norm): it writes x + a, rounded to x's dtype as PyTorch's addition
rounds it, and normalizes that rounded row. Separately, the addition reads x and a and writes the sum, and the norm
reads the sum again; here that second read is gone, and so is a launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common
from longsana.kernels.triton_quantize import quantized_rows
from longsana.kernels.quantize import AMAX_FLOOR, FP8, FP8_MAX


@dataclass
class LnModulateConfig:
    """Defaults tuned on an H100 at (1, 15600, 2240) bf16 (benchmarks/kernels.py --sweep)."""
    rows: int = 2  # token rows per program
    num_warps: int = 8


CONFIG = LnModulateConfig()


@triton.jit
def _ln_modulate_kernel(
    x_ptr, a_ptr, shift_ptr, scale_ptr, y_ptr, s_ptr, sum_ptr,  # s_ptr: row scales (QUANT); a, sum: ADD only
    M, N, D, eps,  # M = B * N rows
    stride_xb, stride_xn, stride_ab, stride_an, stride_sb, stride_sn, stride_sd, stride_cb, stride_cn, stride_cd,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, ADD: tl.constexpr, FP8_MAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # b * N + n; y and the sum are contiguous (B, N, D)
    b, n = row // N, row % N
    c = tl.arange(0, BLOCK_D)
    ok = (row < M)[:, None] & (c < D)[None, :]  # (ROWS, BLOCK_D)
    x = tl.load(x_ptr + (b * stride_xb + n * stride_xn)[:, None] + c[None, :], mask=ok, other=0.0)
    if ADD:  # the residual stream's new rows, rounded as `x + a` rounds them; the norm reads those
        a = tl.load(a_ptr + (b * stride_ab + n * stride_an)[:, None] + c[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row[:, None] * D + c[None, :], x, mask=ok)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    # eps to fp32 first: inductor passes a Python float as fp64, which would turn the rest of the row's arithmetic
    # into fp64 (slow, and Triton 3.6 cannot convert fp64 to e4m3)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + tl.cast(eps, tl.float32))
    shift = tl.load(shift_ptr + (b * stride_sb + n * stride_sn)[:, None] + c[None, :] * stride_sd, mask=ok,
                    other=0.0)
    scale = tl.load(scale_ptr + (b * stride_cb + n * stride_cn)[:, None] + c[None, :] * stride_cd, mask=ok,
                    other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    if QUANT:  # padding columns hold shift = 0, so they do not count in the row's largest magnitude
        y, s = quantized_rows(y, FP8_MAX, AMAX_FLOOR)
        tl.store(s_ptr + row, s, mask=row < M)
    tl.store(y_ptr + row[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, y: torch.Tensor,
            s: torch.Tensor | None, a: torch.Tensor | None = None, total: torch.Tensor | None = None) -> None:
    """The kernel over x (B, N, D) into y, into the row scales s (B, N, 1) when given (QUANT), and with a (ADD)
    over x + a, which it writes to `total`."""
    if x.ndim != 3:
        raise ValueError(f"ln_modulate: x must be (B, N, D), got shape {tuple(x.shape)}")
    if a is not None and (a.shape != x.shape or a.dtype != x.dtype):
        raise ValueError(f"ln_modulate: the residual's addend must be x's shape and dtype {tuple(x.shape)}, "
                         f"{x.dtype}; got {tuple(a.shape)}, {a.dtype}")
    shift, scale = torch.broadcast_to(shift, x.shape), torch.broadcast_to(scale, x.shape)  # strides 0 where broadcast
    x, a = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, a))
    B, N, D = x.shape
    a_strides = (0, 0) if a is None else (a.stride(0), a.stride(1))
    wrap_triton(_ln_modulate_kernel)[(triton.cdiv(B * N, CONFIG.rows),)](
        x, x if a is None else a, shift, scale, y, y if s is None else s, y if total is None else total,
        B * N, N, D, eps, x.stride(0), x.stride(1), *a_strides, *shift.stride(), *scale.stride(),
        ROWS=CONFIG.rows, BLOCK_D=triton.next_power_of_2(D), QUANT=s is not None, ADD=a is not None,
        FP8_MAX=FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, num_warps=CONFIG.num_warps)


@triton_op("longsana::ln_modulate", mutates_args=())
def ln_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (B, N, D); shift, scale broadcastable to it (typically (B, 1, D) or (B, N, D)). Returns x's dtype."""
    y = triton_common.empty(x.shape, x.dtype, x.device)
    _launch(x, shift, scale, eps, y, None)
    return y


@triton_op("longsana::ln_modulate_fp8", mutates_args=())
def ln_modulate_fp8_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As ln_modulate_triton, the output quantized per row: (e4m3 (B, N, D), fp32 scales (B, N, 1))."""
    y = triton_common.empty(x.shape, FP8, x.device)
    s = triton_common.empty((*x.shape[:-1], 1), torch.float32, x.device)
    _launch(x, shift, scale, eps, y, s)
    return y, s


@triton_op("longsana::add_ln_modulate", mutates_args=())
def add_ln_modulate_triton(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, ln_modulate of it) in one pass; a: x's shape and dtype."""
    total, y = (triton_common.empty(x.shape, x.dtype, x.device) for _ in range(2))
    _launch(x, shift, scale, eps, y, None, a, total)
    return total, y


@triton_op("longsana::add_ln_modulate_fp8", mutates_args=())
def add_ln_modulate_fp8_triton(x: torch.Tensor, a: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + a, its ln_modulate quantized per row: e4m3, fp32 scales) in one pass."""
    total = triton_common.empty(x.shape, x.dtype, x.device)
    y = triton_common.empty(x.shape, FP8, x.device)
    s = triton_common.empty((*x.shape[:-1], 1), torch.float32, x.device)
    _launch(x, shift, scale, eps, y, s, a, total)
    return total, y, s
