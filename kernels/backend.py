"""Which implementation a kernel entry point runs: Triton on CUDA tensors, the plain PyTorch reference elsewhere.

longsana.kernels holds Triton kernels beside their plain PyTorch references; the entry points are
`linear_attention.linear_attention` and `ln_modulate.ln_modulate`, each choosing per call through `use_triton`.

`LONGSANA_KERNELS=torch` (read once, at import) or `backend="torch"` forces the reference everywhere;
`backend="triton"` forces Triton, which on CPU tensors needs Triton's interpreter: `TRITON_INTERPRET=1` in the
environment before `import triton` (Triton's own library functions are decorated at import). That is how the
kernels are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")
BACKEND = os.environ.get("LONGSANA_KERNELS", "auto")
BACKENDS = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor, backend: str | None = None) -> bool:
    """True when a call on `x` should run the Triton kernel."""
    backend = backend or BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend (argument or LONGSANA_KERNELS) must be one of {BACKENDS}, not {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and x.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' asked for, but triton (or torch.library.triton_op) is not available")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1")
    return True
