"""Triton cross-attention to a short prompt; the semantics are `cross_attention_ref` in cross_attention.py.

One program per (tile of BLOCK_M query tokens, sample and head): it loads its q tile once, from the tokens' own
(B, N, H*d) rows, then streams the head's keys and values in tiles of BLOCK_L with the running maximum and sum of
flash attention, and writes its output tile once, into (B, N, H*d) rows. The prompt is short (L = 300 for LongSANA),
so the k and v of a head (about 134 KB in bf16) stay in L2 while the token tiles of that head, which run one after
another (the grid's first axis), read them: from memory, only q is read and the output written. Head dims that are
not powers of 2 (112, 40) are padded to the next one with masked loads and stores.

A prompt is padded to L = 300 tokens, of which a typical one uses a few dozen; the padding's bias (-10000) gives its
keys no weight. So a program first finds, in its sample's bias row, the last key whose bias is above NO_WEIGHT_BIAS,
and reads only the keys up to it: for a 20-token prompt one tile of keys instead of five. The keys left out are
those the reference weighs exp(bias + score - best score) with bias <= NO_WEIGHT_BIAS, which is 0 in fp32 unless the
key's score beats the prompt's best by some 900 (scores of RMS-normed q and k are a few tens at most), so the output
is what the reference computes from the whole row. Padded keys are never read, so what they hold (even NaN) cannot
reach the output.

With NORM, q arrives as its projection u, and the scores of its RMSNorm (u r) w, r the token's 1/RMS, are taken
as r (u . (w k)): the entry point multiplies the prompt's keys by the norm's weight (L x H*d values, not N x H*d),
and the kernel scales each row's scores by its r with the softmax scale. The norm's pass that wrote q normed, and
this kernel's read of it, become a reduction that reads u once (the entry point's `inverse_rms`), and q goes to the
tensor cores as it is loaded: normed in registers instead, Triton loaded it again from shared memory for every key
tile (compiled for sm_90: 16 ldmatrix against 8 without the norm; the tests count them), and the kernel took 105
against 79 us a block at 18 kept keys, 269 against 218 at 300 (H100). The result is rms_norm's to rounding, not
bitwise: q normed is never rounded to the dtype, w k is.

Scores, the softmax and the accumulator are fp32; 16-bit inputs multiply on tensor cores in their dtype, the
probabilities rounded to it before the product with v (as flash attention does); fp32 inputs use exact fp32 ("ieee")
products. Triton's interpreter multiplies bf16 tiles as raw 16-bit integers, so under it (UPCAST) the operands,
already rounded to the input dtype, are multiplied in fp32, where their products are exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from longsana.kernels import triton_common

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the GPU's exponential is a base-2 one


@dataclass
class CrossAttentionConfig:
    """The tiling of 16-bit inputs: the fastest of 8 timed on an H100 at a chunk's 15,600 tokens, 20 heads of 112, for
    prompts of 18 and of 120 tokens (benchmarks/RESULTS.md, 2026-12-07)."""
    block_m: int = 64  # query tokens per program
    block_l: int = 64  # keys per tile
    num_stages: int = 1
    num_warps: int = 4


CONFIG = CrossAttentionConfig()
# fp32 inputs: exact fp32 products, no tensor cores; a tiling that neither spills nor outgrows any GPU's shared memory
# (99 KB a block on Ada)
FP32_TILING = CrossAttentionConfig(block_m=64, block_l=32, num_stages=2, num_warps=8)
MAX_HEAD_DIM = 128  # padded to BLOCK_D = 128; larger head dims go to the reference (`supports`)
MAX_KEYS = 1024  # a program holds a sample's whole bias row; longer prompts go to the reference
NO_WEIGHT_BIAS = -1000.0  # at or below: a key without weight (the padding's -10000 is; exp(-1000) is 0 in fp32)


@triton.jit
def _cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr,  # q, o: (B, N, H*D) rows; k, v: (B, H, L, D); bias: (B, ..., L) or none
    r_ptr,  # read if NORM: q's tokens' 1/RMS (B, N) fp32
    N, L, H, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    stride_qb, stride_qn, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_bb, stride_bl,
    stride_ob, stride_on,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_ALL_L: tl.constexpr, NO_WEIGHT: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, LOG2E: tl.constexpr,
):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < D
    q_ok = (rows < N)[:, None] & c_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + rows[:, None] * stride_qn + h * D + c[None, :], mask=q_ok, other=0.0)
    dtype = q.dtype
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # the running maximum of a row's scores (base 2)
    s_sum = tl.zeros((BLOCK_M,), tl.float32)  # the running sum of exp2(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # qk_scale in fp32: inductor passes a Python float as fp64, which would carry the scores into fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    if NORM:  # q is the projection u, k comes times q's norm weight: each row's scores scaled by its 1/RMS
        row_scale = tl.load(r_ptr + b * N + rows, mask=rows < N, other=0.0) * qk_scale
    keys_seen = L
    if HAS_BIAS:  # keys up to the last one with a weight (all if none has): the prompt without its padding
        every = tl.arange(0, BLOCK_ALL_L)
        row = tl.load(bias_ptr + b * stride_bb + every * stride_bl, mask=every < L, other=NO_WEIGHT)
        last = tl.max(tl.where(row.to(tl.float32) > NO_WEIGHT, every, -1), axis=0)
        keys_seen = tl.where(last >= 0, last + 1, L)
    for l0 in range(0, keys_seen, BLOCK_L):
        keys = l0 + tl.arange(0, BLOCK_L)
        key_ok = keys < keys_seen
        kv_ok = key_ok[:, None] & c_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kl + c[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vl + c[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_L)
        s = s * (row_scale[:, None] if NORM else qk_scale)  # base 2
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * stride_bb + keys * stride_bl, mask=key_ok, other=0.0)
            s += bias.to(tl.float32)[None, :] * LOG2E
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite from the first tile on: key 0 is always there
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        p = p.to(dtype)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    o = acc / s_sum[:, None]
    tl.store(o_ptr + b * stride_ob + rows[:, None] * stride_on + h * D + c[None, :], o.to(o_ptr.dtype.element_ty),
             mask=q_ok)


def tiling(dtype: torch.dtype) -> CrossAttentionConfig:
    return FP32_TILING if dtype == torch.float32 else CONFIG


def supports(k: torch.Tensor) -> bool:
    """Whether the kernel takes prompt keys like k (B, H, L, d): head dims up to MAX_HEAD_DIM, up to MAX_KEYS keys,
    16- and 32-bit."""
    return (k.shape[-1] <= MAX_HEAD_DIM and k.shape[2] <= MAX_KEYS
            and k.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _check(q, k, v, bias, w, r):
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"cross_attention: q must be (B, N, H*d) and k, v one (B, H, L, d) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, d = k.shape
    if q.shape[0] != B or q.shape[2] != H * d or L == 0:
        raise ValueError(f"cross_attention: q {tuple(q.shape)} does not fit k, v {tuple(k.shape)} (or no keys)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"cross_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias is not None and (bias.ndim != 4 or bias.shape[1:3] != (1, 1) or bias.shape[-1] != L
                             or bias.shape[0] not in (1, B)):
        raise ValueError(f"cross_attention: bias must be (B, 1, 1, L) = {(B, 1, 1, L)}, got {tuple(bias.shape)}")
    if q.numel() >= 2**31:
        raise ValueError(f"cross_attention: {tuple(q.shape)} is too large for the kernel's 32-bit offsets")
    if (w is None) != (r is None) or w is not None and (w.shape != (H * d,) or w.dtype != q.dtype
                                                        or r.shape != q.shape[:2] or r.dtype != torch.float32):
        raise ValueError(f"cross_attention: q's norm needs its weight ({H * d},) in {q.dtype} and fp32 1/RMS "
                         f"{tuple(q.shape[:2])}, got {None if w is None else (tuple(w.shape), w.dtype)}, "
                         f"{None if r is None else (tuple(r.shape), r.dtype)}")


@triton_op("longsana::cross_attention", mutates_args=())
def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                           w: torch.Tensor | None = None, r: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, N, H*d); k, v: (B, H, L, d); bias: (B, 1, 1, L) or None. Returns (B, N, H*d) in q's dtype. With w
    (H*d,) and r (B, N) fp32, q is a projection, RMS-normed here: q r w, as r (q . (w k))."""
    _check(q, k, v, bias, w, r)
    B, H, L, d = k.shape
    if w is not None:  # (u r w) . k = r (u . (w k)): the weight on the prompt's few keys, r on the scores
        k, r = (k.float() * w.float().view(H, 1, d)).to(k.dtype), r.contiguous()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # other strides are free
    N = q.shape[1]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    t = tiling(q.dtype)
    o = triton_common.empty(q.shape, q.dtype, q.device)
    bias_strides = (0, 0) if bias is None else (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(-1))
    wrap_triton(_cross_attention_kernel)[(triton.cdiv(N, t.block_m), B * H)](
        q, k, v, q if bias is None else bias, o, q if r is None else r,  # q in place of what is never read
        N, L, H, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *bias_strides, o.stride(0), o.stride(1),
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=t.block_m, BLOCK_L=t.block_l,
        HAS_BIAS=bias is not None, BLOCK_ALL_L=triton.next_power_of_2(L), NO_WEIGHT=NO_WEIGHT_BIAS, NORM=w is not None,
        PRECISION="ieee" if q.dtype == torch.float32 or interpret else None, UPCAST=interpret,
        LOG2E=LOG2E, num_stages=t.num_stages, num_warps=t.num_warps)
    return o
