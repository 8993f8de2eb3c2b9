"""Block linear attention of one chunk: ReLU kernel, RoPE on the numerator only, carried running sums.

For the tokens i of a chunk, with a state (S0, z0) summed over all earlier chunks:

    S_c = sum_j v_j (R_j k_j)^T        z_c = sum_j k_j          (j over the chunk's tokens)
    o_i = (S0 + S_c) (R_i q_i) / ((z0 + z_c) . q_i + eps)

q, k arrive RMS-normed and ReLU'd, or, with `qk_norm`, as their projections u, normed here: q = relu(rms(u_q) w_q),
k = relu(rms(u_k) w_k), the RMS over all heads' channels of a token (SANA's q/k RMSNorm, then the ReLU kernel).
R_i rotates adjacent channel pairs (2m, 2m+1) by the angle whose cos/sin are given per token. The d x d products and
the normalizer are accumulated in fp32 whatever the input dtype. A whole bidirectional clip is the special case
S0 = 0, z0 = 0.

Why the norm belongs here: o_i does not change when q_i is scaled (numerator and normalizer scale alike, up to eps),
so the kernels take q_i = relu(u_q,i w_q) and never need q's per-token RMS; k's, one number a token, comes from a
reduction over u_k (r_k), and k_j = r_k,j relu(u_k,j w_k) is formed as the tile is loaded. Unfused, the norms read and
wrote q and k once more (2.5 ms of a 105 ms pass at 480p on an H100). What the scale of q changes is eps's share of
the normalizer: eps / (z . q_i) instead of eps / (z . q_i rms(u_q,i)), both far below fp32 rounding for any q that
is not all zeros (eps 1e-8 against a z summed over thousands of tokens).

This file holds the plain PyTorch reference, which faster implementations must match, and the entry point
`linear_attention`, which runs the Triton kernels (triton_linear_attention.py) on CUDA tensors and the reference
elsewhere (kernels/backend.py); either way differentiable (the Triton op's backward is the reference's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton

if HAS_TRITON:
    from longsana.kernels.triton_linear_attention import linear_attention_triton, supports


class QKNorm(NamedTuple):
    """The RMSNorm weights (H * d,) of q and k and its eps: linear_attention's `qk_norm`."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    eps: float


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, kept, the mean square in fp32 (as diffusers and the original)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / RMS(x) over the last dim (`inverse_rms`), in weight's dtype, times weight."""
    return rms_scaled(x, inverse_rms(x, eps), weight)


def rms_scaled(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rms_norm`'s arithmetic with x's 1/RMS given (r, broadcast over the last dim): x r in weight's dtype, times
    weight."""
    return (x * r).to(weight.dtype) * weight


def normalized_qk(q: torch.Tensor, k: torch.Tensor, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, H, d) projections -> relu(rms_norm(.)), the RMS over each token's H * d channels."""
    return tuple(F.relu(rms_norm(u.flatten(-2), w, norm.eps)).view_as(u) for u, w in ((q, norm.w_q), (k, norm.w_k)))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 for fp64 inputs (which makes the reference an fp64 oracle for the kernels' tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs. x: (B, N, H, d); cos, sin: (N, d/2) fp32. Returns fp32 (fp64 for fp64 x)."""
    x1, x2 = _wide(x).unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, d/2) each
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def chunk_state(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """This chunk's contribution to the running sums: S_c (B, H, d, d) and z_c (B, H, d), fp32."""
    kr = apply_rope(k, cos, sin)
    S = torch.einsum("bnhv,bnhk->bhvk", _wide(v), kr)
    z = _wide(k).sum(dim=1)
    return S, z


def linear_attention_ref(q, k, v, cos, sin, S0=None, z0=None, eps: float = 1e-8, return_state: bool = False):
    """Reference. q, k, v: (B, N, H, d); cos, sin: (N, d/2); S0: (B, H, d, d) fp32; z0: (B, H, d) fp32.

    Returns o (B, N, H, d) in v's dtype, and (S_c, z_c) when return_state.
    """
    S, z = chunk_state(k, v, cos, sin)
    S_c, z_c = S, z
    if S0 is not None:
        S, z = S + S0, z + z0
    qr = apply_rope(q, cos, sin)
    num = torch.einsum("bhvk,bnhk->bnhv", S, qr)
    den = torch.einsum("bhk,bnhk->bnh", z, _wide(q)) + eps
    o = (num / den[..., None]).to(v.dtype)
    return (o, (S_c, z_c)) if return_state else o


def _reference_op(q, k, v, cos, sin, S0, z0, eps: float, w_q=None, w_k=None, r_k=None):
    """The reference with the Triton op's signature and outputs (o, S_c, z_c): its backward. With weights, q and k are
    projections normed as the kernels norm them: q by w_q only, k by w_k and its per-token 1/RMS r_k (B, N)."""
    if w_q is not None:
        q, k = F.relu(_wide(q) * w_q.view_as(q[0, 0])), F.relu(_wide(k) * w_k.view_as(k[0, 0])) * r_k[..., None, None]
    o, (S_c, z_c) = linear_attention_ref(q, k, v, cos, sin, S0, z0, eps, return_state=True)
    return o, S_c, z_c


if HAS_TRITON:
    register_reference_backward(linear_attention_triton, _reference_op)


def linear_attention(q, k, v, cos, sin, S0=None, z0=None, eps: float = 1e-8, return_state: bool = False,
                     backend: str | None = None, qk_norm: QKNorm | None = None):
    """`linear_attention_ref`'s contract, run by the Triton kernels where `use_triton` says so and a tiling of theirs
    fits the device (`supports`). With `qk_norm`, q and k are their projections, normed here (see the top)."""
    if not use_triton(v, backend) or not supports(v):
        if qk_norm is not None:
            q, k = normalized_qk(q, k, qk_norm)
        return linear_attention_ref(q, k, v, cos, sin, S0, z0, eps, return_state)
    w_q = w_k = r_k = None
    if qk_norm is not None:  # k's per-token 1/RMS: a reduction that the compiled block fuses with k's producer
        w_q, w_k, r_k = qk_norm.w_q, qk_norm.w_k, inverse_rms(k.flatten(-2), qk_norm.eps)[..., 0]
    o, S_c, z_c = linear_attention_triton(q, k, v, cos, sin, S0, z0, eps, w_q, w_k, r_k)
    return (o, (S_c, z_c)) if return_state else o
