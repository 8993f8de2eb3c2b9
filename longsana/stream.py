"""The streaming generator: a prompt in, an endless sequence of decoded frames out, chunk by chunk.

    pipe = Pipeline.from_pretrained("demo")            # or a diffusers model folder
    stream = pipe.stream("a red circle moving left", seed=0)
    for chunk in stream:                                # chunk.frames: uint8 (n, H, W, 3)
        ...
        stream.set_prompt("two yellow squares bouncing")  # from any thread; applies at the next chunk

One chunk: the previous chunk's clean-context pass adds it to the block-causal state; the 4-step
causal sampler (4 denoising passes) gives this chunk's x0; the streaming VAE decodes it and the frames go out.
Running the clean-context pass at the start of the NEXT chunk rather than at the end of its own gets the frames
out one pass earlier, and it makes the LongLive prompt "re-cache" free: a prompt switched before chunk c is in
force when chunk c-1's clean-context pass runs, which is exactly "rebuild the state before c-1 and re-run c-1's
clean-context pass with the new prompt". Older chunks keep their old-prompt contribution (a sum cannot be
un-mixed). Frames already yielded never change.

Per-stream memory is fixed when the stream starts: the transformer state, the last chunk's x0, the VAE cache and
a bounded ring of rewind points (in pinned host memory when the model is on a GPU). Positions are re-based before
the RoPE table ends, so a stream can run for hours.

Determinism: chunk c's noise comes from a generator seeded by (seed, c), so a stream is a pure function of the
seed and the prompt schedule, and a rewind followed by the original prompt replays the original continuation.

Two ways to run a chunk, computing the same thing (`StreamSettings.compile`; by default the fast one on a GPU):
  - eager, the reference (engine.reference_step): the clean-context pass, then `sample_chunk` over
    `model.forward_chunk`;
  - the engine (engine.py): the same step on static buffers, compiled, replayed as a CUDA graph. Its VAE decode
    runs on a second CUDA stream, overlapped with the NEXT chunk's transformer work, which is launched
    speculatively before this chunk's frames are handed out, with the prompt in force at that moment. If the
    prompt changes (or the stream is rewound) before the next chunk is asked for, the speculative work is
    discarded: the state is put back as it was before its clean-context pass and the chunk is redone. So the
    frames are exactly those of the eager schedule; a switch just costs one chunk's transformer work. The first
    chunk is not overlapped: its frames come out as early as possible.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .chunk import Chunk
from .config import ModelSpec, get_config
from .engine import ChunkEngine, SideStream, compile_norms, reference_step
from .model import LongSANATransformer, State
from .text import PromptCache, TextEncoder
from .vae import CausalCache, StreamingDecoder

FPS = 16
LATENT_STRIDE = 4  # video frames per latent frame (after the first)


@dataclass
class StreamSettings:
    """How a stream runs; the defaults are the checkpoint's (ModelSpec)."""

    chunk_frames: int = 10  # latent frames per chunk; the first chunk has one more (1 + 4k video frames)
    timesteps: tuple[float, ...] = (1000.0, 960.0, 889.0, 727.0)
    bf16_timesteps: bool = False  # feed the bf16-rounded t the official sampler feeds (1000, 960, 888, 728)
    motion_score: int = 10
    rewind_points: int = 4  # chunk-boundary snapshots kept for rewind (in host memory when the model is on a GPU)
    vae_frames_per_call: int = 1  # latent frames the VAE decodes at once: 2 is ~4% faster on an H100, +2.6 GB peak
    early_first_frame: bool | None = None  # hand out the stream's first frame before the rest; None: on a GPU
    compile: bool | None = None  # the fast chunk step (engine.py) and the overlapped decode; None: on a GPU only

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides) -> StreamSettings:
        s = cls(chunk_frames=spec.chunk_frames, timesteps=tuple(map(float, spec.denoise_timesteps)),
                motion_score=spec.motion_score)
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s


def check_size(height: int, width: int) -> None:
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 32, got {height}x{width}")


