"""The streaming generator: a prompt in, an endless sequence of decoded frames out, chunk by chunk.

    pipe = Pipeline.from_pretrained("demo")            # or a diffusers model folder
    stream = pipe.stream("a red circle moving left", seed=0)
    for chunk in stream:                                # chunk.frames: uint8 (n, H, W, 3)
        ...
        stream.set_prompt("two yellow squares bouncing")  # from any thread; applies at the next chunk

`Stream.__iter__` is the whole algorithm, one chunk at a time: take the controls (a rewind, a new prompt), keep a
rewind point, re-cache and denoise (the step), decode, hand out. How a chunk's model work runs is the step's
business (step.py: the eager reference; engine.py: static buffers, CUDA graphs, the decode overlapped with the next
chunk's work); the two give the same frames, and the stream does not know which it has.

The previous chunk's clean-context pass runs at the start of the NEXT chunk rather than at the end of its own: the
frames go out one pass earlier, and the LongLive prompt "re-cache" is free: a prompt switched before chunk c is in
force when chunk c-1's clean-context pass runs, which is exactly "rebuild the state before c-1 and re-run c-1's
clean-context pass with the new prompt". Older chunks keep their old-prompt contribution (a sum cannot be
un-mixed). Frames already yielded never change.

Per-stream memory is bounded and allocated over the first chunks (after which it never changes): the transformer
state, the last chunk's x0, the VAE cache, the fast step's static buffers and a ring of rewind points (rewind.py).
Positions are re-based before the RoPE table ends, so a stream can run for hours.

Determinism: chunk c's noise comes from a generator seeded by (seed, c), so a stream is a pure function of the
seed and the prompt schedule, and a rewind followed by the original prompt replays the original continuation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .chunk import Chunk
from .config import DEFAULT_CONFIG, ModelSpec, VAEConfig, get_config
from .engine import ChunkEngine
from .fast_vae import accelerate
from .model import LongSANATransformer
from .rewind import RewindPoint, RewindRing
from .step import ChunkStep, EagerStep, Pending
from .text import PromptCache, TextEncoder
from .vae import StreamingDecoder
from .worker import DeviceWorker, cuda_healthy

SEED_STRIDE = 1_000_003  # chunk c of a stream seeded s draws its noise from seed s * SEED_STRIDE + c


@dataclass
class StreamSettings:
    """How a stream runs. The first three come from the model (`from_spec`); the rest are choices of speed."""

    chunk_frames: int  # latent frames per chunk; the first chunk has one more (1 + 4k video frames)
    timesteps: tuple[float, ...]  # the causal sampler's levels
    motion_score: int
    bf16_timesteps: bool = False  # feed the bf16-rounded t the official sampler feeds (1000, 960, 888, 728)
    rewind_points: int = 4  # chunk-boundary snapshots kept for rewind (in host memory when the model is on a GPU)
    vae_frames_per_call: int = 1  # latent frames the VAE decodes at once: 2 is ~4% faster on an H100, +2.6 GB peak
    early_first_frame: bool | None = None  # hand out the stream's first frame before the rest; None: on a GPU
    compile: bool | None = None  # the fast chunk step (engine.py) and the overlapped decode; None: on a GPU only

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides) -> StreamSettings:
        """The model's settings, then `overrides` (a None keeps the default)."""
        s = cls(spec.chunk_frames, tuple(map(float, spec.denoise_timesteps)), spec.motion_score)
        known = {f.name for f in fields(cls)}
        if unknown := set(overrides) - known:
            raise TypeError(f"unknown stream settings: {', '.join(sorted(unknown))}")
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def check_size(height: int, width: int) -> None:
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 32, got {height}x{width}")


class Pipeline:
    """Transformer + streaming VAE + text encoder, loaded once, serving any number of streams."""

    def __init__(self, model: LongSANATransformer, vae, text: TextEncoder, spec: ModelSpec, prompt_cache: int = 8):
        self.model, self.vae, self.text, self.spec = model, vae, text, spec
        self.device = next(model.parameters()).device
        self.prompts = PromptCache(text, derive=model.prepare_text, capacity=prompt_cache)
        self.worker = DeviceWorker(str(self.device), cuda_healthy(self.device))  # runs all of the device work

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
        settings = StreamSettings.from_spec(self.spec, **settings)
        return self.worker.run(Stream, self, prompt, seed, height, width, num_frames, settings)


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
    return path, spec or get_config(DEFAULT_CONFIG)


