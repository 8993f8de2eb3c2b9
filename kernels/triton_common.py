"""What the Triton ops share: output allocation."""

from __future__ import annotations

import torch


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a Triton op writes is allocated here, so that tests can poison it (fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)