class Pipeline:
    """Transformer + streaming VAE + text encoder, loaded once, serving any number of streams."""

    def __init__(self, model: LongSANATransformer, vae, text: TextEncoder, spec: ModelSpec, prompt_cache: int = 8):
        self.model, self.vae, self.text, self.spec = model, vae, text, spec
        self.device = next(model.parameters()).device
        self.prompts = PromptCache(text, derive=model.prepare_text, capacity=prompt_cache)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device=None, dtype=None, spec: str | ModelSpec | None = None):
        """A diffusers-layout model folder (transformer/, vae/, text_encoder/, tokenizer/) or a built-in name."""
        from .loading import default_device_dtype, load_transformer
        from .vae import load_vae

        folder, spec = resolve_model(path_or_name, spec)
        device, dtype = default_device_dtype(device, dtype)
        model = load_transformer(folder, config=spec.transformer, device=device, dtype=dtype)
        vae = load_vae(folder / "vae", device=device, dtype=dtype)
        text = TextEncoder.from_pretrained(folder, device=device, dtype=dtype)
        return cls(model, vae, text, spec)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-layout model folder that `from_pretrained` (and diffusers, part by part) can read."""
        import json

        from safetensors.torch import save_file

        from .loading import save_diffusers_transformer

        folder = Path(folder)
        save_diffusers_transformer(self.model.state_dict(), self.model.cfg, folder / "transformer")
        (folder / "vae").mkdir(parents=True, exist_ok=True)
        (folder / "vae" / "config.json").write_text(json.dumps(self.vae.cfg.to_diffusers(), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.vae.state_dict().items()},
                  folder / "vae" / "diffusion_pytorch_model.safetensors")
        self.text.model.save_pretrained(folder / "text_encoder")
        self.text.tokenizer.save_pretrained(folder / "tokenizer")
        index = {"_class_name": "SanaVideoPipeline", "transformer": ["diffusers", "SanaVideoTransformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "Gemma2Model"],
                 "tokenizer": ["transformers", type(self.text.tokenizer).__name__]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return folder

    def stream(self, prompt: str, seed: int = 0, height: int | None = None, width: int | None = None,
               num_frames: int | None = None, **settings) -> Stream:
        """An endless stream (or `num_frames` video frames, rounded up to whole chunks' worth of latents)."""
        height, width = height or self.spec.height, width or self.spec.width
        check_size(height, width)
        return Stream(self, prompt, seed, height, width, num_frames, StreamSettings.from_spec(self.spec, **settings))


def resolve_model(path_or_name: str | Path, spec: str | ModelSpec | None) -> tuple[Path, ModelSpec]:
    """(model folder, spec): a built-in name maps to its bundled folder; a folder takes `spec` or the default."""
    if isinstance(spec, str):
        spec = get_config(spec)
    path = Path(path_or_name)
    if not path.exists():
        from .config import CONFIGS, bundled_folder

        name = str(path_or_name)
        if name in CONFIGS and (folder := bundled_folder(name)) is not None:
            return folder, spec or CONFIGS[name]
        raise FileNotFoundError(f"model {name!r}: no such folder, and not a built-in model with bundled weights "
                                f"({', '.join(n for n in CONFIGS if bundled_folder(n))})")
    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path}: not a model folder (expected transformer/, vae/, text_encoder/, tokenizer/)")
    return path, spec or get_config("longsana-2b-480p")


@dataclass
class _Ahead:
    """The next chunk's transformer work, launched before it was asked for (see the module docstring)."""

    index: int  # the chunk it is
    text: object  # the prompt (TextKV) it used
    pending: tuple[torch.Tensor, int] | None  # the pending chunk whose clean-context pass it ran
    x0: torch.Tensor


