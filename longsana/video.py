"""Writing frames to an H.264 MP4 as they are made.

The MP4 is fragmented (an empty moov up front, a fragment per keyframe, a keyframe every second), so a run that
is killed part-way leaves a playable file of everything up to the last whole second.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


class VideoWriter:
    def __init__(self, path: str | Path, width: int, height: int, fps: int, crf: int = 18):
        """`fps`: the model's (ModelSpec.fps, a stream's .fps)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames = 0
        self._out = av.open(str(self.path), mode="w", format="mp4", options={
            "movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": "1000000",
            "flush_packets": "1"})
        self._s = self._out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast"})
        self._s.width, self._s.height, self._s.pix_fmt = width, height, "yuv420p"
        self._s.codec_context.gop_size = fps

    def write(self, frames: np.ndarray) -> None:
        """frames: uint8 (n, H, W, 3) RGB."""
        for f in frames:
            self._mux(self._s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        self.frames += len(frames)

    def _mux(self, packets) -> None:
        for p in packets:
            self._out.mux(p)

    def close(self) -> None:
        if self._out is not None:
            self._mux(self._s.encode(None))
            self._out.close()
            self._out = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
