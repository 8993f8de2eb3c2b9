"""One viewer's stream: the generator on a producer thread, the encoders on an encoder thread, and a pacer on the
event loop that releases frames at the video's own rate with evenly spaced 90 kHz timestamps.

    producer thread --Handoff (1 chunk)--> encoder thread --credits (ENCODE_AHEAD frames)--> pacer --> transport

Back-pressure runs right to left: the pacer takes a frame only when it is due, the encoder waits for a credit, and
the producer asks the generator for chunk c+1 only once chunk c has started playing. The generator is therefore
one chunk ahead of the screen at most.

A new prompt names the frame on screen and the first frame the encoder has surely not taken (a rewind: the frame on
screen). The generator lands the switch a lead after the first (longsana/stream.py: the time to make the new frames,
while the screen plays on through the frames already encoded), not before the second, and goes back if it had made
frames past that point; the producer is let go at once, so the generator starts on it now rather than when the chunk
in hand starts playing. A chunk that starts before the end of what was handed over is such a cut: frames from its
start on that are still queued, or not yet encoded, are dropped, so the video goes on from the frame on screen with
no jump and no repeat. Frames already encoded are never dropped (the H.264 stream's references stay whole), so the
encoder holds at a switch's landing frame until the new frames come: where the lead was too short, the viewer waits
there (a stall) rather than seeing old frames that the new ones would then replace under the same indices. (A rewind
goes back on purpose: the few frames encoded past its point play first.)

Timestamps: frames are released every `step` seconds and their pts advance by exactly `step`, so the browser's
jitter buffer sees a steady source. `step` is the video's 1/fps, or the measured generation time per frame when the
generator is slower than real time (chunks are produced in bursts; spreading them evenly plays smoothly, where
sending at 1/fps would freeze between chunks). After a stall (a late chunk, a pause) the clock restarts at the
current time and the pts jump by the real gap: frames are never duplicated and never sent in a catch-up burst.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import av
import numpy as np

from longsana.streaming.media import H264Encoder, JpegEncoder, Recording, to_video_frame
from longsana.streaming.metrics import Metrics

CLOCK_RATE = 90_000  # RTP video clock
TIME_BASE = Fraction(1, CLOCK_RATE)
# Frames the encoder may have ready before the pacer asks for them: enough to ride out the encoder thread's hiccups
# on a busy CPU, and no more, since a switch lands past the frames already encoded (each one delays it a frame).
ENCODE_AHEAD = 2
STEP_MARGIN = 1.05  # pace slightly slower than a slow generator so that its bursts never run dry
# The generation rate is the median seconds per frame of the last SPF_CHUNKS chunks: one slow chunk (a busy
# machine's hiccup) must not slow the pace of the chunks after it; a stall has its own cure (the pacer's restart).
SPF_CHUNKS = 3
SEND_RATE_WINDOW = 2.0  # seconds over which stats() counts the frames sent
MAX_PROMPT_REQUESTS = 16  # prompt changes remembered for the switch latency
MAX_CUTS = 16  # cuts remembered for the frames still queued from before them


class StreamEnded(Exception):
    """The stream has no more frames: it was closed, or the generator finished or failed."""


@dataclass
class Frame:
    image: av.VideoFrame  # yuv420p
    packet: av.Packet  # its H.264 access unit
    jpeg: bytes | None  # its JPEG image, for WebSocket viewers
    index: int  # video frame index (chunk.start_frame + i)
    chunk: int
    prompt_seq: int
    request: int  # the generator's last request applied when the chunk was made (Chunk.request)
    announce: dict | None  # the chunk event, on a chunk's first frame
    pts: int = 0  # 90 kHz, set by the pacer


def check_frames(frames) -> None:
    """The generator's side of the contract: uint8 RGB frames (n, H, W, 3) in a numpy array."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        kind = f"{frames.dtype} {tuple(frames.shape)}" if hasattr(frames, "shape") else type(frames).__name__
        raise TypeError(f"chunk.frames must be a uint8 numpy array (n, H, W, 3), got {kind}")


