"""Triton block linear attention of one chunk; the semantics are `linear_attention_ref` in linear_attention.py.

Two passes, because attention inside a chunk is bidirectional (every output needs the whole chunk's S_c):
  1. state:  each program reduces a slice of the chunk's tokens to fp32 partial sums of S_c = sum_j v_j (R_j k_j)^T
             and z_c = sum_j k_j; the partials are then summed by torch (deterministic: no atomics) and the
             carried (S0, z0) added.
  2. output: each program loads S = S0 + S_c once, then for each token tile computes
             o_i = S (R_i q_i) / (z . q_i + eps).
Tiles are loaded whole and contiguous; the rotation of adjacent channel pairs (2m, 2m+1) happens in registers
(reshape to pairs, split, rotate, join). Head dims that are not powers of 2 (112, 40) are padded to the next
power of 2 with masked loads and stores.

Matrix products accumulate in fp32. fp32 inputs use exact fp32 ("ieee") products. 16-bit inputs use tensor-core
products in their dtype: v is exact in it, but R k, R q and S are fp32 values, and rounding them to bf16 doubles
the output error of the fp32 reference (H100, full shapes: 3.1e-3 against 1.66e-3 vs fp64). With `hi_lo` each
such operand x is split into hi = bf16(x) and lo = bf16(x - hi), and the products hi.hi + lo.hi + hi.lo give the
fp32 reference's accuracy (1.66e-3) for a few percent more time: the kernels are memory-bound.

Tiles must fit the GPU's shared memory per block (227 KB on Hopper, 163 KB on an A100, 99 KB on Ada and Ampere
consumer GPUs). `TILES` lists, per element size, the tiles known to fit and the memory they take; a launch uses
CONFIG's tiling capped by the largest of them that fits its device, and `supports` sends what no tile fits (head
dims over 128, fp64) to the reference.

Triton's interpreter multiplies bf16 tiles as raw 16-bit integers, so under it (UPCAST) the operands, already
rounded to the input dtype, are multiplied in fp32: a product of two bf16 numbers is exact in fp32, so this is the
tensor-core arithmetic up to the summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common


@dataclass
class LinearAttentionConfig:
    """Tiling; defaults tuned on an H100 at 1 x 15600 tokens x 20 heads x 112 in bf16 (benchmarks/kernels.py
    --sweep). A launch caps the token tiles and stages by `tile`, what fits its device."""
    state_block_n: int = 128  # pass 1: tokens per tile
    state_programs: int = 264  # pass 1 splits the tokens so that splits x B x H comes near this (2 per H100 SM)
    state_warps: int = 8
    out_block_n: int = 128  # pass 2: tokens per tile
    out_tokens: int = 512  # tokens per pass-2 program: S is loaded once per program
    out_warps: int = 8
    num_stages: int = 2
    hi_lo: bool = True  # 16-bit inputs: products of fp32 values as hi + lo halves (3 products, not 1), ~fp32 exact


CONFIG = LinearAttentionConfig()

# By element size: (token tile, pipeline stages, KB of shared memory that the larger of the two kernels takes at head
# dims up to MAX_HEAD_DIM), largest first. Measured by compiling for sm_80, sm_89 and sm_90 with Triton 3.3, 3.6 and
# 3.9, the largest (3.3 takes up to 17 KB more than the others), with the alignment a launch gives (pointers, strides
# and lengths multiples of 16, as at head dim 112), which lets Triton stage more of the loads in shared memory: the
# 16-bit (128, 2) takes 225 KB so, 161 KB without, which is why (64, 2) is there for an A100's 163 KB.
# tests/test_kernels.py compiles them again with the Triton installed to check. fp32 at (128, 2) would take 256 KB:
# more than any GPU has.
TILES = {2: ((128, 2, 225), (64, 2, 145), (64, 1, 97)), 4: ((64, 2, 160), (64, 1, 96), (32, 1, 81))}
MAX_HEAD_DIM = 128  # padded to BLOCK_D = 128; a larger head dim quadruples the tiles


def tile(dtype: torch.dtype, shared_memory: int | None) -> tuple[int, int] | None:
    """(token tile, pipeline stages) of the largest TILES entry for `dtype` that fits `shared_memory` bytes per block
    (None: no limit, as under Triton's interpreter); None if none does."""
    for block_n, stages, kb in TILES.get(dtype.itemsize, ()):
        if shared_memory is None or kb * 1024 <= shared_memory:
            return block_n, stages
    return None


@torch.compiler.assume_constant_result
def _shared_memory(device: torch.device) -> int | None:
    """Shared memory per block on `device`, None without a limit (the interpreter). A constant to torch.compile,
    which takes its value while tracing (through a functools.cache it traced the call, with a warning each time)."""
    if device.type != "cuda":
        return None  # the interpreter
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def supports(x: torch.Tensor) -> bool:
    """Can the kernels take (B, N, H, d) inputs like x on their device? (Else the reference must.)"""
    return x.shape[-1] <= MAX_HEAD_DIM and tile(x.dtype, _shared_memory(x.device)) is not None


def _tiling(x: torch.Tensor, block_n: int) -> tuple[int, int]:
    """(token tile, stages) for a launch on inputs like x: CONFIG's, capped by the tile that fits the device."""
    if not supports(x):
        raise ValueError(f"linear_attention: no Triton tiling fits head dim {x.shape[-1]} in {x.dtype} on {x.device} "
                         "(the entry point runs the reference there)")
    fit_n, fit_stages = tile(x.dtype, _shared_memory(x.device))
    return min(block_n, fit_n), min(CONFIG.num_stages, fit_stages)


@triton.jit
def _rope(x, cos_ptr, sin_ptr, rows, end, stride_cn,
          D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COS_ALIGN: tl.constexpr):
    """R x for the fp32 tile x (BLOCK_N, BLOCK_D) of token `rows`: each channel pair (2p, 2p + 1) rotated."""
    p = tl.arange(0, BLOCK_D // 2)
    pair_ok = (rows < end)[:, None] & (p < D // 2)[None, :]
    cs = tl.multiple_of(rows * stride_cn, COS_ALIGN)[:, None] + p[None, :]  # lets the loads be vectorized
    cos = tl.load(cos_ptr + cs, mask=pair_ok, other=0.0)
    sin = tl.load(sin_ptr + cs, mask=pair_ok, other=0.0)
    x1, x2 = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_D // 2, 2)))  # even, odd channels
    return tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (BLOCK_N, BLOCK_D))


@triton.jit
def _relu(x):
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN, as in torch.relu


@triton.jit
def _hi_lo(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x as hi + lo in `dtype` (~16 significant bits for bf16), as tensor-core operands (fp32 if UPCAST)."""
    hi = x.to(dtype)
    lo = (x - hi.to(tl.float32)).to(dtype)
    if UPCAST:
        hi, lo = hi.to(tl.float32), lo.to(tl.float32)
    return hi, lo


@triton.jit
def _chunk_state_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, w_ptr, r_ptr,  # w_ptr: (H * D,), r_ptr: (B, N) fp32, read if NORM
    S_ptr, z_ptr,  # (splits, B, H, D, D), (splits, B, H, D) fp32
    N, H, tokens_per_split,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_cn,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COS_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, HI_LO: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr,
):
    split, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    n = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    if NORM:
        w = tl.load(w_ptr + h * D + c, mask=c < D, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    S = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    z = tl.zeros((BLOCK_D,), tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + n
        ok = (rows < end)[:, None] & (c < D)[None, :]  # (BLOCK_N, BLOCK_D)
        k = tl.load(k_base + rows[:, None] * stride_kn + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM:  # k from its projection: relu(u w) / RMS(u)
            r = tl.load(r_ptr + b * N + rows, mask=rows < end, other=0.0)
            k = _relu(k * w[None, :]) * r[:, None]
        v = tl.load(v_base + rows[:, None] * stride_vn + c[None, :], mask=ok, other=0.0)
        hi, lo = _hi_lo(_rope(k, cos_ptr, sin_ptr, rows, end, stride_cn, D, BLOCK_N, BLOCK_D, COS_ALIGN),
                        v.dtype, UPCAST)  # R k
        vt = tl.trans(v)
        if UPCAST:
            vt = vt.to(tl.float32)
        S = tl.dot(vt, hi, S, input_precision=PRECISION)
        if HI_LO:  # v is exact in its dtype: adding R k's rounding error makes the product fp32-accurate
            S = tl.dot(vt, lo, S, input_precision=PRECISION)
        z += tl.sum(k, axis=0)
    out = split * tl.num_programs(1) + bh  # this program's (split, b, h) slot
    c_ok = c < D
    tl.store(S_ptr + out * D * D + c[:, None] * D + c[None, :], S, mask=c_ok[:, None] & c_ok[None, :])
    tl.store(z_ptr + out * D + c, z, mask=c_ok)


@triton.jit
def _chunk_output_kernel(
    q_ptr, cos_ptr, sin_ptr, w_ptr,  # w_ptr: (H * D,) fp32, read if NORM
    S_ptr, z_ptr, o_ptr,  # S_ptr: (B, H, D, D), z_ptr: (B, H, D) fp32; o: (B, N, H, D)
    N, H, tokens_per_program, eps,
    stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh, stride_cn,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COS_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, HI_LO: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr,
):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    n = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < D
    dtype = q_ptr.dtype.element_ty
    # S^T (BLOCK_D, BLOCK_D), as hi + lo in q's dtype: S to ~16 significant bits
    St = tl.load(S_ptr + bh * D * D + c[None, :] * D + c[:, None], mask=c_ok[:, None] & c_ok[None, :], other=0.0)
    St_hi, St_lo = _hi_lo(St, dtype, UPCAST)
    z = tl.load(z_ptr + bh * D + c, mask=c_ok, other=0.0)
    if NORM:
        w = tl.load(w_ptr + h * D + c, mask=c_ok, other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    o_base = o_ptr + b * stride_ob + h * stride_oh
    start = tile * tokens_per_program
    end = tl.minimum(start + tokens_per_program, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + n
        ok = (rows < end)[:, None] & c_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + c[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM:  # q from its projection: relu(u w); its RMS would cancel (the top of linear_attention.py)
            q = _relu(q * w[None, :])
        hi, lo = _hi_lo(_rope(q, cos_ptr, sin_ptr, rows, end, stride_cn, D, BLOCK_N, BLOCK_D, COS_ALIGN),
                        dtype, UPCAST)  # R q
        num = tl.dot(hi, St_hi, input_precision=PRECISION)
        if HI_LO:  # lo x lo lies below the fp32 rounding of the sum
            num = tl.dot(lo, St_hi, num, input_precision=PRECISION)
            num = tl.dot(hi, St_lo, num, input_precision=PRECISION)
        # the normalizer uses the un-rotated q; eps in fp32: inductor passes a Python float as fp64, which made the
        # division below fp64 (found when this kernel took 0.48 ms a block in the compiled pass, 0.15 ms alone)
        den = tl.sum(q * z[None, :], axis=1) + tl.cast(eps, tl.float32)
        tl.store(o_base + rows[:, None] * stride_on + c[None, :], (num / den[:, None]).to(o_ptr.dtype.element_ty),
                 mask=ok)


def _check(q, k, v, cos, sin, S0, z0, w_q, w_k, r_k):
    B, N, H, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"linear_attention: q, k, v must share one (B, N, H, d) shape, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if d % 2 or cos.shape != (N, d // 2) or sin.shape != (N, d // 2):
        raise ValueError(f"linear_attention: head dim {d} must be even and cos, sin (N, d/2) = {(N, d // 2)}, "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if q.numel() >= 2**31:
        raise ValueError(f"linear_attention: {tuple(q.shape)} is too large for the kernels' 32-bit offsets")
    if (S0 is None) != (z0 is None):
        raise ValueError("linear_attention: give both S0 and z0, or neither")
    if S0 is not None and (S0.shape != (B, H, d, d) or z0.shape != (B, H, d)):
        raise ValueError(f"linear_attention: S0, z0 must be {(B, H, d, d)}, {(B, H, d)}, got {tuple(S0.shape)}, "
                         f"{tuple(z0.shape)}")
    norm = [a is not None for a in (w_q, w_k, r_k)]
    if any(norm) and (not all(norm) or w_q.shape != (H * d,) or w_k.shape != (H * d,) or r_k.shape != (B, N)):
        raise ValueError(f"linear_attention: the q/k norm needs w_q, w_k ({H * d},) and r_k {(B, N)}, got "
                         f"{[None if a is None else tuple(a.shape) for a in (w_q, w_k, r_k)]}")


def _dot_meta(x: torch.Tensor, cos: torch.Tensor, block_n: int) -> dict:
    """Compile-time arguments common to both kernels, for (B, N, H, d) inputs like x, with tiles of up to block_n
    tokens."""
    d, interpret = x.shape[-1], os.environ.get("TRITON_INTERPRET") == "1"
    exact = x.dtype == torch.float32 or interpret  # fp32 operands, multiplied exactly
    stride = cos.stride(0)
    block_n, stages = _tiling(x, block_n)
    return dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),  # >= 16: the smallest matrix-product side
                BLOCK_N=block_n, COS_ALIGN=min(16, stride & -stride),  # a power of 2 dividing the row stride
                PRECISION="ieee" if exact else None, HI_LO=CONFIG.hi_lo and x.dtype != torch.float32,
                UPCAST=interpret, num_stages=stages)


def chunk_state_triton(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       w: torch.Tensor | None = None, r: torch.Tensor | None = None):
    """Pass 1: (S_c, z_c) of the chunk, fp32. k, v: (B, N, H, d), last dim contiguous; cos, sin fp32 contiguous;
    w (H * d,), r (B, N) fp32 contiguous: k is a projection, normed here as relu(k w) r."""
    B, N, H, d = k.shape
    meta = _dot_meta(v, cos, CONFIG.state_block_n)
    tiles = triton.cdiv(N, meta["BLOCK_N"])
    splits = max(1, min(tiles, CONFIG.state_programs // (B * H)))
    per_split = triton.cdiv(tiles, splits) * meta["BLOCK_N"]  # tokens per program, whole tiles
    splits = triton.cdiv(N, per_split)
    S_part = triton_common.empty((splits, B, H, d, d), torch.float32, k.device)
    z_part = triton_common.empty((splits, B, H, d), torch.float32, k.device)
    wrap_triton(_chunk_state_kernel)[(splits, B * H)](  # without w and r, cos stands in (NORM off: never read)
        k, v, cos, sin, cos if w is None else w, cos if r is None else r, S_part, z_part, N, H, per_split,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), cos.stride(0),
        num_warps=CONFIG.state_warps, NORM=w is not None, **meta)
    return S_part.sum(0), z_part.sum(0)  # a fixed-order sum: deterministic, unlike atomics


def chunk_output_triton(q, cos, sin, S, z, eps: float, dtype: torch.dtype, w=None) -> torch.Tensor:
    """Pass 2: o (B, N, H, d) in `dtype` from q and the total (S, z), fp32 contiguous; w (H * d,) fp32: q is a
    projection, normed here as relu(q w)."""
    B, N, H, d = q.shape
    o = triton_common.empty((B, N, H, d), dtype, q.device)
    wrap_triton(_chunk_output_kernel)[(triton.cdiv(N, CONFIG.out_tokens), B * H)](  # without w, cos stands in
        q, cos, sin, cos if w is None else w, S, z, o, N, H, CONFIG.out_tokens, eps,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), cos.stride(0),
        num_warps=CONFIG.out_warps, NORM=w is not None, **_dot_meta(q, cos, CONFIG.out_block_n))
    return o


@triton_op("longsana::linear_attention", mutates_args=())
def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    S0: torch.Tensor | None, z0: torch.Tensor | None, eps: float,
    w_q: torch.Tensor | None = None, w_k: torch.Tensor | None = None, r_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns o (B, N, H, d) in v's dtype and this chunk's own (S_c, z_c), fp32. With w_q, w_k (H * d,) and r_k
    (B, N), q and k are projections: the kernels norm them as `_reference_op` in linear_attention.py says."""
    _check(q, k, v, cos, sin, S0, z0, w_q, w_k, r_k)
    dtype = v.dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # other strides are free
    cos, sin = (x.float().contiguous() for x in (cos, sin))
    w_q, w_k, r_k = (None if x is None else x.float().contiguous() for x in (w_q, w_k, r_k))
    S_c, z_c = chunk_state_triton(k, v, cos, sin, w_k, r_k)
    S, z = (S_c + S0.float(), z_c + z0.float()) if S0 is not None else (S_c, z_c)
    return chunk_output_triton(q, cos, sin, S.contiguous(), z.contiguous(), eps, dtype, w_q), S_c, z_c
