"""What a stream yields: one decoded chunk of frames and where it sits in the video. Torch-free, so that the server
and its synthetic test source can share it without importing the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Chunk:
    frames: np.ndarray  # uint8 (n, H, W, 3)
    index: int  # chunk index in the stream
    start_frame: int  # video frame index of frames[0] (goes back after a rewind)
    prompt: str  # the prompt this chunk was generated with
    prompt_seq: int  # increments with each set_prompt call that took effect
    gen_seconds: float  # wall time spent generating (and decoding) this chunk
