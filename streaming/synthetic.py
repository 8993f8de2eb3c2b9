"""A synthetic video source with the generator's streaming interface, for development and for the server's tests.

Each frame is a solid color derived from a hash of the prompt, crossed by a white vertical bar that sweeps across
the frame (so motion, rewinds and lost frames are visible), and each chunk takes a configurable delay that stands
in for generation time. It implements the `Stream` protocol of the real pipeline (`longsana.stream`): iterate to
get `Chunk`s in order, `set_prompt` and `rewind` from any thread, `close` to release the stream's memory.
`longsana serve --model synthetic` streams it. It stands in for the LongSANA 2B model: its `spec` (a ModelSpec, as
the real pipeline's) gives the frame rate, and the default video size is that model's.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from longsana.chunk import Chunk
from longsana.config import ModelSpec, get_config
from longsana.streaming.protocol import check_prompt

BAR_SWEEP_SECONDS = 4  # the bar crosses the frame once every 4 s of video


def prompt_color(prompt: str) -> tuple[int, int, int]:
    """The frame color of a prompt: three bytes of its BLAKE2 hash, scaled into 0..200 to stay clear of the bar."""
    return tuple(int(b) * 200 // 255 for b in hashlib.blake2b(prompt.encode(), digest_size=3).digest())


@dataclass
class SyntheticPipeline:
    chunk_frames: int = 8
    delay: float = 0.25  # seconds per chunk: 8 frames in 0.25 s, 32 frames a second, faster than real time
    height: int = ModelSpec.height
    width: int = ModelSpec.width
    spec: ModelSpec = field(default_factory=lambda: get_config("longsana-2b-480p"))  # what the server reads
    state_bytes: int = 4 << 20  # memory each open stream holds, standing in for the generator's GPU state
    # frames from the frame a switch names to where it lands, going back over frames made past it as the real
    # generator does (a cut); None: a switch applies at the next chunk
    switch_lead: int | None = None
    open_streams: int = field(default=0, init=False)  # streams not closed yet (tests check that all get freed)

    def __post_init__(self):
        self._lock = threading.Lock()

    def stream(self, prompt: str, seed: int = 0, height: int | None = None, width: int | None = None,
               motion_score: int | None = None, chunk_frames: int | tuple[int, ...] | None = None) -> SyntheticStream:
        """A new endless stream; `motion_score` is accepted for interface parity and has no effect here.
        `chunk_frames`: frames per chunk (default the pipeline's), or a tuple: the chunks' lengths in turn, repeated,
        since the real stream's vary (its first chunk is longer, a switch inside a chunk cuts one short)."""
        sizes = chunk_frames or self.chunk_frames
        sizes = (sizes,) if isinstance(sizes, int) else sizes
        return SyntheticStream(self, check_prompt(prompt), seed, height or self.height, width or self.width, sizes)

    def warm_up(self, say=None, **stream_kwargs) -> None:
        """`Pipeline.warm_up`'s interface: nothing here compiles, so nothing to warm."""
        return None

    def _count(self, delta: int) -> None:
        with self._lock:
            self.open_streams += delta


class SyntheticStream:
    def __init__(self, pipe: SyntheticPipeline, prompt: str, seed: int, height: int, width: int,
                 sizes: tuple[int, ...]):
        self.height, self.width, self.fps = height, width, pipe.spec.fps
        self._pipe, self._seed, self._sizes = pipe, seed, sizes  # sizes: each chunk's frames, in turn
        self._lock = threading.Lock()  # guards the fields set_prompt / rewind change from other threads
        self._prompt, self._prompt_seq = prompt, 0
        self._pending: tuple[str, int | None] | None = None  # a switch to apply: (prompt, the frame it lands on)
        self._landing: tuple[int, int | None] | None = None  # (the last switch's id, the frame it lands on)
        self._next_frame = 0
        self._requests = self._request = 0  # requests asked (set_prompt, rewind); the last one applied
        self._closed = threading.Event()
        self._state = np.ones(pipe.state_bytes, np.uint8)  # written so that it is resident, like real state
        pipe._count(+1)

    def __iter__(self) -> Iterator[Chunk]:
        index = 0
        for n in itertools.cycle(self._sizes):
            if self._closed.is_set():
                return
            t0 = time.perf_counter()
            with self._lock:
                if self._pending is not None:
                    (self._prompt, at), self._pending = self._pending, None
                    self._prompt_seq += 1
                    if at is not None:  # (one that lands past what was made applies now: a stand-in's liberty)
                        self._next_frame = min(self._next_frame, at)
                self._request = self._requests
                prompt, prompt_seq, start, request = self._prompt, self._prompt_seq, self._next_frame, self._request
                self._next_frame += n
            frames = self._render(prompt, start, n)
            if self._closed.wait(max(0.0, self._pipe.delay - (time.perf_counter() - t0))):
                return
            yield Chunk(frames, index, start, prompt, prompt_seq, time.perf_counter() - t0, request)
            index += 1

    def _render(self, prompt: str, start: int, n: int) -> np.ndarray:
        frames = np.empty((n, self.height, self.width, 3), np.uint8)
        frames[:] = prompt_color(prompt)
        bar = max(2, self.width // 16)
        speed = self.width / (BAR_SWEEP_SECONDS * self.fps)  # pixels per frame
        for i in range(n):
            x = int((start + i + self._seed) * speed) % self.width
            frames[i, :, x:x + bar] = 255
        return frames

    def set_prompt(self, prompt: str, at_frame: int | None = None, transition_frames: int | None = None,
                   not_before: int | None = None) -> int:
        """The generator's contract (longsana/stream.py): the switch lands `switch_lead` frames after `at_frame`,
        and not before `not_before` (without a lead, or without at_frame: at the next chunk). Returns the request's
        id, which the chunks made after it carry."""
        check_prompt(prompt)
        lead = self._pipe.switch_lead
        with self._lock:
            self._requests += 1
            self._pending = prompt, None if lead is None or at_frame is None else max(at_frame + lead, not_before or 0)
            self._landing = self._requests, self._pending[1]
            return self._requests

    def landing(self, request: int) -> int | None:
        with self._lock:
            return self._landing[1] if self._landing is not None and self._landing[0] == request else None

    def rewind(self, seconds: float, at_frame: int | None = None) -> float:
        """Go back `seconds` from `at_frame` (None: the end of what was made), at the next chunk."""
        if not seconds >= 0:
            raise ValueError(f"cannot rewind {seconds!r} seconds")
        with self._lock:
            now = self._next_frame if at_frame is None else min(at_frame, self._next_frame)
            to = max(0, now - round(seconds * self.fps))
            self._next_frame = to
            self._requests += 1
        return (now - to) / self.fps

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._state = None
            self._pipe._count(-1)


class MappedPipeline(SyntheticPipeline):
    """A synthetic source with a twist, for the server's tests: each chunk goes through a function of its index,
    which can change it (a given generation time) or raise (a generator that fails)."""

    def __init__(self, f: Callable[[int, Chunk], Chunk], **kwargs):
        super().__init__(**kwargs)
        self.f = f

    def stream(self, *args, **kwargs):
        return MappedStream(super().stream(*args, **kwargs), self.f)


class MappedStream:
    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def __iter__(self):
        for i, chunk in enumerate(self.stream):
            yield self.f(i, chunk)

    def __getattr__(self, name):  # fps, set_prompt, rewind, close: the synthetic stream's
        return getattr(self.stream, name)
