"""Compute kernels (Triton) beside plain PyTorch references."""
