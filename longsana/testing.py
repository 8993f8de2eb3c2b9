"""Random weights and the error metric shared by the tests and the benchmarks.

Speed does not depend on weight values, but a comparison or a timing on zeros proves nothing, so both use
non-degenerate random weights: no branch of the network is silently inert.
"""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter, on its own device: weights ~ N(0, 1/fan_in), norm weights around 1, biases and
    modulation tables small but non-zero."""
    g = None
    for name, p in module.named_parameters():
        g = g or torch.Generator(p.device).manual_seed(seed)
        r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if "norm" in owner:
            r = 1 + 0.2 * r
        elif p.ndim <= 1 or "scale_shift_table" in name:
            r = 0.2 * r
        else:
            r = r / p[0].numel() ** 0.5
        p.copy_(r)
    return module
