"""How a stream runs one chunk: the `ChunkStep` interface and the eager reference step.

Between two chunk boundaries a stream asks its step for
  denoise   the pending chunk's clean-context pass (it adds that chunk to the block-causal state, with the prompt in
            force now: the LongLive re-cache when the prompt changed in between), then the causal sampler's passes
            over fresh noise for the new chunk -> its x0;
  decode    the streaming VAE decode of x0 to uint8 frames on the VAE's device, and `download` to the host.
The VAE may sit on another device than the transformer (one stream split over two GPUs): `SideStream` is the one
place that hands a chunk's latents over and orders the decode after the work that made them.
Two implementations compute the same frames:
  - `EagerStep` (here): the reference, plain module calls in program order;
  - `ChunkEngine` (engine.py): static buffers, compiled blocks, CUDA graphs, and the decode on a second CUDA stream,
    overlapped with the next chunk's transformer work, which `ahead` launches speculatively.
The stream (stream.py) is written against this interface only; the tests compare the two steps through it.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np
import torch

from .model import LongSANATransformer, State, TextKV
from .sampling import sample_chunk
from .vae import StreamingDecoder

Pending = tuple[torch.Tensor, int]  # a chunk's x0 and RoPE position, its clean-context pass still due


class SideStream:
    """Where a stream's VAE work runs: on the VAE's device (`device`), which may be another than the transformer's
    (`source`: the decoder on a second GPU), and there on a CUDA stream of its own, of high priority (`overlap`).
    The decode of chunk c runs there and its kernels go first, so its frames come out nearly as fast as alone,
    while chunk c+1's transformer work fills the rest of the transformer's GPU (the same one, or, split, the other).
    On the CPU, or without `overlap`, it has no stream and the work runs in program order."""

    def __init__(self, device: torch.device, source: torch.device | None = None, overlap: bool = True):
        self.device = _indexed(device)
        self.source = self.device if source is None else _indexed(source)
        self.stream = None
        if overlap and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device, priority=-1)  # lower is higher; clamped to the range

    def __call__(self):
        """Context manager: run on the side stream."""
        return torch.cuda.stream(self.stream)

    def wait(self) -> None:
        """Let the side stream's later work wait for all work queued so far on the current streams of both devices
        (the transformer's, which made the latents; the VAE's, where a decoder's cache was allocated)."""
        if self.stream is not None:
            for device in {self.source, self.device}:
                self.stream.wait_stream(torch.cuda.current_stream(device))

    def mark(self, device: torch.device | None = None) -> torch.cuda.Event | None:
        """An event at the current point of `device`'s current stream (default: the VAE's); None without a stream."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device or self.device))
        return event

    def take(self, z: torch.Tensor) -> torch.Tensor:
        """Latents made on the transformer's device, for work on the side stream (called inside it). The same
        tensor on one device: the allocator is told the side stream uses it (it may be a temporary, a cut x0), so
        its memory is not reused early. A non-blocking copy onto the VAE's device otherwise: PyTorch runs a copy
        between GPUs on the source device's current stream (the transformer's, so after the work that made z),
        fenced by events with the destination's current stream (this one, so the decode comes after it)."""
        if z.device != self.device:
            return z.to(self.device, non_blocking=True)
        if self.stream is not None:
            z.record_stream(self.stream)
        return z

    def decode(self, decoder: StreamingDecoder, z: torch.Tensor, waited: bool = False) -> torch.Tensor:
        """`decoder.decode(z)` queued on the side stream, after the work queued so far that made z; with `waited`
        (z is a later piece of latents the last decode already waited for) right after the side stream's last work:
        not after the next chunk's transformer work, started ahead since, which the piece does not need. (Latents
        that cross to another GPU still do: the copy runs on the transformer's stream.)"""
        if not waited:
            self.wait()
        with torch.inference_mode(), self():
            return decoder.decode(self.take(z))


