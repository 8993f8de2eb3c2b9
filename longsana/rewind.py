"""Rewind points of a stream: a bounded ring of chunk boundaries to go back to, or to split a chunk at.

A boundary is everything a stream needs to continue from there: the block-causal state, the pending chunk's x0
(whose clean-context pass is still due) and the streaming VAE's causal cache, plus where it sits (chunk index,
latent frame, RoPE origin, conditioning). The tensors are copied off to host memory, into buffers allocated once and
reused as the ring turns (about 2 GB a point at 480p, nearly all of it the VAE's cache), so an endless stream's
memory is fixed when it starts (`reserve`).

Consecutive points chain: chunk k spans the latents [points[k].frame0, points[k+1].frame0) and its x0 is the pending
x0 of point k+1. So any latent frame L from the oldest point on can be continued from exactly: at a point, by
restoring it; inside chunk k, by taking the state and x0 of point k+1 (x0 cut at L) and the VAE cache of point k
(which then re-decodes the latents of chunk k before L). How many points a stream keeps is a duration
(`points_for`): the reach of a rewind from the frame on screen, plus the chunks made ahead of the screen.

For a stream on a GPU the buffers are one pinned allocation each, filled by non-blocking copies that the copy engine
runs beside the compute (a synchronous copy to pageable memory took about a second per chunk on an H100). The state
and x0 are copied in the order of the transformer's CUDA stream and the VAE cache in the order of the decoder's
(`side`, on the VAE's device, which may be another GPU), so each is read before any later work there overwrites
it; restoring waits for those copies, and puts the VAE cache back in the decoder's order too.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model import State
from .step import Pending, SideStream
from .vae import CausalCache, StreamingDecoder


class HostCopy:
    """One boundary's tensors in host buffers shaped like a stream's (x0 sized for the longest chunk)."""

    def __init__(self, state: State, x0_shape: tuple[int, ...], cache: CausalCache):
        x0 = torch.empty(x0_shape, device="meta")  # fp32, as the samplers return x0
        bufs = _host_buffers([*state.tensors(), x0, *cache.frames.values()])
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
        self.landed = [side.mark(state.S.device)]  # where the state was copied: the transformer's current stream
        with side():
            self.vae.copy_(cache, non_blocking=True)
            self.landed.append(side.mark())

    def put_state(self, state: State, device: torch.device) -> Pending | None:
        """Copy the state back (after the copies that took it have landed); returns the pending chunk."""
        if self.landed and self.landed[0] is not None:
            self.landed[0].synchronize()
        state.copy_(self.state)
        if self.pending is None:
            return None
        n, pos = self.pending
        return self.x0[:, :, :n].to(device, copy=True), pos

    def put_vae(self, decoder: StreamingDecoder, side: SideStream) -> None:
        if self.landed and self.landed[-1] is not None:
            self.landed[-1].synchronize()
        with side():  # in the decodes' order, on the VAE's device
            decoder.restore(self.vae)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.x0.nbytes + self.vae.nbytes


def _host_buffers(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Empty host tensors shaped and laid out like `like` (dense tensors: a channels-last VAE cache gets
    channels-last buffers, so a copy either way is a plain copy, not a transpose). When some are on a GPU they are
    views of ONE pinned allocation: pinned memory is what lets a device-to-host copy run asynchronously, and torch
    rounds each pinned allocation up to a power of two, so one allocation wastes at most one rounding, not one per
    tensor."""
    if not any(t.is_cuda for t in like):
        return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for t in like]
    align = 256  # every view starts aligned for any dtype
    sizes = [-(-t.numel() * t.element_size() // align) * align for t in like]
    flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    offsets = np.cumsum([0, *sizes[:-1]])
    return [flat[o:o + t.numel() * t.element_size()].view(t.dtype).as_strided(t.shape, t.stride())
            for o, t in zip(offsets, like)]


AHEAD_CHUNKS = 3  # chunks at and after the frame on screen: the one playing, one handed out, one being made


def points_for(seconds: float, fps: float, chunk_video_frames: int) -> int:
    """Rewind points that let a rewind of `seconds` from the frame on screen land where asked (and a switch split
    any chunk from the screen on): the chunks that span `seconds`, the chunks at and ahead of the screen, and one
    more, as the oldest point may be dropped between a request and the chunk that takes it."""
    if seconds < 0:
        raise ValueError(f"rewind_seconds must be >= 0, got {seconds!r}")
    return math.ceil(seconds * fps / chunk_video_frames) + AHEAD_CHUNKS + 1


@dataclass
class RewindPoint:
    """The boundary before chunk `index`, taken before the previous chunk's clean-context pass, so that a prompt
    set after a rewind re-caches that chunk like any switch. `copy` is None at the stream's start, where every
    tensor is zero."""

    index: int
    frame0: int  # latent frame of the chunk
    origin: int  # RoPE re-basing offset at that time
    cue: Any  # the stream's conditioning from this point on (stream.Cue)
    copy: HostCopy | None


class RewindRing:
    """At most `capacity` rewind points, oldest first, kept and used by the stream's producer; `reach` may be asked
    from any thread. Thread-safe."""

    def __init__(self, capacity: int, x0_shape: tuple[int, ...], device: torch.device, side: SideStream):
        """device: the transformer's (the state and pending x0 are put back there); side: the decoder's."""
        self.capacity, self.x0_shape, self.device, self.side = capacity, x0_shape, device, side
        self.points: deque[RewindPoint] = deque()
        self.spare: list[HostCopy] = []  # buffers of dropped points, for the next ones
        self._lock = threading.Lock()

    def reserve(self, state: State, cache: CausalCache) -> None:
        """Allocate the buffers of every point now, so that no chunk waits for its own: pinning host memory is slow
        (at 480p on an H100 a chunk that allocated its own point's 2 GB took 0.6-0.8 s longer: the first 8 chunks)."""
        with self._lock:
            held = sum(p.copy is not None for p in self.points) + len(self.spare)
        self.spare += [HostCopy(state, self.x0_shape, cache) for _ in range(self.capacity - held)]

    def keep(self, point: RewindPoint, state: State, pending: Pending | None, decoder: StreamingDecoder) -> None:
        """Take this boundary, reusing the buffers of the oldest point once the ring is full."""
        with self._lock:
            if not self.capacity:
                return
            if len(self.points) == self.capacity:
                self._drop(self.points.popleft())
        if point.index > 0:
            point.copy = self.spare.pop() if self.spare else HostCopy(state, self.x0_shape, decoder.cache)
            point.copy.take(state, pending, decoder.cache, self.side)
        with self._lock:
            self.points.append(point)

    def reach(self, live: int) -> int:
        """The earliest latent frame a request made now can count on: the oldest point's, or the second oldest's
        when the ring is full (the producer may keep one more point, dropping the oldest, before it takes the
        request); `live` (the stream's next latent frame) when nothing is kept."""
        with self._lock:
            if not self.points:
                return live
            full = len(self.points) == self.capacity and len(self.points) > 1
            return self.points[1 if full else 0].frame0

    def around(self, frame: int) -> tuple[RewindPoint, RewindPoint | None]:
        """The last point at or before latent `frame` (there must be one) and the point after it (None: the stream's
        live boundary comes next)."""
        with self._lock:
            points = list(self.points)
        i = max(i for i, p in enumerate(points) if p.frame0 <= frame)
        return points[i], points[i + 1] if i + 1 < len(points) else None

    def put_back(self, point: RewindPoint, state: State | None = None,
                 decoder: StreamingDecoder | None = None) -> Pending | None:
        """Copy `point`'s state (returning its pending chunk) and/or its VAE cache into the stream's."""
        if point.copy is None:  # the stream's start: everything zero
            if state is not None:
                state.reset()
            if decoder is not None:
                with self.side():  # in the decodes' order, on the VAE's device
                    decoder.reset()
            return None
        pending = None if state is None else point.copy.put_state(state, self.device)
        if decoder is not None:
            point.copy.put_vae(decoder, self.side)
        return pending

    def truncate(self, frame: int) -> None:
        """Drop every point at latent `frame` or later: a future that no longer happens."""
        with self._lock:
            while self.points and self.points[-1].frame0 >= frame:
                self._drop(self.points.pop())

    def clear(self) -> None:
        with self._lock:
            self.points.clear()
            self.spare.clear()

    @property
    def nbytes(self) -> int:
        copies = [p.copy for p in self.points if p.copy is not None] + self.spare
        return sum(c.nbytes for c in copies)

    def _drop(self, point: RewindPoint) -> None:
        if point.copy is not None:
            self.spare.append(point.copy)
