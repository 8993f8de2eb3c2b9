"""Block linear attention of one chunk: ReLU kernel, RoPE on the numerator only, carried running sums.

For the tokens i of a chunk, with a state (S0, z0) summed over all earlier chunks:

    S_c = sum_j v_j (R_j k_j)^T        z_c = sum_j k_j          (j over the chunk's tokens)
    o_i = (S0 + S_c) (R_i q_i) / ((z0 + z_c) . q_i + eps)

q, k arrive already RMS-normed and ReLU'd. R_i rotates adjacent channel pairs (2m, 2m+1) by the angle whose
cos/sin are given per token. The d x d products and the normalizer are accumulated in fp32 whatever the input
dtype. A whole bidirectional clip is the special case S0 = 0, z0 = 0.

This file holds the plain PyTorch reference, which faster implementations must match, and the entry point
`linear_attention`, which runs the Triton kernels (triton_linear_attention.py) on CUDA tensors and the reference
elsewhere (kernels/backend.py); either way differentiable (the Triton op's backward is the reference's).
"""

from __future__ import annotations

import torch

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton

if HAS_TRITON:
    from longsana.kernels.triton_linear_attention import linear_attention_triton, supports


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


def _reference_op(q, k, v, cos, sin, S0, z0, eps: float):
    """The reference with the Triton op's signature and outputs (o, S_c, z_c): its backward."""
    o, (S_c, z_c) = linear_attention_ref(q, k, v, cos, sin, S0, z0, eps, return_state=True)
    return o, S_c, z_c


if HAS_TRITON:
    register_reference_backward(linear_attention_triton, _reference_op)


def linear_attention(q, k, v, cos, sin, S0=None, z0=None, eps: float = 1e-8, return_state: bool = False,
                     backend: str | None = None):
    """`linear_attention_ref`'s contract, run by the Triton kernels where `use_triton` says so and a tiling of theirs
    fits the device (`supports`)."""
    if not use_triton(v, backend) or not supports(v):
        return linear_attention_ref(q, k, v, cos, sin, S0, z0, eps, return_state)
    o, S_c, z_c = linear_attention_triton(q, k, v, cos, sin, S0, z0, eps)
    return (o, (S_c, z_c)) if return_state else o