def _indexed(device) -> torch.device:
    """"cuda" as "cuda:<the current GPU>", as tensors report it, so that devices compare as their tensors'."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class ChunkStep(Protocol):
    state: State  # the block-causal state, owned by the step and updated in place (its storage never changes)
    side: SideStream  # where decodes run (the VAE's device); copies of the VAE cache are queued there too
    works_ahead: bool  # whether `ahead` starts work (the device is then busy with it until the next denoise)

    def denoise(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None) -> torch.Tensor:
        """The pending chunk's clean-context pass, then x0 (B, C, n, h, w) fp32 of a chunk of n latent frames at
        RoPE position `pos`, its noise drawn from a generator seeded with `seed`."""

    def ahead(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None) -> None:
        """A hint: the next `denoise` will probably be this one (a step may start it now)."""

    def pump(self) -> bool:
        """Launch more of the work started ahead, as the device has room for it; True while the step wants to be
        called again (the device worker calls it while idle)."""

    def cancel(self) -> None:
        """Forget work started ahead, putting the state back to the last boundary (before a rewind)."""

    def work_left(self) -> float:
        """Seconds of the work started ahead still to run on the device, estimated; 0 when none is (any thread)."""

    def chunk_work(self) -> float:
        """Seconds of device work a chunk's denoising takes, as measured on the device; 0 where the step does not
        measure it (any thread)."""

    def device_idle(self) -> bool:
        """Whether the device has run all the work this step launched (the device worker's load counts the stream
        busy until then; any thread)."""

    def prepare(self, text: TextKV, n: int) -> None:
        """A hint: chunks of n latent frames will come (a step may get ready for them now, e.g. compile)."""

    def boundary_state(self) -> State:
        """The state at the current boundary, as `denoise` will find it (before work started ahead)."""

    def context(self) -> contextlib.AbstractContextManager:
        """Where the step's device work runs (a CUDA stream of its own); every call above is made inside it."""

    def decode(self, decoder: StreamingDecoder, z: torch.Tensor, waited: bool = False) -> torch.Tensor:
        """uint8 frames (n, H, W, 3) of latents z (on the transformer's device), on the VAE's device. waited: z is a
        later piece of a chunk whose first piece was decoded last (`SideStream.decode`)."""

    def download(self, frames: torch.Tensor) -> np.ndarray:
        """`decode`'s frames on the host, valid once `finish` has returned."""

    def finish(self) -> None:
        """Wait for the last download (called outside the device worker, by the thread that reads the frames)."""


class EagerStep:
    """The reference step: `sample_chunk` over `model.forward_chunk`, batch 1."""

    works_ahead = False  # (`ahead` is a no-op)

    def __init__(self, model: LongSANATransformer, latent_hw: tuple[int, int], timesteps, bf16_like: bool = False,
                 vae_device: torch.device | None = None):
        """vae_device: where the decoder is (default: the model's device)."""
        self.model, self.latent_hw = model, tuple(latent_hw)
        self.timesteps, self.bf16_like = tuple(timesteps), bf16_like
        self.device = model.proj_out.weight.device
        self.state = model.new_state(1, *latent_hw, device=self.device)
        self.side = SideStream(vae_device or self.device, self.device, overlap=False)  # everything in program order

    @torch.inference_mode()
    def denoise(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None) -> torch.Tensor:
        m, device = self.model, self.device
        if pending is not None:
            x0, pos_prev = pending
            m.forward_chunk(x0, torch.zeros(1, device=device), text, self.state, pos_prev, update_state=True,
                            output=False)
        g = torch.Generator(device).manual_seed(seed)
        shape = (1, m.cfg.in_channels, n, *self.latent_hw)

        def noise():
            return torch.randn(shape, generator=g, device=device)

        def velocity(x, t):
            return m.forward_chunk(x, torch.full((1,), t, device=device), text, self.state, pos)

        return sample_chunk(velocity, noise, self.timesteps, bf16_like=self.bf16_like)

    def ahead(self, *args) -> None:
        pass  # nothing is computed before it is asked for

    def pump(self) -> bool:
        return False

    def cancel(self) -> None:
        pass

    def work_left(self) -> float:
        return 0.0

    def chunk_work(self) -> float:
        return 0.0  # (its work runs while the consumer waits for the chunk: the stream times that)

    def device_idle(self) -> bool:
        return True  # (its frames are copied to the host before a chunk's job returns: its work has run)

    def prepare(self, text: TextKV, n: int) -> None:
        pass  # nothing to compile

    def boundary_state(self) -> State:
        return self.state

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def decode(self, decoder: StreamingDecoder, z: torch.Tensor, waited: bool = False) -> torch.Tensor:
        return self.side.decode(decoder, z, waited)

    def download(self, frames: torch.Tensor) -> np.ndarray:
        return frames.cpu().numpy()

    def finish(self) -> None:
        pass
