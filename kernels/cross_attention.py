"""Cross-attention from the video tokens to the prompt: softmax(q k^T / sqrt(d) + bias) v, per head.

q comes as the block's tokens (B, N, H*d), the layout of the q projection's output and of the out projection's
input; the prompt's k, v come as (B, H, L, d), computed once per prompt (`model.TextKV`); bias (B, 1, 1, L) is the
prompt's padding (0 to keep, -10000 to drop; a blend of two prompts gives values between) or None. The output is
(B, N, H*d), ready for the out projection.

This file holds the plain PyTorch reference, which faster implementations must match (PyTorch's
scaled_dot_product_attention between two transposes), and the entry point `cross_attention`, which runs the Triton
kernel (triton_cross_attention.py) on GPUs where TRITON_AUTO says so and the reference elsewhere, or either by name
(backend=, LONGSANA_KERNELS). The kernel reads q and writes the output once, in the tokens' own layout (no
transposed copies), reads only the keys the prompt uses (the text encoder pads every prompt to 300 tokens; a typical
one uses a few dozen), and takes q's RMSNorm with it (`q_norm`). Either way differentiable (the Triton op's backward
is the reference's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longsana.kernels.backend import HAS_TRITON, register_reference_backward, use_triton
from longsana.kernels.linear_attention import inverse_rms, rms_norm, rms_scaled

if HAS_TRITON:
    from longsana.kernels.triton_cross_attention import cross_attention_triton, supports

TRITON_AUTO = True  # "auto" runs the kernel on GPUs: faster than cuDNN's attention for typical prompts (H100: 79
# against 191 us a block at 18 of the 300 tokens, 117 at 120), slower for one that fills the window (H200: 226 us)


def cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q: (B, N, H*d); k, v: (B, H, L, d); bias: (B, 1, 1, L) or None. Returns (B, N, H*d) in q's dtype."""
    qh = q.unflatten(-1, (k.shape[1], -1)).transpose(1, 2)  # (B, H, N, d)
    return F.scaled_dot_product_attention(qh, k, v, attn_mask=bias).transpose(1, 2).flatten(-2)


def _reference_op(q, k, v, bias, w=None, r=None):
    """The reference with the Triton op's signature: its backward. With w and r (1/RMS of q's rows), q is a projection
    normed as `rms_norm` norms it."""
    if w is not None:
        q = rms_scaled(q, r[..., None], w)
    return cross_attention_ref(q, k, v, bias)


if HAS_TRITON:
    register_reference_backward(cross_attention_triton, _reference_op)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    backend: str | None = None, q_norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """`cross_attention_ref`'s contract, run by the Triton kernel where `use_triton` says so and it takes the head
    dim and dtype (`supports`). With q_norm = (weight, eps), q is the projection and `rms_norm(q, weight, eps)` what
    attends: the kernel takes the norm inside, the weight on the keys and the tokens' 1/RMS (a reduction over q, read
    once) on the scores, instead of a norm that writes q normed and the kernel reading that back."""
    if not use_triton(q, backend, auto=TRITON_AUTO) or not supports(k):
        return cross_attention_ref(q if q_norm is None else rms_norm(q, *q_norm), k, v, bias)
    w, r = (None, None) if q_norm is None else (q_norm[0], inverse_rms(q, q_norm[1])[..., 0])
    return cross_attention_triton(q, k, v, bias, w, r)
