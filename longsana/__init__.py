"""LongSANA: real-time streaming long-video generation with a block-causal linear-attention diffusion transformer."""

__version__ = "0.1.0"
