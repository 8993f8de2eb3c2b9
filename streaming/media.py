"""Encoding what a stream sends, once: H.264 for WebRTC and the MP4 recording, JPEG for the WebSocket fallback.

H.264 is encoded here with libx264 (zerolatency: one packet out per frame in, no B-frames, SPS/PPS in-band before
each keyframe) rather than by aiortc, because the same packets then serve both the WebRTC sender (aiortc passes
pre-encoded packets through) and the recording, which is remuxed to MP4 without re-encoding. Keyframes come every
KEYFRAME_SECONDS since aiortc cannot forward a browser's keyframe request to a pass-through source.
The WebSocket fallback sends JPEG images: they decode anywhere, including pages that are not a secure context
(WebCodecs is only offered to https:// and localhost pages).
"""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

KEYFRAME_SECONDS = 2
H264_BITRATE = 2_500_000
JPEG_QUANTIZER = 6  # MJPEG quantizer, 2 (best) .. 31
MIN_SIDE = 16  # pixels; H.264 4:2:0 also needs even sides


def _check_size(width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: H.264 4:2:0 needs even sides of at least {MIN_SIDE} pixels")


class H264Encoder:
    def __init__(self, width: int, height: int, fps: int):
        _check_size(width, height)
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base, ctx.framerate = Fraction(1, fps), fps
        ctx.bit_rate = H264_BITRATE
        keyint = KEYFRAME_SECONDS * fps
        ctx.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                       "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:repeat-headers=1"}
        self._ctx, self._n = ctx, 0

    def encode(self, image: av.VideoFrame) -> av.Packet:
        image.pts, self._n = self._n, self._n + 1
        packets = self._ctx.encode(image)
        if len(packets) != 1:  # zerolatency never buffers; anything else would break the 1:1 frame/packet pairing
            raise RuntimeError(f"libx264 returned {len(packets)} packets for one frame")
        return packets[0]


class JpegEncoder:
    def __init__(self, width: int, height: int, fps: int):
        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuvj420p"
        ctx.time_base = Fraction(1, fps)
        ctx.options = {"qmin": str(JPEG_QUANTIZER), "qmax": str(JPEG_QUANTIZER)}  # constant quality
        self._ctx = ctx

    def encode(self, image: av.VideoFrame) -> bytes:
        (packet,) = self._ctx.encode(image.reformat(format="yuvj420p"))
        return bytes(packet)


def to_video_frame(rgb: np.ndarray) -> av.VideoFrame:
    """(H, W, 3) uint8 -> a yuv420p frame, the format both libx264 and aiortc's own encoders take."""
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")


class Recording:
    """Everything a stream sent, muxed once, as it is sent, into a fragmented MP4 on disk (one fragment per frame,
    no re-encoding): memory stays flat however long the stream runs, and the file's first `size` bytes are always
    a complete MP4 that a download serves as it is.

    `append` runs on the encoder thread; `size` and `frames` are read under the lock by the event loop. The muxer
    writes a frame's fragment when the next frame comes, so the file holds all frames but the last one appended.
    """

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.frames = self.size = 0  # complete frames and the bytes that hold them (and the header)
        self.full = False  # set once max_bytes is reached; the recording then keeps its first part
        self._out = self._stream = None
        self._muxed, self._closed = 0, False
        self._lock = threading.Lock()

    def append(self, packet: av.Packet, fps: int) -> None:
        with self._lock:
            if self.full or self._closed:
                return
            if self._out is None:
                self._open(fps)
            if self.size + packet.size > self.max_bytes:
                self.full = True
                return
            copy = av.Packet(bytes(packet))  # the original goes on to WebRTC with timestamps of its own
            copy.is_keyframe, copy.stream = packet.is_keyframe, self._stream
            copy.pts = copy.dts = self._muxed  # one packet per frame, no B-frames: pts = dts = frame number
            copy.duration, copy.time_base = 1, Fraction(1, fps)
            self._out.mux(copy)
            self._muxed += 1
            self.frames, self.size = self._muxed - 1, self.path.stat().st_size

    def _open(self, fps: int) -> None:
        # empty_moov: the header first; frag_every_frame: each frame its own fragment, written when the next one
        # comes; flush_packets: each write reaches the file at once, so the file always ends on a fragment
        self._out = av.open(str(self.path), "w", format="mp4", options={
            "movflags": "empty_moov+default_base_moof+frag_every_frame", "flush_packets": "1"})
        self._stream = self._out.add_stream("h264", rate=fps)

    def close(self) -> None:
        """Finish the file: its last fragment is written, and `frames`, `size` then cover all of it. The file stays
        (its owner, the server, keeps it for downloads a while): `delete` removes it."""
        with self._lock:
            if self._out is not None and not self._closed:
                self._out.close()
                self.frames, self.size = self._muxed, self.path.stat().st_size
            self._closed = True

    def delete(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
