"""Which implementation a kernel entry point runs: Triton on CUDA tensors, the plain PyTorch reference elsewhere.

longsana.kernels holds Triton kernels beside their plain PyTorch references; the entry points are
`linear_attention.linear_attention` and `ln_modulate.ln_modulate`, each choosing per call through `use_triton`.
Both implementations are differentiable: a Triton op's backward is its reference's, recomputed from the op's
inputs (`register_reference_backward`), so training runs the same entry points as inference.

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


def use_triton(x: torch.Tensor, backend: str | None = None, auto: bool = True) -> bool:
    """True when a call on `x` should run the Triton kernel. auto=False: a kernel that "auto" leaves out (one
    measured slower than the compiled reference), run only when asked for by name."""
    backend = backend or BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend (argument or LONGSANA_KERNELS) must be one of {BACKENDS}, not {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return auto and HAS_TRITON and x.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' asked for, but triton (or torch.library.triton_op) is not available")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1")
    return True


def register_reference_backward(op, reference) -> None:
    """Give a Triton op (torch.library.triton_op) a backward: the vector-Jacobian product of `reference`, which takes
    the op's arguments and returns what the op returns, at the saved inputs (torch.func.vjp: traceable by
    torch.compile). The forward keeps only the inputs: the reference's activations are recomputed in the backward."""

    def setup_context(ctx, inputs, output):
        ctx.constants = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))

    def backward(ctx, *grads):
        args = [c if t is None else t for t, c in zip(ctx.saved_tensors, ctx.constants)]
        wrt = [i for i, needed in enumerate(ctx.needs_input_grad) if needed]

        def of_wrt(*xs):
            full = list(args)
            for i, x in zip(wrt, xs):
                full[i] = x
            out = reference(*full)
            return out if isinstance(out, tuple) else (out,)

        outs, vjp = torch.func.vjp(of_wrt, *(args[i] for i in wrt))
        grads_in = vjp(tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs)))
        out = [None] * len(args)
        for i, g in zip(wrt, grads_in):
            out[i] = g
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