class Stream:
    """Iterate for chunks. set_prompt / rewind / close are thread-safe and take effect at the next chunk. `deadline`,
    when set, says (monotonic seconds) when the consumer needs the next chunk: the device worker serves the stream
    that needs its chunk first."""

    def __init__(self, pipe: Pipeline, prompt: str, seed: int, height: int, width: int, num_frames: int | None,
                 settings: StreamSettings):
        self.pipe, self.seed, self.settings = pipe, seed, settings
        self.height, self.width, self.fps = height, width, pipe.spec.fps
        vs, self.stride = pipe.vae.cfg.spatial_stride, pipe.vae.cfg.temporal_stride
        self.latent_hw = (height // vs, width // vs)
        self.total_latents = None if num_frames is None else latent_frames(num_frames, self.stride)
        on_gpu = pipe.device.type == "cuda"
        self.early_first_frame = on_gpu if settings.early_first_frame is None else settings.early_first_frame
        self.step = make_step(pipe, self.latent_hw, settings)
        self.decoder = StreamingDecoder(pipe.vae, height, width,
                                        max_latent_frames_per_call=settings.vae_frames_per_call)
        x0_shape = (1, pipe.model.cfg.in_channels, settings.chunk_frames + 1, *self.latent_hw)  # the longest chunk
        self.ring = RewindRing(settings.rewind_points, x0_shape, pipe.device, self.step.side)
        self.pending: Pending | None = None  # the last chunk, its clean-context pass due
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self._closed = False
        self.prompt, self.prompt_seq = prompt, 0
        self.text = self._encode(prompt)
        self.index = 0  # next chunk
        self.frame0 = 0  # its first latent frame (absolute)
        self.origin = 0  # positions fed to RoPE are frame0 - origin
        self.deadline: Callable[[], float | None] | None = None

    @property
    def state(self):
        return self.step.state

    # -- control (any thread) -------------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Raises ValueError for a bad prompt. Encodes it here, in the caller's thread, so the switch itself
        costs the producer nothing (a cache hit)."""
        self.pipe.worker.run(self._encode, prompt)
        with self._lock:
            self._pending_prompt = prompt

    def rewind(self, seconds: float) -> float:
        """Go back at least `seconds` (to a chunk boundary), as far as the kept rewind points allow. Returns the
        seconds actually rewound from the end of what was generated (0 when there is nothing to go back to)."""
        if not seconds > 0:
            raise ValueError(f"rewind needs a positive number of seconds, got {seconds!r}")
        now = self.video_frame(self.frame0)
        point = self.ring.request(seconds * self.fps, now, self.video_frame)
        return 0.0 if point is None else (now - self.video_frame(point.frame0)) / self.fps

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.ring.clear()
        self.pending = self.decoder = self.text = None

    # -- generation -------------------------------------------------------------------------------------------------
    def __iter__(self):
        """The chunks, each computed by a job on the pipeline's device worker (worker.py). A chunk's gen_seconds is
        what its consumer waited: from asking to having the frames (generation, decode, and any wait for the device
        behind other streams); a chunk handed out in pieces carries its whole time on the last piece."""
        asked = time.perf_counter()
        deadline = lambda: self.deadline and self.deadline()  # noqa: E731 (set by the consumer at any time)
        for chunk, last in self.pipe.worker.iterate(self._chunks(), owner=self, deadline=deadline):
            self.step.finish()  # the frames' copy to the host, waited for here: the worker serves others meanwhile
            if last:
                chunk.gen_seconds = time.perf_counter() - asked
            yield chunk
            if last:
                asked = time.perf_counter()

    def _chunks(self):
        """The generate loop: (chunk, is the last piece of its chunk). The step's device work runs in its context;
        the loop yields outside it."""
        while self._take_controls() and not self._finished():
            with self.step.context():
                n, pos = self._chunk_len(), self._position()
                self.ring.keep(RewindPoint(self.index, self.frame0, self.origin, self.prompt, self.prompt_seq, None),
                               self.step.boundary_state(), self.pending, self.decoder)
                x0 = self.step.denoise(self.text, n, pos, self._seed(), self.pending)  # re-cache, then denoise
            self.pending = (x0, pos)
            index, start = self.index, self.video_frame(self.frame0)
            self.index, self.frame0 = index + 1, self.frame0 + n
            for z, last in self._pieces(x0, index):
                with self.step.context():
                    frames = self.step.decode(self.decoder, z)
                    if index > 0 and not self._finished():  # not after the first chunk: its frames come first
                        self.step.ahead(self.text, self._chunk_len(), self._position(), self._seed(), self.pending)
                    frames = self.step.download(frames)
                yield Chunk(frames, index, start, self.prompt, self.prompt_seq, 0.0), last
                start += len(frames)

    def _take_controls(self) -> bool:
        """Apply a rewind and a new prompt asked for since the last chunk; False once the stream is closed."""
        with self._lock:
            if self._closed:
                return False
            prompt, self._pending_prompt = self._pending_prompt, None
        if (point := self.ring.take_request()) is not None:
            with self.step.context():
                self.step.cancel()
                self.pending = self.ring.restore(point, self.step.state, self.decoder)
            self.index, self.frame0, self.origin = point.index, point.frame0, point.origin
            if point.prompt != self.prompt:
                self.prompt, self.text = point.prompt, self._encode(point.prompt)
            self.prompt_seq = point.prompt_seq
        if prompt is not None and prompt != self.prompt:
            self.prompt, self.prompt_seq, self.text = prompt, self.prompt_seq + 1, self._encode(prompt)
        return True

    def _pieces(self, x0: torch.Tensor, index: int):
        """(latents, is the last piece): the whole chunk, or, for the stream's first chunk with early_first_frame,
        its first latent frame alone (which the VAE takes on its own anyway) and then the rest: the same frames, the
        first on screen one decode sooner. A chunk handed out in pieces carries its whole time on the last."""
        if self.early_first_frame and index == 0 and x0.shape[2] > 1:
            return [(x0[:, :, :1], False), (x0[:, :, 1:], True)]
        return [(x0, True)]

    def _finished(self) -> bool:
        return self.total_latents is not None and self.frame0 >= self.total_latents

    def _chunk_len(self) -> int:
        n = self.settings.chunk_frames + (1 if self.index == 0 else 0)
        if self.total_latents is not None:
            n = min(n, self.total_latents - self.frame0)
        return n

    def _seed(self) -> int:
        return self.seed * SEED_STRIDE + self.index

    def _position(self) -> int:
        """The next chunk's RoPE position, re-basing every stored position first where the table would end (exact:
        attention depends on relative positions only)."""
        if self.frame0 - self.origin + self._chunk_len() > self.pipe.model.cfg.rope_max_len:
            delta = self.frame0 - self.origin - self.settings.chunk_frames - 1  # the pending chunk stays at >= 0
            self.pipe.model.rebase_state(self.step.state, delta)
            self.origin += delta
            if self.pending is not None:
                self.pending = (self.pending[0], self.pending[1] - delta)
        return self.frame0 - self.origin

    # -- helpers ------------------------------------------------------------------------------------------------
    def _encode(self, prompt: str):
        return self.pipe.prompts.get(prompt, self.settings.motion_score).ctx

    def video_frame(self, latent_frame: int) -> int:
        return video_frame(latent_frame, self.stride)

    def memory_bytes(self) -> int:
        """Bytes of every tensor this stream holds: state, pending x0, VAE cache, rewind points."""
        pending = self.pending[0].nbytes if self.pending else 0
        return self.step.state.nbytes + self.decoder.nbytes + pending + self.ring.nbytes


def make_step(pipe: Pipeline, latent_hw: tuple[int, int], settings: StreamSettings) -> ChunkStep:
    """The one place that chooses how a stream runs: the fast engine (by default on a GPU) or the eager reference,
    and the decoder's fast path (compiled with the engine)."""
    fast = settings.compile if settings.compile is not None else pipe.device.type == "cuda"
    accelerate(pipe.vae.decoder, compile=fast)
    if fast and pipe.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the VAE's convs have fixed shapes: let cuDNN pick the fastest once
    if not fast:
        return EagerStep(pipe.model, latent_hw, settings.timesteps, settings.bf16_timesteps)
    return ChunkEngine(pipe.model, latent_hw, settings.timesteps, settings.bf16_timesteps, compile=True)


def latent_frames(num_frames: int, stride: int = VAEConfig().temporal_stride) -> int:
    """Latent frames that decode to at least `num_frames` video frames (1 + stride (T - 1))."""
    return (max(num_frames, 1) - 1 + stride - 1) // stride + 1


def video_frame(latent_frame: int, stride: int = VAEConfig().temporal_stride) -> int:
    """Index of the first video frame decoded from `latent_frame` (latent 0 -> 1 frame, then `stride` each)."""
    return 0 if latent_frame == 0 else 1 + stride * (latent_frame - 1)
