"""Synthetic sources with a twist, for the server tests: each chunk of a synthetic stream goes through a function of
its index, which can change it (a given generation time) or raise (a generator that fails)."""

from __future__ import annotations

from typing import Callable

from longsana.chunk import Chunk
from streaming.synthetic import SyntheticPipeline


class MappedPipeline(SyntheticPipeline):
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