class Handoff:
    """Chunks from the producer thread to the encoder thread, in order: `put` returns once the pacer has put the
    chunk's first frame on screen (`shown()`), so the generator starts chunk c+1 when chunk c starts playing and is
    never more than one chunk ahead of the screen; `hurry` lets a waiting (or the next) `put` return at once; `cut`
    drops what is queued from a video frame on."""

    def __init__(self):
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._closed = self._hurried = False
        self._put = self._shown = 0  # chunks handed over, chunks on screen (or dropped)

    def put(self, item) -> bool:
        """Hand over `item` and wait until it is on screen; False if the handoff was closed instead."""
        with self._cv:
            self._queue.append(item)
            self._put += 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._shown >= self._put or self._closed or self._hurried)
            self._hurried = False
            return not self._closed

    def get(self):
        """The next item; StreamEnded once the handoff is closed."""
        with self._cv:
            self._cv.wait_for(lambda: self._queue or self._closed)
            if self._closed:
                raise StreamEnded
            return self._queue.popleft()

    def shown(self) -> None:
        with self._cv:
            self._shown += 1
            self._cv.notify_all()

    def hurry(self) -> None:
        with self._cv:
            self._hurried = True
            self._cv.notify_all()

    def cut(self, frame: int) -> None:
        """Drop the queued frames from video frame `frame` on (items are (gen, Chunk))."""
        with self._cv:
            kept = deque()
            for gen, chunk in self._queue:
                if chunk.start_frame < frame:
                    kept.append((gen, dataclasses.replace(chunk, frames=chunk.frames[:frame - chunk.start_frame])))
                else:
                    self._shown += 1  # never shown: counted, so that the next put waits for its own chunk only
            self._queue = kept
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class Session:
    def __init__(self, sid: str, pipe, prompt: str, *, seed: int, stream_kwargs: dict, jpeg: bool,
                 recording: Recording, metrics: Metrics, loop: asyncio.AbstractEventLoop):
        self.sid, self.recording = sid, recording
        self.emit: Callable[[dict], None] = lambda message: None  # the transport's way to send an event
        self.fps = self.width = self.height = None  # known once the generator has started
        self.closing, self.end_reason = False, None
        self.closed = asyncio.Event()
        self.last_message = self.created = loop.time()
        self.pipe = pipe  # the generator's (with several GPUs, the server counts each worker's streams by it)
        self._prompt, self._seed, self._stream_kwargs, self._jpeg = prompt, seed, stream_kwargs, jpeg
        self._metrics, self._loop = metrics, loop
        self._stream = None
        self._lock = threading.Lock()  # guards _stream / _prompt between the producer and the event loop
        self._handoff = Handoff()
        self._credits = threading.Semaphore(ENCODE_AHEAD)
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue()  # bounded by the credits
        self._playing = asyncio.Event()
        self._playing.set()
        self._chunk_spf: deque[float] = deque(maxlen=SPF_CHUNKS)  # generation seconds per frame of recent chunks
        self._spf = 0.0  # their median (written by the encoder thread)
        self._frontier = 0  # video frame index after the last generated chunk (written by the producer)
        self._encoded = 0  # the next video frame index the encoder takes (written by the encoder)
        self._cut = threading.Condition()  # guards the cuts and the holds; the encoder waits on it at a hold
        self._gen = 0  # cuts so far (written by the producer); a chunk is handed over with the count at the time
        self._cuts: deque[tuple[int, int]] = deque(maxlen=MAX_CUTS)  # (gen after the cut, its first frame)
        self._holds: list[tuple[int, int]] = []  # (switch request, its landing frame), until a chunk answers it
        self._producing = True  # False once the producer has stopped: no cut will come any more
        self._due, self._pts = None, 0  # pacer clock: loop time the last frame was due, and its pts
        self._shown, self._prompt_seq = 0, 0  # after the last released frame: next frame index, its prompt_seq
        self._requests: dict[int, float] = {}  # the generator's request id -> loop time it came, until on screen
        self._send_times: deque[float] = deque(maxlen=256)  # release times, for the send rate
        self.frames_sent = self.chunks_generated = 0
        self.ttff = self.switch_latency = None
        self._control_jobs: set[Future] = set()  # set_prompt calls running on a control thread

    def start(self, threads: ThreadPoolExecutor) -> None:
        """Run the producer and the encoder, each on its own thread of `threads`, which must have two free."""
        self._threads_done = [asyncio.wrap_future(threads.submit(f)) for f in (self._produce, self._encode)]

    # -- threads ------------------------------------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        """Run fn(*args) on the event loop, from a stream thread (a no-op once the loop is gone)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed at shutdown
            pass

    def _produce(self) -> None:
        stream = None
        try:
            with self._lock:
                prompt = self._prompt
            stream = self.pipe.stream(prompt, seed=self._seed, **self._stream_kwargs)
            self.fps = stream.fps
            # the device worker serves first the stream whose viewer runs out of frames first
            stream.deadline = lambda: time.monotonic() + max(0, self._frontier - self._shown) / self.fps
            with self._lock:
                if self._prompt != prompt:  # changed while the stream was being created
                    stream.set_prompt(self._prompt)
                self._stream = stream
            if self.closing:  # the viewer left while the stream was being created
                return
            for chunk in stream:
                with self._cut:
                    if chunk.start_frame < self._frontier:  # the generator went back: drop what it replaces
                        self._gen += 1
                        self._cuts.append((self._gen, chunk.start_frame))
                        self._handoff.cut(chunk.start_frame)
                    self._holds = [h for h in self._holds if h[0] > chunk.request]  # answered: let the encoder go
                    self._cut.notify_all()
                self._frontier = chunk.start_frame + len(chunk.frames)
                if self.closing or not self._handoff.put((self._gen, chunk)):
                    return
            self.end_reason = "the generator finished"
        except Exception as e:  # the generator failed: tell the viewer, end this stream, keep the server up
            self._fail("generator", e)
        finally:
            if stream is not None:
                stream.deadline = None  # it refers to this session: no reference cycle outlives the stream
                stream.close()  # frees its GPU memory, from the thread that used it
            self._handoff.close()
            with self._cut:
                self._producing = False
                self._cut.notify_all()

    def _encode(self) -> None:
        h264 = jpeg = None
        try:
            while True:
                gen, chunk = self._handoff.get()
                check_frames(chunk.frames)
                if not len(chunk.frames):  # nothing to show: let the producer go on
                    self._handoff.shown()
                    continue
                if h264 is None:
                    _, self.height, self.width, _ = chunk.frames.shape
                    h264 = H264Encoder(self.width, self.height, self.fps)
                    jpeg = JpegEncoder(self.width, self.height, self.fps) if self._jpeg else None
                self._generated(chunk)
                announce = {"type": "chunk", "index": chunk.index, "start_frame": chunk.start_frame,
                            "frames": len(chunk.frames), "prompt": chunk.prompt, "prompt_seq": chunk.prompt_seq,
                            "gen_seconds": round(chunk.gen_seconds, 4),
                            "gen_frames": chunk.gen_frames}
                for i, rgb in enumerate(chunk.frames):
                    self._credits.acquire()  # a place in the pacer's queue first: what is encoded is committed
                    if self.closing:
                        return
                    if self._replaced(gen, chunk.request, chunk.start_frame + i):  # by a later cut: drop the rest
                        self._credits.release()
                        if i == 0:
                            self._handoff.shown()  # never shown: let the producer go on
                        break
                    image = to_video_frame(rgb)
                    packet = h264.encode(image)
                    self.recording.append(packet, self.fps)
                    frame = Frame(image, packet, jpeg.encode(image) if jpeg else None, chunk.start_frame + i,
                                  chunk.index, chunk.prompt_seq, chunk.request, announce if i == 0 else None)
                    self._encoded = frame.index + 1
                    self._call(self._frames.put_nowait, frame)
        except StreamEnded:
            pass
        except Exception as e:
            self._fail("encoder", e)
        finally:
            self._call(self._frames.put_nowait, None)

    def _replaced(self, gen: int, request: int, frame: int) -> bool:
        """Whether video `frame` of a chunk handed over at `gen`, made after `request`, is replaced by a later cut.
        Waits while a switch asked after the chunk was made lands at or before the frame and no chunk has answered
        it yet: its cut is coming (unless the producer stops). StreamEnded if the stream closes meanwhile."""
        with self._cut:
            self._cut.wait_for(lambda: self.closing or not self._producing or frame >= self._cut_after(gen)
                               or not any(r > request and at <= frame for r, at in self._holds))
            if self.closing:
                raise StreamEnded
            return frame >= self._cut_after(gen)

    def _cut_after(self, gen: int) -> float:
        """The first video frame replaced by a cut made after a chunk handed over at `gen` (inf: none)."""
        return min((start for g, start in self._cuts if g > gen), default=float("inf"))

    def _generated(self, chunk) -> None:
        n = len(chunk.frames)
        if (spf := chunk.seconds_per_frame) is not None:  # (a chunk in pieces: on its last)
            self._chunk_spf.append(spf)
            self._spf = statistics.median(self._chunk_spf)
        self.chunks_generated += 1
        self._metrics.inc("longsana_chunks_generated_total")
        self._metrics.inc("longsana_frames_generated_total", n)
        self._metrics.inc("longsana_generation_seconds_total", chunk.gen_seconds)

    def _fail(self, stage: str, e: Exception) -> None:
        """Report a failed thread. The stream then ends once the frames made before the failure have been sent:
        the thread's exit closes the handoff, the encoder's ends the frame queue, and the pacer closes."""
        self._metrics.inc("longsana_stream_failures_total", stage=stage)
        message = f"{stage} failed: {type(e).__name__}: {e}"
        if not self.closing:
            self.end_reason = message
        self._call(self.emit, {"type": "error", "seq": None, "code": stage, "message": message})

    # -- pacer (event loop) -------------------------------------------------------------------------------------
    async def next_frame(self) -> Frame:
        """The next frame, when it is due, with its pts set; StreamEnded when there are no more."""
        await self._playing.wait()
        frame = await self._frames.get()
        if frame is None:  # the encoder has stopped: the stream is over
            self._frames.put_nowait(None)  # so that every later call ends too
            self.close(self.end_reason or "the stream ended")
            raise StreamEnded(self.end_reason)
        self._credits.release()
        now = self._loop.time()
        step = max(1 / self.fps, STEP_MARGIN * self._spf)
        if self._due is None:
            self._due = now
        elif now > self._due + 2 * step:  # stalled: restart the clock, the pts jump by the real gap
            self._pts += round((now - self._due) * CLOCK_RATE)
            self._due = now
        else:
            self._due += step
            self._pts += round(step * CLOCK_RATE)
            await asyncio.sleep(self._due - now)
        frame.pts = frame.packet.pts = frame.packet.dts = frame.image.pts = self._pts
        frame.packet.time_base = frame.image.time_base = TIME_BASE
        self._released(frame)
        return frame

    def _released(self, frame: Frame) -> None:
        now = self._loop.time()
        self.frames_sent += 1
        self._send_times.append(now)
        self._shown = frame.index + 1
        if self.ttff is None:
            self.ttff = now - self.created
            self._metrics.observe("longsana_time_to_first_frame_seconds", self.ttff)
        if frame.announce is None:
            return
        self._handoff.shown()  # the producer may start the next chunk
        event = dict(frame.announce, pts=frame.pts)
        self._prompt_seq = frame.prompt_seq
        requested = self._requests.pop(frame.request, None)
        if requested is not None:  # the first frame made after a prompt request, now on screen
            self.switch_latency = event["switch_latency"] = now - requested
            self._metrics.observe("longsana_prompt_switch_seconds", self.switch_latency)
        self.emit(event)

    # -- control (event loop) -----------------------------------------------------------------------------------
    async def set_prompt(self, prompt: str, executor: Executor, transition: float | None = None) -> None:
        """Switch the prompt from the frame on screen (see the module's doc), moving the conditioning from the old
        prompt to the new over `transition` seconds of video (0: a cut; None: the generator's default); ValueError if
        the generator refuses it.
        The generator's set_prompt tokenizes the prompt (and may be a call to a GPU worker's process), so it runs
        on `executor`, off the event loop (the server's executor has a thread per stream: one stream's switch never
        waits for another's)."""
        arrived = self._loop.time()
        job = executor.submit(self._set_prompt, prompt, transition)
        self._control_jobs.add(job)
        job.add_done_callback(self._control_jobs.discard)
        request = await asyncio.wrap_future(job)
        if request is not None:
            self._requests[request] = arrived
            while len(self._requests) > MAX_PROMPT_REQUESTS:
                del self._requests[next(iter(self._requests))]

    def _set_prompt(self, prompt: str, transition: float | None) -> int | None:
        """The generator's request id (None: the stream is still starting, and its first chunk will use it, with
        nothing to move from)."""
        with self._lock:
            if self._stream is None:
                self._prompt = prompt
                return None
            stream = self._stream
        frames = None if transition is None else round(transition * self.fps)
        # (the encoder may be taking frame _encoded now: the first it has surely not taken is the one after)
        request = stream.set_prompt(prompt, at_frame=self._shown, transition_frames=frames,
                                    not_before=self._encoded + 1)
        if (landing := stream.landing(request)) is not None:
            with self._cut:
                self._holds.append((request, landing))
        self._handoff.hurry()
        return request

    def rewind(self, seconds: float) -> float:
        """Go back `seconds` from the frame on screen; returns how far that was possible. (The few frames already
        encoded after it still play first.)"""
        with self._lock:
            stream = self._stream
        if stream is None:
            return 0.0
        rewound = stream.rewind(seconds, at_frame=self._shown)
        self._handoff.hurry()
        return rewound

    def pause(self) -> None:
        self._playing.clear()

    def resume(self) -> None:
        self._playing.set()

    def stats(self) -> dict:
        now = self._loop.time()
        recent = sum(1 for t in self._send_times if t > now - SEND_RATE_WINDOW)
        return {"type": "stats", "session": self.sid, "state": "playing" if self._playing.is_set() else "paused",
                "fps": self.fps, "width": self.width, "height": self.height,
                "gen_fps": round(1 / self._spf, 2) if self._spf else None,
                "send_fps": round(recent / SEND_RATE_WINDOW, 2),
                "frames_sent": self.frames_sent, "chunks_generated": self.chunks_generated,
                "prompt_seq": self._prompt_seq, "lead_frames": max(0, self._frontier - self._shown),
                "ttff": self.ttff, "switch_latency": self.switch_latency,
                "recorded_frames": self.recording.frames, "recording_full": self.recording.full}

    # -- shutdown -----------------------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Stop the stream (idempotent). The producer closes the generator after its current chunk."""
        if self.closing:
            return
        self.closing, self.end_reason = True, reason
        self._handoff.close()
        with self._cut:
            self._cut.notify_all()  # wakes an encoder held at a switch
        self._credits.release()  # wakes an encoder waiting for a credit
        self._playing.set()
        self._frames.put_nowait(None)
        self.closed.set()

    async def wait_freed(self) -> None:
        """Wait until both threads have exited (the generator's stream is closed) and no set_prompt is running,
        then finish the recording."""
        jobs = [asyncio.wrap_future(job) for job in list(self._control_jobs)]
        await asyncio.gather(*self._threads_done, *jobs, return_exceptions=True)
        self.recording.close()