class _HostCopy:
    """A stream's transformer state, pending x0 and VAE cache copied off to the host, in buffers allocated once and
    reused as the ring of rewind points turns (about 2 GB at 480p, nearly all of it the VAE's cache).

    For a stream on a GPU the buffers are one pinned allocation, filled by non-blocking copies that the copy
    engine runs beside the compute (a synchronous copy to pageable memory took about a second per chunk on an
    H100). The state and x0 are copied in the transformer stream's order and the VAE cache in the decoder
    stream's, so each is read before any later work there overwrites it; `landed` says when they are all done."""

    def __init__(self, stream: Stream):
        pipe, cache = stream.pipe, stream.decoder.cache
        x0 = torch.empty(1, pipe.model.cfg.in_channels, stream.settings.chunk_frames + 1, *stream.latent_hw,
                         device="meta")  # the longest pending chunk (fp32, as the samplers return it)
        bufs = _host_buffers([*stream.state.tensors(), x0, *cache.frames.values()], pipe.device)
        self.state, self.x0 = State(*bufs[:3]), bufs[3]
        self.vae = CausalCache()
        self.vae.frames = dict(zip(cache.frames, bufs[4:]))
        self.pending: tuple[int, int] | None = None  # (latent frames, RoPE position) of the pending x0
        self.landed: list[torch.cuda.Event | None] = []

    def take(self, stream: Stream) -> None:
        """Queue the copies of `stream`'s current boundary (returns at once on a GPU)."""
        self.state.copy_(stream.state, non_blocking=True)
        self.pending = None
        if stream.pending is not None:
            x0, pos = stream.pending
            self.x0[:, :, :x0.shape[2]].copy_(x0, non_blocking=True)
            self.pending = (x0.shape[2], pos)
        self.landed = [stream._side.mark()]
        with stream._side():
            self.vae.copy_(stream.decoder.cache, non_blocking=True)
            self.landed.append(stream._side.mark())

    def put_back(self, stream: Stream) -> None:
        """Copy everything back into `stream` (waits for the copies that took it)."""
        for event in filter(None, self.landed):
            event.synchronize()
        stream.state.copy_(self.state)
        stream.decoder.restore(self.vae)
        stream.pending = None
        if self.pending is not None:
            n, pos = self.pending
            stream.pending = (self.x0[:, :, :n].to(stream.pipe.device, copy=True), pos)

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
class _Boundary:
    """A rewind point: the boundary before chunk `index`, taken before the previous chunk's clean-context pass, so
    a prompt set after a rewind re-caches that chunk like any switch. `copy` is None at the stream's start, where
    everything is zero."""

    index: int
    frame0: int  # latent frame of the chunk
    origin: int  # RoPE re-basing offset at that time
    prompt: str
    prompt_seq: int
    copy: _HostCopy | None


