"""What a stream yields: one decoded chunk of frames and where it sits in the video. Torch-free, so that the server
and its synthetic test source can share it without importing the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Chunk:
    frames: np.ndarray  # uint8 (n, H, W, 3)
    index: int  # chunk index in the stream
    start_frame: int  # video frame index of frames[0]; below the end of the last chunk after a switch or a rewind:
    # the frames handed out from there on are replaced (drop them), so the video has no gap and no repeat
    prompt: str  # the prompt this chunk was generated with (the one it moves to, during a transition)
    prompt_seq: int  # increments with each switch that took effect; a rewind restores the value it had there
    gen_seconds: float  # wall time spent generating (and decoding) this chunk; a chunk handed out in pieces has it
    # on its last piece, 0 on the others
    request: int = 0  # the last set_prompt / rewind call applied before this chunk (the id it returned; 0: none)
    gen_frames: int = 0  # the frames gen_seconds made: the whole chunk's, on its last piece (given a time and
    # no count, its own)

    def __post_init__(self):
        if self.ends_chunk and not self.gen_frames:
            self.gen_frames = len(self.frames)

    @property
    def ends_chunk(self) -> bool:
        """Whether this is its chunk's last piece (or the whole chunk): the one with gen_seconds and gen_frames."""
        return self.gen_seconds > 0

    @property
    def seconds_per_frame(self) -> float | None:
        """Generation time per frame of the chunk this piece ends (None on a piece that ends none)."""
        return self.gen_seconds / self.gen_frames if self.ends_chunk else None
