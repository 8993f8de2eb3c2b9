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


def _check_size(width: int, height: int) -> None:
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: H.264 4:2:0 needs even sides of at least 16 pixels")


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
    """Everything a stream sent, as an H.264 elementary stream on disk (memory stays flat however long it runs).

    `append` runs on the encoder thread and `to_mp4` on a worker thread: the frame count is read under a lock and
    the remux stops there, so a packet being written concurrently is never included.
    """

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.frames = self.bytes = 0
        self.full = False  # set once max_bytes is reached; the recording then keeps its first part
        self._file = open(path, "wb")
        self._lock = threading.Lock()

    def append(self, packet: bytes) -> None:
        with self._lock:
            if self._file.closed or self.full:
                return
            if self.bytes + len(packet) > self.max_bytes:
                self.full = True
                return
            self._file.write(packet)
            self._file.flush()
            self.frames += 1
            self.bytes += len(packet)

    def to_mp4(self, dst: Path, fps: int) -> int:
        """Remux the frames recorded so far into an MP4 at `fps` (no re-encoding); returns the frame count."""
        with self._lock:
            frames = self.frames
        if frames == 0:
            raise ValueError("nothing has been streamed yet")
        with av.open(str(self.path), format="h264") as src, av.open(str(dst), "w", format="mp4") as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            stream.time_base = time_base = Fraction(1, fps)  # the muxer changes stream.time_base when it starts
            n = 0
            for packet in src.demux(src.streams.video[0]):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packet.pts = packet.dts = n  # one packet per frame, no B-frames: pts = dts = frame number
                packet.duration, packet.time_base, packet.stream = 1, time_base, stream
                out.mux(packet)
                n += 1
                if n == frames:
                    break
        return n

    def close(self) -> None:
        with self._lock:
            self._file.close()
        self.path.unlink(missing_ok=True)
