"""Compute kernels: Triton beside plain PyTorch references. Entry points: `linear_attention.linear_attention`,
`ln_modulate.ln_modulate`; each picks an implementation per call (backend.py)."""