class Stream:
    """Iterate for chunks. set_prompt / rewind / close are thread-safe and take effect at the next chunk."""

    def __init__(self, pipe: Pipeline, prompt: str, seed: int, height: int, width: int, num_frames: int | None,
                 settings: StreamSettings):
        self.pipe, self.seed, self.settings = pipe, seed, settings
        self.height, self.width, self.fps = height, width, FPS
        vs = pipe.vae.cfg.spatial_stride
        self.latent_hw = (height // vs, width // vs)
        self.total_latents = None if num_frames is None else latent_frames(num_frames)
        fast = settings.compile if settings.compile is not None else pipe.device.type == "cuda"
        self.early_first_frame = (settings.early_first_frame if settings.early_first_frame is not None
                                  else pipe.device.type == "cuda")
        self.engine = ChunkEngine(pipe.model, self.latent_hw, settings.timesteps, settings.bf16_timesteps,
                                  compile=True) if fast else None
        if fast:
            compile_norms(pipe.vae.decoder)
        self.state = self.engine.state if fast else pipe.model.new_state(1, *self.latent_hw, device=pipe.device)
        self._before = pipe.model.new_state(1, *self.latent_hw, device=pipe.device) if fast else None
        self._ahead: _Ahead | None = None  # the next chunk's speculative transformer work
        self._side = SideStream(pipe.device) if fast else SideStream(torch.device("cpu"))
        self.pending: tuple[torch.Tensor, int] | None = None  # last chunk's (x0, position): clean pass due
        self.decoder = StreamingDecoder(pipe.vae, height, width,
                                        max_latent_frames_per_call=settings.vae_frames_per_call)
        self.rewind_points: deque[_Boundary] = deque()  # at most settings.rewind_points, oldest first
        self._spare_copies: list[_HostCopy] = []  # buffers of dropped points, for the next ones
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self._pending_rewind: _Boundary | None = None
        self._closed = False
        self.prompt, self.prompt_seq = prompt, 0
        self.text = self._encode(prompt)
        self.index = 0  # next chunk
        self.frame0 = 0  # its first latent frame (absolute)
        self.origin = 0  # positions fed to RoPE are frame0 - origin

    # -- control (any thread) -------------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Raises ValueError for a bad prompt. Encodes it here, in the caller's thread, so the switch itself
        costs the producer nothing (a cache hit)."""
        self._encode(prompt)
        with self._lock:
            self._pending_prompt = prompt

    def rewind(self, seconds: float) -> float:
        """Go back at least `seconds` (to a chunk boundary), as far as the kept rewind points allow. Returns the
        seconds actually rewound from the end of what was generated (0 when there is nothing to go back to)."""
        if not seconds > 0:
            raise ValueError(f"rewind needs a positive number of seconds, got {seconds!r}")
        with self._lock:
            if not self.rewind_points:
                return 0.0
            now = video_frame(self.frame0)
            fits = [b for b in self.rewind_points if video_frame(b.frame0) <= now - seconds * self.fps]
            b = fits[-1] if fits else self.rewind_points[0]
            self._pending_rewind = b
            return (now - video_frame(b.frame0)) / self.fps

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.rewind_points.clear()
            self._spare_copies.clear()
        self.state = self.pending = self.decoder = self.text = None

    # -- generation (the producer thread) -----------------------------------------------------------------------
    def __iter__(self):
        while True:
            with self._lock:
                if self._closed:
                    return
                rewind, self._pending_rewind = self._pending_rewind, None
                prompt, self._pending_prompt = self._pending_prompt, None
            if rewind is not None:
                self._restore(rewind)
            if prompt is not None and prompt != self.prompt:
                self.prompt, self.prompt_seq, self.text = prompt, self.prompt_seq + 1, self._encode(prompt)
            if self.total_latents is not None and self.frame0 >= self.total_latents:
                return
            yield from self._next_chunk()

    def _next_chunk(self):
        """Yields this chunk's frames: one Chunk, or, for the stream's first chunk with early_first_frame, the
        first video frame alone (decoded from the first latent frame, which the VAE takes on its own anyway) and
        then the rest: the same frames, the first on screen one decode sooner. A chunk handed out in pieces
        carries its whole time on the last piece."""
        t_start = time.perf_counter()
        n = self._chunk_len()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and self._adopt(ahead):
            x0 = ahead.x0
        else:
            self._maybe_rebase(n)
            self._keep_rewind_point()
            x0 = self._denoise(n)
        self.pending = (x0, self.frame0 - self.origin)
        index, start = self.index, video_frame(self.frame0)
        self.index += 1
        self.frame0 += n
        self._side.wait()  # the decode follows the transformer work queued so far
        pieces = (x0[:, :, :1], x0[:, :, 1:]) if self.early_first_frame and index == 0 and n > 1 else (x0,)
        for k, z in enumerate(pieces):
            with torch.inference_mode(), self._side():
                frames = self.decoder.decode(z)
            if index > 0:  # not while the first chunk decodes: sharing the GPU would delay the stream's first frames
                self._ahead = self._speculate()  # the next chunk's transformer work, while this one decodes
            with self._side():
                frames = frames.cpu().numpy()
            seconds = time.perf_counter() - t_start if k == len(pieces) - 1 else 0.0
            yield Chunk(frames, index, start, self.prompt, self.prompt_seq, seconds)
            start += len(frames)

    def _denoise(self, n: int) -> torch.Tensor:
        """The pending chunk's clean-context pass, then this chunk's x0. The clean pass is deferred to here, the
        start of the NEXT chunk, so that the pending chunk's frames go out first, and so that a prompt switched in
        between re-caches that chunk with the new prompt."""
        args = (self.text, n, self.frame0 - self.origin, self.seed * 1_000_003 + self.index, self.pending)
        if self.engine is not None:
            return self.engine.step(*args)
        return reference_step(self.pipe.model, self.text, self.state, self.latent_hw, *args[1:],
                              self.settings.timesteps, self.settings.bf16_timesteps)

    def _speculate(self) -> _Ahead | None:
        """Launch the next chunk's transformer work (engine only), keeping what is needed to take it back."""
        if self.engine is None or (self.total_latents is not None and self.frame0 >= self.total_latents):
            return None
        n = self._chunk_len()
        self._maybe_rebase(n)
        self._before.copy_(self.state)  # the boundary's state, before the speculative clean-context pass
        pending, text = self.pending, self.text
        return _Ahead(self.index, text, pending, self._denoise(n))

    def _adopt(self, ahead: _Ahead) -> bool:
        """Keep the speculative work if nothing changed since it was launched, and take this boundary's rewind
        point as the eager path does (the state from before the speculative clean-context pass)."""
        if self.pending is not ahead.pending or self.index != ahead.index:  # rewound: _restore reset everything
            return False
        if self.text is not ahead.text:  # the prompt changed: undo the clean-context pass, redo with the new one
            self.state.copy_(self._before)
            return False
        state, self.state = self.state, self._before
        try:
            self._keep_rewind_point()
        finally:
            self.state = state
        return True

    def _chunk_len(self) -> int:
        n = self.settings.chunk_frames + (1 if self.index == 0 else 0)
        if self.total_latents is not None:
            n = min(n, self.total_latents - self.frame0)
        return n

    def _maybe_rebase(self, n: int) -> None:
        """Shift positions back before the RoPE table ends (exact: attention depends on relative positions)."""
        if self.frame0 - self.origin + n <= self.pipe.model.cfg.rope_max_len:
            return
        delta = self.frame0 - self.origin - self.settings.chunk_frames - 1  # the pending chunk stays at >= 0
        self.pipe.model.rebase_state(self.state, delta)
        self.origin += delta
        if self.pending is not None:
            self.pending = (self.pending[0], self.pending[1] - delta)

    def _keep_rewind_point(self) -> None:
        """Take this boundary as a rewind point, reusing the buffers of the oldest one once the ring is full."""
        if not self.settings.rewind_points:
            return
        with self._lock:
            if self._pending_rewind is not None:  # it will drop every later point: none to keep
                return
            if len(self.rewind_points) == self.settings.rewind_points:
                self._drop(self.rewind_points.popleft())
        copy = None
        if self.index > 0:
            copy = self._spare_copies.pop() if self._spare_copies else _HostCopy(self)
            copy.take(self)
        b = _Boundary(self.index, self.frame0, self.origin, self.prompt, self.prompt_seq, copy)
        with self._lock:
            self.rewind_points.append(b)

    def _restore(self, b: _Boundary) -> None:
        self.index, self.frame0, self.origin = b.index, b.frame0, b.origin
        if b.copy is None:  # the stream's start
            self.state.reset()
            self.decoder.reset()
            self.pending = None
        else:
            b.copy.put_back(self)
        if b.prompt != self.prompt:
            self.prompt, self.text = b.prompt, self._encode(b.prompt)
        self.prompt_seq = b.prompt_seq
        with self._lock:  # points from the boundary on describe a future that no longer happens
            while self.rewind_points and self.rewind_points[-1].index >= b.index:
                self._drop(self.rewind_points.pop())

    def _drop(self, b: _Boundary) -> None:
        if b.copy is not None:
            self._spare_copies.append(b.copy)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _encode(self, prompt: str):
        return self.pipe.prompts.get(prompt, self.settings.motion_score).ctx

    def memory_bytes(self) -> int:
        """Bytes of every tensor this stream holds: state, pending x0, VAE cache, rewind points."""
        total = self.state.nbytes + self.decoder.nbytes + (self.pending[0].nbytes if self.pending else 0)
        copies = [b.copy for b in self.rewind_points if b.copy is not None] + self._spare_copies
        return total + sum(c.nbytes for c in copies)


def latent_frames(num_frames: int) -> int:
    """Latent frames that decode to at least `num_frames` video frames (1 + 4 (T - 1))."""
    return (max(num_frames, 1) - 1 + LATENT_STRIDE - 1) // LATENT_STRIDE + 1


def video_frame(latent_frame: int) -> int:
    """Index of the first video frame decoded from `latent_frame` (latent 0 -> 1 frame, then 4 each)."""
    return 0 if latent_frame == 0 else 1 + LATENT_STRIDE * (latent_frame - 1)
