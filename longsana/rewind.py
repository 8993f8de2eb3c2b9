"""Rewind points of a stream: a bounded ring of chunk boundaries to go back to.

A boundary is everything a stream needs to continue from there: the block-causal state, the pending chunk's x0
(whose clean-context pass is still due) and the streaming VAE's causal cache, plus where it sits (chunk index,
latent frame, RoPE origin, prompt). The tensors are copied off to host memory, into buffers allocated once and
reused as the ring turns (about 2 GB a point at 480p, nearly all of it the VAE's cache), so a stream's memory is
fixed when it starts.

For a stream on a GPU the buffers are one pinned allocation each, filled by non-blocking copies that the copy engine
runs beside the compute (a synchronous copy to pageable memory took about a second per chunk on an H100). The state
and x0 are copied in the order of the transformer's CUDA stream and the VAE cache in the order of the decoder's
(`side`), so each is read before any later work there overwrites it; restoring waits for those copies.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .model import State
from .step import Pending, SideStream
from .vae import CausalCache, StreamingDecoder


class HostCopy:
    """One boundary's tensors in host buffers shaped like a stream's (x0 sized for the longest chunk)."""

    def __init__(self, state: State, x0_shape: tuple[int, ...], cache: CausalCache, device: torch.device):
        x0 = torch.empty(x0_shape, device="meta")  # fp32, as the samplers return x0
        bufs = _host_buffers([*state.tensors(), x0, *cache.frames.values()], device)
        self.state, self.x0 = State(*bufs[:3]), bufs[3]
        self.vae = CausalCache()
        self.vae.frames = dict(zip(cache.frames, bufs[4:]))
        self.pending: tuple[int, int] | None = None  # (latent frames, RoPE position) of the pending x0
        self.landed: list[torch.cuda.Event | None] = []

    def take(self, state: State, pending: Pending | None, cache: CausalCache, side: SideStream) -> None:
        """Queue the copies (returns at once on a GPU)."""
        self.state.copy_(state, non_blocking=True)
        self.pending = None
        if pending is not None:
            x0, pos = pending
            self.x0[:, :, :x0.shape[2]].copy_(x0, non_blocking=True)
            self.pending = (x0.shape[2], pos)
        self.landed = [side.mark()]
        with side():
            self.vae.copy_(cache, non_blocking=True)
            self.landed.append(side.mark())

    def put_back(self, state: State, decoder: StreamingDecoder, device: torch.device) -> Pending | None:
        """Copy everything back (after the copies that took it have landed); returns the pending chunk."""
        for event in filter(None, self.landed):
            event.synchronize()
        state.copy_(self.state)
        decoder.restore(self.vae)
        if self.pending is None:
            return None
        n, pos = self.pending
        return self.x0[:, :, :n].to(device, copy=True), pos

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.x0.nbytes + self.vae.nbytes


def _host_buffers(like: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Empty host tensors shaped like `like`. For a GPU stream they are views of ONE pinned allocation: pinned
    memory is what lets a device-to-host copy run asynchronously, and torch rounds each pinned allocation up to
    a power of two, so one allocation wastes at most one rounding, not one per tensor."""
    if device.type != "cuda":
        return [torch.empty(t.shape, dtype=t.dtype) for t in like]
    align = 256  # every view starts aligned for any dtype
    sizes = [-(-t.numel() * t.element_size() // align) * align for t in like]
    flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    offsets = np.cumsum([0, *sizes[:-1]])
    return [flat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, like)]


@dataclass
class RewindPoint:
    """The boundary before chunk `index`, taken before the previous chunk's clean-context pass, so that a prompt
    set after a rewind re-caches that chunk like any switch. `copy` is None at the stream's start, where every
    tensor is zero."""

    index: int
    frame0: int  # latent frame of the chunk
    origin: int  # RoPE re-basing offset at that time
    prompt: str
    prompt_seq: int
    copy: HostCopy | None


class RewindRing:
    """At most `capacity` rewind points, oldest first. `request` (any thread) picks a point; the stream's producer
    takes the request at its next chunk. Thread-safe."""

    def __init__(self, capacity: int, x0_shape: tuple[int, ...], device: torch.device, side: SideStream):
        self.capacity, self.x0_shape, self.device, self.side = capacity, x0_shape, device, side
        self.points: deque[RewindPoint] = deque()
        self.spare: list[HostCopy] = []  # buffers of dropped points, for the next ones
        self.requested: RewindPoint | None = None
        self._lock = threading.Lock()

    def keep(self, point: RewindPoint, state: State, pending: Pending | None, decoder: StreamingDecoder) -> None:
        """Take this boundary, reusing the buffers of the oldest point once the ring is full. Nothing is kept while
        a rewind is requested: it would drop every later point, and the oldest may be its target."""
        with self._lock:
            if not self.capacity or self.requested is not None:
                return
            if len(self.points) == self.capacity:
                self._drop(self.points.popleft())
        if point.index > 0:
            point.copy = self.spare.pop() if self.spare else HostCopy(state, self.x0_shape, decoder.cache,
                                                                          self.device)
            point.copy.take(state, pending, decoder.cache, self.side)
        with self._lock:
            self.points.append(point)

    def request(self, frames_back: float, now: int, video_frame) -> RewindPoint | None:
        """Ask for the latest point at least `frames_back` video frames before `now` (the oldest if none is that
        far back); `video_frame` maps a point's latent frame to video frames. None when nothing is kept."""
        with self._lock:
            if not self.points:
                return None
            fits = [p for p in self.points if video_frame(p.frame0) <= now - frames_back]
            self.requested = fits[-1] if fits else self.points[0]
            return self.requested

    def take_request(self) -> RewindPoint | None:
        with self._lock:
            point, self.requested = self.requested, None
            return point

    def restore(self, point: RewindPoint, state: State, decoder: StreamingDecoder) -> Pending | None:
        """Put `point`'s tensors back into the stream's; drop it and every later point (a future that no longer
        happens). Returns the pending chunk."""
        if point.copy is None:  # the stream's start
            state.reset()
            decoder.reset()
            pending = None
        else:
            pending = point.copy.put_back(state, decoder, self.device)
        with self._lock:
            while self.points and self.points[-1].index >= point.index:
                self._drop(self.points.pop())
        return pending

    def clear(self) -> None:
        with self._lock:
            self.points.clear()
            self.spare.clear()
            self.requested = None

    @property
    def nbytes(self) -> int:
        copies = [p.copy for p in self.points if p.copy is not None] + self.spare
        return sum(c.nbytes for c in copies)

    def _drop(self, point: RewindPoint) -> None:
        if point.copy is not None:
            self.spare.append(point.copy)
