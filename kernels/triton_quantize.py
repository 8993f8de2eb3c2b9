"""Triton row-wise FP8 quantization in one read; semantics: `quantize_rows_ref` in quantize.py.

The FP8 products quantize every input that no kernel of ours writes in FP8 already: the two attention outputs, the
residual stream that the cross-attention's q reads, the FFN's gated middle, z before the temporal conv (fp8.py).
Compiled by inductor, quantize_rows_ref is a reduction over a row wider than inductor keeps in registers (2240 and 6720
channels, its limit is 1024), so it reads each row twice, once for the row's largest magnitude and once to quantize it,
and for z it made two kernels. Here a program holds a few whole rows (padded to the next power of 2 with a mask, as the
LayerNorm kernel does): each row is read once, its largest magnitude taken from registers, and written once in e4m3 with
its scale.

NaN and infinity behave as in the reference: the row maximum and the clamp propagate NaN (Triton's max and clamp
would drop it), so a NaN makes its row's scale NaN, and an infinity makes the row's scale infinite and its own
element NaN: either way the row dequantizes to NaN, never to something finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common
from longsana.kernels.quantize import AMAX_FLOOR, FP8, FP8_MAX

MAX_K = 16384  # the widest row a program holds in registers (at 8 warps, 64 fp32 a thread); wider: the reference


@dataclass
class QuantizeConfig:
    """Elements per program (whole rows: elements // the padded row width, at least one) and warps: the fastest of a
    sweep on an H100 (Triton 3.6). There, at a chunk's 15,600 rows of 2240 and 6720, `benchmarks/kernels.py` timed
    55.7 and 109.0 us against 92.7 and 288.0 us for inductor's compiled reference (benchmarks/RESULTS.md,
    2026-12-07); its --sweep tunes them."""
    elements: int = 16384
    num_warps: int = 8


CONFIG = QuantizeConfig()


@triton.jit
def _max_keep_nan(a, b):
    """A row maximum's combine step that keeps NaN (tl.max's does not)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantized_rows(x, FP8_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """fp32 rows x (ROWS, BLOCK), padding columns 0 -> (x / s within e4m3's range, to be cast; s (ROWS,) fp32):
    `quantize_rows_ref` on rows a program holds. Shared by every kernel that writes an FP8 product's input."""
    amax = tl.reduce(tl.abs(x), 1, _max_keep_nan)  # padding holds 0: no effect on a row's largest magnitude
    s = tl.maximum(amax, AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL) / FP8_MAX
    return tl.clamp(x / s[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL), s


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr,
                          AMAX_FLOOR: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_K)
    ok = (row < M)[:, None] & (c < K)[None, :]  # (ROWS, BLOCK_K)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_xm + c[None, :], mask=ok, other=0.0).to(tl.float32)
    q, s = quantized_rows(x, FP8_MAX, AMAX_FLOOR)
    tl.store(s_ptr + row, s, mask=row < M)
    tl.store(q_ptr + row[:, None].to(tl.int64) * K + c[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)


def rows_per_program(K: int) -> int:
    """Whole rows of K channels (padded to a power of 2) in CONFIG.elements, at least one."""
    return max(1, CONFIG.elements // triton.next_power_of_2(K))


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel takes x's rows: at most MAX_K wide."""
    return x.shape[-1] <= MAX_K


@triton_op("longsana::quantize_rows", mutates_args=())
def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), any float dtype -> (e4m3 (..., K) contiguous, fp32 scales (..., 1))."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)  # a view for the activations the products get (rows evenly spaced)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = triton_common.empty(x.shape, FP8, x.device)
    s = triton_common.empty((*x.shape[:-1], 1), torch.float32, x.device)
    M, per_program = rows.shape[0], rows_per_program(K)
    if M:
        wrap_triton(_quantize_rows_kernel)[(triton.cdiv(M, per_program),)](
            rows, q, s, M, K, rows.stride(0), ROWS=per_program, BLOCK_K=triton.next_power_of_2(K), FP8_MAX=FP8_MAX,
            AMAX_FLOOR=AMAX_FLOOR, num_warps=CONFIG.num_warps)
    return q, s
