"""The streaming generator: a prompt in, an endless sequence of decoded frames out, chunk by chunk.

    pipe = Pipeline.from_pretrained("demo")            # or a diffusers model folder
    stream = pipe.stream("a red circle moving left", seed=0)
    for chunk in stream:                                # chunk.frames: uint8 (n, H, W, 3)
        ...
        stream.set_prompt("two yellow squares bouncing", at_frame=on_screen)  # from any thread

`Stream.__iter__` is the whole algorithm, one chunk at a time: take the controls (a switch, a rewind), keep a
rewind point, re-cache and denoise (the step), decode, hand out. How a chunk's model work runs is the step's
business (step.py: the eager reference; engine.py: static buffers, CUDA graphs, the decode overlapped with the next
chunk's work); the two give the same frames, and the stream does not know which it has.

The previous chunk's clean-context pass runs at the start of the NEXT chunk rather than at the end of its own: the
frames go out one pass earlier, and the LongLive prompt "re-cache" is free: a prompt switched before chunk c is in
force when chunk c-1's clean-context pass runs, which is exactly "rebuild the state before c-1 and re-run c-1's
clean-context pass with the new prompt". Older chunks keep their old-prompt contribution (a sum cannot be
un-mixed), unless `forget_on_switch` drops them where the switch lands (the state then holds the re-cached frames
only, as a re-cached window would).

Switches and rewinds land on any latent frame L, not only on chunk boundaries. A switch names the video frame on
screen; it lands at the first latent boundary a lead after it (the time to make the new frames), so the video goes
on from the screen with no jump. Inside chunk c = [a, b) the state is exact under the block-causal semantics with c
split at L: the state before c's clean-context pass, c's x0 cut to [a, L) as the pending chunk (its clean pass runs
with the new prompt: the re-cache at a finer grain), the VAE's cache after the latents before L; the next chunk starts
at L with a full length. A switch that lands after what was generated cuts the chunk that contains L when it is
made, so the frames depend on the schedule (seed, and the latent frame of each switch) only, never on timing. Frames
from L on that were made before the switch are dropped; the next Chunk starts at video_frame(L), so a consumer drops
what it buffered from there on. Frames before L never change.

Per-stream memory is bounded and allocated over the first chunks (after which it never changes): the transformer
state, the last chunk's x0, the VAE cache, the fast step's static buffers and a ring of rewind points (rewind.py).
Positions are re-based before the RoPE table ends, so a stream can run for hours.

Determinism: chunk c's noise comes from a generator seeded by (seed, c), so a stream is a pure function of the
seed and the schedule, and a rewind followed by the original prompt replays the original continuation.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .chunk import Chunk
from .config import DEFAULT_CONFIG, ModelSpec, VAEConfig, get_config
from .engine import ChunkEngine, autotune_cudnn
from .fast_vae import GraphedDecoder, accelerate
from .fp8 import is_fp8, to_fp8
from .model import LongSANATransformer, TextKV
from .rewind import RewindPoint, RewindRing, points_for
from .step import ChunkStep, EagerStep, Pending
from .text import PromptCache, TextEncoder
from .vae import StreamingDecoder
from .worker import DeviceWorker, Later, cuda_healthy

SEED_STRIDE = 1_000_003  # chunk c of a stream seeded s draws its noise from seed s * SEED_STRIDE + c
LEAD_MARGIN = 1.25  # a switch's lead allows this many chunks' median making time for the new one
LANDINGS = 64  # requests whose landing frame a stream remembers (Stream.landing)
WARM_UP_RELEASE_SECONDS = 10.0  # the most Pipeline.warm_up waits for its stream to be freed
WARM_UP_PROMPTS = ("a quiet lake at dawn, mist drifting over the water", "the same lake at night under a full moon")


@dataclass
class StreamSettings:
    """How a stream runs. The first four come from the model (`from_spec`); the rest are choices of speed."""

    chunk_frames: int  # latent frames per chunk; the first chunk has one more (1 + 4k video frames)
    timesteps: tuple[float, ...]  # the causal sampler's levels
    motion_score: int
    forget_on_switch: bool = False  # a prompt switch drops the state's memory of the frames before the ones it
    # re-caches with the new prompt (as a sliding-window cache re-cached at a switch, LongLive's, holds only recent
    # frames): the new prompt takes over sooner, from the frames on screen; off, the old frames stay in the state
    bf16_timesteps: bool = False  # feed the bf16-rounded t the official sampler feeds (1000, 960, 888, 728)
    rewind_seconds: float = 10.0  # how far back from the screen a rewind reaches (rewind.points_for: at 480p with
    # 2.5 s chunks 8 points of about 2 GB host memory each; 3 s or 0 still let a switch split any chunk ahead)
    switch_lead: float | None = None  # seconds from the frame on screen to where a switch lands; None: measured,
    # what is left of the work under way when the switch comes, then the new chunk's (Stream.lead_frames)
    transition_frames: int = 0  # video frames over which a switch moves the conditioning to the new prompt
    switch_chunk_frames: int | None = None  # latent frames of the chunk a switch starts (None, 0: chunk_frames): a
    # shorter one is made sooner, so the lead, and the wait for the new prompt, shrink with it. The chunks after it
    # double in length up to chunk_frames (`ramp`), so that each is made while the shorter ones before it play
    vae_frames_per_call: int = 1  # latent frames the VAE decodes at once: 2 is ~4% faster on an H100, +2.6 GB peak
    early_first_frame: bool | None = None  # hand out the stream's first frame before the rest; None: on a GPU
    piece_frames: int | None = None  # decode and hand out each chunk this many latent frames at a time, each piece
    # when its consumer asks (None, 0: whole chunks). The decode then keeps close to the screen, so a switch lands past
    # what was decoded and cuts the chunk there with nothing decoded twice; the next chunk's work still starts with
    # the chunk's first piece
    compile: bool | None = None  # the fast chunk step (engine.py) and the overlapped decode; None: on a GPU only

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides) -> StreamSettings:
        """The model's settings, then `overrides` (a None keeps the default)."""
        s = cls(spec.chunk_frames, tuple(map(float, spec.denoise_timesteps)), spec.motion_score,
                spec.forget_on_switch, switch_chunk_frames=spec.switch_chunk_frames, piece_frames=spec.piece_frames)
        known = {f.name for f in fields(cls)}
        if unknown := set(overrides) - known:
            raise TypeError(f"unknown stream settings: {', '.join(sorted(unknown))}")
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def check_size(height: int, width: int) -> None:
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 32, got {height}x{width}")


class Pipeline:
    """Transformer + streaming VAE + text encoder, loaded once, serving any number of streams.

    Each part runs where its weights are: the transformer and the text encoder on `device`, the VAE on
    `vae_device`, the same device or a second one (a stream split over two GPUs: the decode of chunk c runs on the
    second while the transformer works on chunk c+1; step.SideStream hands the latents over)."""

    def __init__(self, model: LongSANATransformer, vae, text: TextEncoder, spec: ModelSpec, prompt_cache: int = 8):
        self.model, self.vae, self.text, self.spec = model, vae, text, spec
        self.device = next(model.parameters()).device
        self.prompts = PromptCache(text, derive=model.prepare_text, capacity=prompt_cache)
        checks = [cuda_healthy(d) for d in {self.device, self.vae_device}]
        self.worker = DeviceWorker(str(self.device), lambda: all(ok() for ok in checks))  # runs all device work

    @property
    def vae_device(self) -> torch.device:
        """The VAE's device, read from its weights (`device` is the transformer's)."""
        return self.vae.device

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device=None, dtype=None, spec: str | ModelSpec | None = None,
                        vae_device=None, fp8: bool = False):
        """A diffusers-layout model folder (transformer/, vae/, text_encoder/, tokenizer/) or a built-in name.
        `vae_device`: where the VAE goes (default: `device`), e.g. "cuda:1" to decode on a second GPU.
        `fp8`: the transformer blocks' matrix products in FP8 (fp8.py), everything else in bf16."""
        from .loading import default_device_dtype, load_transformer
        from .vae import load_vae

        folder, spec = resolve_model(path_or_name, spec)
        device, dtype = default_device_dtype(device, torch.bfloat16 if fp8 and dtype is None else dtype)
        model = load_transformer(folder, config=spec.transformer, device=device, dtype=dtype)
        if fp8:
            to_fp8(model)
        vae = load_vae(folder / "vae", device=vae_device or device, dtype=dtype)
        text = TextEncoder.from_pretrained(folder, device=device, dtype=dtype)
        return cls(model, vae, text, spec)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-layout model folder that `from_pretrained` (and diffusers, part by part) can read."""
        import json

        from safetensors.torch import save_file

        from .loading import save_diffusers_transformer

        if is_fp8(self.model):
            raise ValueError("an FP8 model cannot be saved: its weights are quantized; save the bf16 or fp32 model")
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

    def warm_up(self, height: int | None = None, width: int | None = None,
                say: Callable[[str], None] = functools.partial(print, flush=True), **settings) -> float | None:
        """Make a short stream (`stream`'s arguments) and drop it, so that the first viewer's stream starts as fast
        as later ones: the fast path compiles once per process (every chunk length, the decoder's pieces) and cuDNN
        picks its algorithms once per shape, which the first stream would otherwise wait for (90 s for LongSANA 2B
        on an H200). Two chunks (the first, one latent frame longer, and a steady one started ahead of the decode),
        then a switch cut into the chunk after them. `say` gets a line before and after. Returns the seconds it
        took; None where such streams run the eager path, which compiles nothing."""
        if not _fast(self, StreamSettings.from_spec(self.spec, **settings)):
            return None
        say(f"Warming up on {self.device}: compiling the engine for {height or self.spec.height}x"
            f"{width or self.spec.width} streams (once per start)...")
        t0 = time.perf_counter()
        stream = self.stream(WARM_UP_PROMPTS[0], height=height, width=width, **settings)
        gone = threading.Event()
        weakref.finalize(stream, gone.set)
        try:
            chunks = iter(stream)
            while (chunk := next(chunks)).index < 2:
                pass
            switch = stream.set_prompt(WARM_UP_PROMPTS[1], at_frame=chunk.start_frame)
            while next(chunks).request != switch:
                pass
        finally:
            stream.close()
        del stream, chunks
        deadline = time.monotonic() + WARM_UP_RELEASE_SECONDS
        while not gone.is_set() and time.monotonic() < deadline:  # until the device worker has let go of it too
            gc.collect()
            gone.wait(0.01)
        if self.device.type == "cuda":  # its blocks and graph pools back to the device: the first viewer's stream
            torch.cuda.empty_cache()  # then takes the memory a stream of a fresh process takes
        seconds = time.perf_counter() - t0
        say(f"Warmed up in {seconds:.0f} s.")
        return seconds


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


@dataclass(frozen=True)
class Cue:
    """The conditioning in force: `prompt`, reached from `prev` over `frames` video frames from video frame `start`
    (a transition; 0 frames: at once). `seq` counts the switches that took effect (Chunk.prompt_seq)."""

    prompt: str
    seq: int = 0
    prev: str | None = None
    start: int = 0
    frames: int = 0

    def weight(self, first: int, end: int) -> float:
        """How far along the transition the chunk of video frames [first, end) is, sampled at its middle frame:
        0 = `prev`, 1 = `prompt`. Per chunk, not per frame: a chunk's frames all attend to one prompt K/V."""
        if self.prev is None or self.frames <= 0:
            return 1.0
        return min(max(((first + end - 1) / 2 - self.start + 1) / self.frames, 0.0), 1.0)


@dataclass
class Request:
    """A switch (`prompt`) or a rewind (`prompt` None) asked by set_prompt / rewind, applied by the producer."""

    id: int  # what set_prompt / rewind returned; the chunks made after it carry it (Chunk.request)
    at: int | None  # the latent frame where it lands; None: the next chunk boundary, whatever it is then
    prompt: str | None = None
    transition_frames: int = 0


class Stream:
    """Iterate for chunks. set_prompt / rewind / close are thread-safe and take effect at the next chunk (or, for a
    switch named by the frame on screen, at the latent frame it lands on). `deadline`, when set, says (monotonic
    seconds) when the consumer needs the next chunk: the device worker serves the stream that needs its chunk first."""

    def __init__(self, pipe: Pipeline, prompt: str, seed: int, height: int, width: int, num_frames: int | None,
                 settings: StreamSettings):
        self.pipe, self.seed, self.settings = pipe, seed, settings
        self.height, self.width, self.fps = height, width, pipe.spec.fps
        vs, self.stride = pipe.vae.cfg.spatial_stride, pipe.vae.cfg.temporal_stride
        self.latent_hw = (height // vs, width // vs)
        self.total_latents = None if num_frames is None else latent_frames(num_frames, self.stride)
        on_gpu = pipe.device.type == "cuda"
        self.early_first_frame = on_gpu if settings.early_first_frame is None else settings.early_first_frame
        if settings.transition_frames < 0:
            raise ValueError(f"transition_frames must be >= 0, got {settings.transition_frames}")
        self.step = make_step(pipe, self.latent_hw, settings)
        self.decoder = make_decoder(pipe, height, width, settings)
        x0_shape = (1, pipe.model.cfg.in_channels, settings.chunk_frames + 1, *self.latent_hw)  # the longest chunk
        capacity = points_for(settings.rewind_seconds, self.fps, self.stride * settings.chunk_frames)
        self.ring = RewindRing(capacity, x0_shape, pipe.device, self.step.side)
        self.pending: Pending | None = None  # the last chunk, its clean-context pass due
        self._lock = threading.Lock()
        self._requests: list[Request] = []  # by latent frame, the next-boundary ones last
        self._last_request = 0
        self._landings: dict[int, int | None] = {}  # the last LANDINGS requests' latent frames (Request.at)
        self._closed = False
        self._starting = threading.Lock()  # held while the next chunk's work is launched after a hand-out
        self._encode(prompt)
        self.cue = Cue(prompt)
        self.request = 0  # the last request applied
        self._blend: tuple[tuple, TextKV] | None = None  # the last transition's mixed prompt, by (prev, prompt, w)
        self._chunk_seconds: deque[float] = deque(maxlen=5)  # the last chunks' waits for their first frames (the lead)
        self._switch_seconds: deque[float] = deque(maxlen=5)  # and the last chunks that started a switch
        self._busy_since: float | None = None  # when the consumer asked for the chunk being made (None: none is)
        self.index = 0  # next chunk
        self.frame0 = 0  # its first latent frame (absolute)
        self.decoded = 0  # latent frames the VAE's cache has seen
        self.origin = 0  # positions fed to RoPE are frame0 - origin
        self.deadline: Callable[[], float | None] | None = None

    @property
    def state(self):
        return self.step.state

    @property
    def prompt(self) -> str:
        return self.cue.prompt

    @property
    def prompt_seq(self) -> int:
        return self.cue.seq

    # -- control (any thread) -------------------------------------------------------------------------------
    def set_prompt(self, prompt: str, at_frame: int | None = None, transition_frames: int | None = None,
                   not_before: int | None = None) -> int:
        """Switch to `prompt`. at_frame: the video frame on screen; the switch lands on the first latent boundary
        at least the lead (`StreamSettings.switch_lead`) after it, and frames made from there on are dropped (the
        next chunk starts there). None: at the next chunk boundary. not_before: the first video frame the switch may
        replace, where the consumer has committed to frames past the screen (a server's encoder: the frames it took
        play as they are); the new frames are made while those play, so it is a floor, not added to the lead.
        transition_frames: video frames over which the conditioning moves from the old prompt to the new (default
        `StreamSettings.transition_frames`).
        Returns the request's id, which the chunks made after it carry (`Chunk.request`). Raises ValueError for a
        bad prompt. Returns without waiting for the device: the prompt is checked here (tokenized) and its encoding
        queued on the device worker, where it runs as soon as the job under way ends (a chunk's work can hold the
        worker for a second), usually before the switch's chunk needs it."""
        asked = time.perf_counter()
        n = self.settings.transition_frames if transition_frames is None else transition_frames
        if n < 0:
            raise ValueError(f"transition_frames must be >= 0, got {n}")
        self.pipe.text.tokenize(prompt, self.settings.motion_score)
        # (should the encoding fail, the switch's chunk encodes the prompt again and raises in the stream's consumer)
        self.pipe.worker.submit(self._encode, prompt)
        if at_frame is None:
            at = None
        else:
            at = latent_at_or_after(max(at_frame + self.lead_frames(asked), not_before or 0), self.stride)
        return self._ask(at, prompt, n)

    def rewind(self, seconds: float, at_frame: int | None = None) -> float:
        """Go back `seconds` from video frame `at_frame` (the frame on screen; None: the end of what was made), to
        the latent boundary at or before, as far as the kept rewind points reach. The next chunk starts there, with
        the prompt in force there. Returns the seconds actually rewound (0 when there is nothing to go back to)."""
        if not seconds > 0:
            raise ValueError(f"rewind needs a positive number of seconds, got {seconds!r}")
        live = self.decoded  # the end of the frames handed out
        now = self.video_frame(live) if at_frame is None else at_frame
        at = min(max(latent_at_or_before(now - seconds * self.fps, self.stride), self.ring.reach(live)), live)
        if at >= live:
            return 0.0
        self._ask(at, None, 0)
        return max(now - self.video_frame(at), 0) / self.fps

    def landing(self, request: int) -> int | None:
        """The video frame where request `request` (an id set_prompt returned) lands; None for one that lands at the
        next chunk boundary, or one too old to be remembered."""
        with self._lock:
            at = self._landings.get(request)
        return None if at is None else self.video_frame(at)

    def lead_frames(self, since: float | None = None) -> int:
        """Video frames from the frame on screen to the earliest a switch can land on: `switch_lead`, or the time
        to make the new frames: what is left of the work under way, then LEAD_MARGIN times the median time the last
        chunks that started a switch took to their first frames (the split's re-decode included), less the work
        that was under way when they were asked for, which the first term counts: a median, as one slow chunk on a
        busy machine would hold back every switch after it; a margin, for the spread and for the chunk after a
        switch's, which is made while the switch's plays. Until a switch has been timed: the last chunks' median
        wait for their first frames, or the step's measured work for a chunk if longer (`chunk_work`: a chunk whose
        work was started ahead waited for part of it, or none).
        since: when (time.perf_counter()) that frame was on screen; the screen has moved on from it since, which a
        measured lead adds."""
        lead = self.settings.switch_lead
        if lead is None:
            moved, busy, new = self.lead_terms(since)
            lead = moved + busy + LEAD_MARGIN * new
        return math.ceil(lead * self.fps)

    def lead_terms(self, since: float | None = None) -> tuple[float, float, float]:
        """The measured lead's terms, in seconds: how far the screen moved on since `since`, what is left of the work
        under way, and the median time to a switch's first frames (which the lead scales by LEAD_MARGIN)."""
        now = time.perf_counter()
        if self._switch_seconds:
            new = statistics.median(self._switch_seconds)
        else:
            new = max(statistics.median(self._chunk_seconds or [0.0]), self.step.chunk_work())
        return (0.0 if since is None else now - since), self._busy(now), new

    def _busy(self, now: float) -> float:
        """Seconds left of the device work under way for this stream: what the step started ahead has left (its own
        estimate), or, while a chunk is asked for and more, the median wait of the last chunks for their first
        frames less the time since; 0 when idle."""
        left = self.step.work_left()
        if self._busy_since is not None and self._chunk_seconds:
            left = max(left, statistics.median(self._chunk_seconds) - (now - self._busy_since))
        return left

    def device_idle(self) -> bool:
        """Whether the device has run all this stream's work (the device worker's load counts it busy until then)."""
        return self.step.device_idle()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with self._starting:  # a launch of the next chunk's work under way ends first (a later one sees _closed)
            self.ring.clear()
        self.pending = self.decoder = self._blend = None

    def _ask(self, at: int | None, prompt: str | None, transition_frames: int) -> int:
        """Queue a request. It replaces the queued ones it would undo: those landing at or after it (a future that
        no longer happens); a next-boundary one replaces the next-boundary one."""
        with self._lock:
            self._last_request += 1
            keep = [r for r in self._requests if (r.at is None) != (at is None) or (at is not None and r.at < at)]
            self._requests = keep + [Request(self._last_request, at, prompt, transition_frames)]
            self._landings[self._last_request] = at
            if len(self._landings) > LANDINGS:
                del self._landings[next(iter(self._landings))]
            return self._last_request

    # -- generation -------------------------------------------------------------------------------------------------
    def __iter__(self):
        """The chunks (or pieces of them), each computed by a job on the pipeline's device worker (worker.py). A
        chunk's gen_seconds is what its consumer waited for it: from asking to having the frames (generation, decode,
        and any wait for the device behind other streams), summed over its pieces and carried, with the frames it
        covers (gen_frames), on its last piece; 0 on the others."""
        asked = self._busy_since = time.perf_counter()
        busy = 0.0  # the device work under way when the consumer asked, which a switch's chunk waits for first
        deadline = lambda: self.deadline and self.deadline()  # noqa: E731 (set by the consumer at any time)
        for chunk, first, last in self.pipe.worker.iterate(self._chunks(), owner=self, deadline=deadline):
            self.step.finish()  # the frames' copy to the host, waited for here: the worker serves others meanwhile
            waited = time.perf_counter() - asked
            if first:
                spent, frames, first_wait, switch = 0.0, 0, waited, self._starts_switch(chunk.start_frame)
                self._busy_since = None  # its work is done: until the next is asked for, only work started ahead runs
            spent, frames = spent + waited, frames + len(chunk.frames)
            if last:
                chunk.gen_seconds, chunk.gen_frames = spent, frames
                if switch:  # the time to a switch's own first frames: the lead counts the work under way apart
                    self._switch_seconds.append(max(first_wait - busy, 0.0))
                else:
                    self._chunk_seconds.append(first_wait)  # and a chunk's (it is busy until its first piece)
            yield chunk
            asked = time.perf_counter()
            if last:
                busy = self._busy(asked)
                self._busy_since = asked

    def _chunks(self):
        """The generate loop: (chunk or piece, is the first piece of its chunk, is the last). The step's device work
        runs in its context; the loop yields outside it."""
        while True:
            with self.step.context():
                if not self._take_controls() or self._finished():
                    return
                n, pos = self._chunk_len(), self._position()
                text = self._text(n)
                if self.index == 0 and self.total_latents is None:
                    # an endless stream gets ready before its first frame, not between two: the rewind points'
                    # buffers (a video of given length allocates them as it goes: it may have fewer chunks than
                    # points), and every chunk length it makes, compiled
                    self.ring.reserve(self.step.boundary_state(), self.decoder.cache)
                    for m in {n, *ramp(self.settings.switch_chunk_frames, self.settings.chunk_frames)}:
                        self.step.prepare(text, m)
                self.ring.keep(RewindPoint(self.index, self.frame0, self.origin, self.cue, None),
                               self.step.boundary_state(), self.pending, self.decoder)
                x0 = self.step.denoise(text, n, pos, self._seed(), self.pending)  # re-cache, then denoise
            self.pending = (x0, pos)
            index, a = self.index, self.frame0
            self.index, self.frame0 = index + 1, a + n
            first = True
            while not self._closed and (end := self._decode_end(a, a + n)) > self.decoded:  # (asked each piece)
                # up to a switch or rewind landing inside the chunk, the rest goes out as one piece: the next chunk
                # starts there, and pieces handed out one by one would each wait for the screen first
                e = end if end < a + n else min(end, self.decoded + self._piece_len(index, n, first))
                with self.step.context():
                    # a later piece waits for its chunk's work only, which the first piece waited for: not for the
                    # next chunk's, started ahead since
                    frames = self.step.decode(self.decoder, x0[:, :, self.decoded - a:e - a], waited=not first)
                    ahead = None
                    if (first and self.step.works_ahead and index > 0 and end == self.frame0 and not self._finished()
                            and not self._due()):
                        m = self._chunk_len()  # overlap the decode with the next chunk's work
                        ahead = self._text(m), m, self._position(), self._seed(), self.pending
                    frames = self.step.download(frames)
                start, self.decoded = self.video_frame(self.decoded), e
                item = Chunk(frames, index, start, self.cue.prompt, self.cue.seq, 0.0, self.request), first, e == end
                # the frames go out before the next chunk's work is launched, which they need not wait for: on a GPU
                # the launch can hold the worker's thread for a while (benchmarks/RESULTS.md, 6 Dec)
                yield item if ahead is None else Later(item, functools.partial(self._start_next, ahead))
                first = False

    def _start_next(self, args: tuple) -> None:
        """`step.ahead(*args)`, unless the stream was closed or a request that lands at or before that chunk came
        since (it will be another chunk)."""
        with self._starting:
            if not (self._closed or self._due()):
                with self.step.context():
                    self.step.ahead(*args)
                self.pipe.worker.poll(self._pump, owner=self)  # the rest of that work, as the device has room

    def _pump(self) -> bool:
        """The device worker's poll while the step has work started ahead to launch (`ChunkStep.pump`)."""
        if self._closed:
            return False
        with self.step.context():
            return self.step.pump()

    def _take_controls(self) -> bool:
        """Apply the requests that land at or before the next chunk, in order; False once the stream is closed."""
        while True:
            with self._lock:
                if self._closed:
                    return False
                due = self._due_request()
                if due is None:
                    break
                self._requests.remove(due)
            self._apply(due)
        if self.decoded != self.frame0:  # a chunk was cut (or dropped) for a request since replaced: go on from the cut
            self._go_to(self.decoded)
        return True

    def _due_request(self) -> Request | None:
        """The first queued request that lands at or before `frame0` (then a next-boundary one). Under the lock."""
        landed = [r for r in self._requests if r.at is not None and r.at <= self.frame0]
        if landed:
            return min(landed, key=lambda r: r.at)
        return next((r for r in self._requests if r.at is None), None)

    def _due(self) -> bool:
        with self._lock:
            return self._due_request() is not None

    def _decode_end(self, a: int, b: int) -> int:
        """How far to decode the chunk [a, b) just made: to the first request landing inside it; not at all when
        one lands at or before its start (the chunk is dropped); else all of it."""
        with self._lock:
            inside = [r.at for r in self._requests if r.at is not None and r.at < b]
        return max(a, min(inside)) if inside else b

    def _apply(self, r: Request) -> None:
        """Go to where `r` lands, then switch the prompt there (a rewind keeps the prompt in force there)."""
        at = self.decoded if r.at is None else max(r.at, self.ring.reach(self.decoded))
        if at != self.frame0 or self.decoded != at:
            self._go_to(at)
        if r.prompt is not None and r.prompt != self.cue.prompt:
            self.cue = Cue(r.prompt, self.cue.seq + 1, self.cue.prompt, self.video_frame(at), r.transition_frames)
            if self.settings.forget_on_switch:
                self.step.cancel()  # (work started ahead holds the old state: put it back first)
                self.step.state.forget()
        self.request = r.id

    def _go_to(self, at: int) -> None:
        """Continue from latent frame `at` (at or before `frame0`, at or after the oldest rewind point): restore the
        point there, or split the chunk that contains it (the module's doc)."""
        self.step.cancel()
        here, after = self.ring.around(at)
        if here.frame0 == at:
            self.pending = self.ring.put_back(here, self.step.state, self.decoder)
            self.index, self.origin = here.index, here.origin
        else:  # inside chunk [here.frame0, after): its x0 is the pending chunk of the point after (or of the stream)
            if after is not None:
                self.pending = self.ring.put_back(after, self.step.state)
                self.index, self.origin = after.index, after.origin
            x0, pos = self.pending
            x0 = x0[:, :, :at - here.frame0].contiguous()
            if self.decoded != at:  # the VAE's cache after the latents before `at`: decode them again, unseen
                self.ring.put_back(here, decoder=self.decoder)
                self.step.decode(self.decoder, x0)
            self.pending = (x0, pos)
        self.ring.truncate(at if here.frame0 == at else at + 1)  # what comes after `at` (and the point at it: re-kept)
        self.frame0 = self.decoded = at
        self.cue = here.cue

    def _text(self, n: int) -> TextKV:
        """The prompt K/V of the next chunk (n latent frames): the prompt's, or, during a transition, the mix of the
        two prompts at the chunk's weight (one object per weight, so that `ahead` and `denoise` see the same)."""
        cue = self.cue
        w = cue.weight(self.video_frame(self.frame0), self.video_frame(self.frame0 + n))
        if w >= 1.0:
            return self._encode(cue.prompt)
        key = (cue.prev, cue.prompt, w)
        if self._blend is None or self._blend[0] != key:
            self._blend = key, blend_text(self._encode(cue.prev), self._encode(cue.prompt), w)
        return self._blend[1]

    def _piece_len(self, index: int, n: int, first: bool) -> int:
        """Latent frames of the next piece of chunk `index` (n latent frames) handed out: `piece_frames`, or all n;
        the stream's first frame alone with early_first_frame (the VAE takes it on its own anyway: the same frames,
        the first sooner)."""
        if first and index == 0 and self.early_first_frame:
            return 1
        return self.settings.piece_frames or n

    def _starts_switch(self, frame: int) -> bool:
        """Whether a chunk from video frame `frame` is the first of the switch in force (a replay after a rewind to
        it too)."""
        return self.cue.prev is not None and self.cue.start == frame

    def _finished(self) -> bool:
        return self.total_latents is not None and self.frame0 >= self.total_latents

    def _chunk_len(self) -> int:
        n = self.settings.chunk_frames + (1 if self.index == 0 else 0)
        s = self.settings.switch_chunk_frames
        if s and self.cue.prev is not None:  # after a switch: the longest ramp length up to s more than made since
            since = self.frame0 - latent_at_or_before(self.cue.start, self.stride)
            n = max(r for r in ramp(s, n) if r <= max(since, 0) + s)
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
    def _encode(self, prompt: str) -> TextKV:
        """The prompt's K/V, from the pipeline's cache. Encoded on the device's default stream, which every step's
        own stream waits for (ChunkEngine.context), so that any stream may read a cached prompt."""
        cuda = self.pipe.device.type == "cuda"
        with torch.cuda.stream(torch.cuda.default_stream(self.pipe.device)) if cuda else contextlib.nullcontext():
            return self.pipe.prompts.get(prompt, self.settings.motion_score).ctx

    def video_frame(self, latent_frame: int) -> int:
        return video_frame(latent_frame, self.stride)

    def memory_bytes(self) -> int:
        """Bytes of every tensor this stream holds: state, pending x0, VAE cache, rewind points."""
        pending = self.pending[0].nbytes if self.pending else 0
        return self.step.state.nbytes + self.decoder.nbytes + pending + self.ring.nbytes


def blend_text(a: TextKV, b: TextKV, w: float) -> TextKV:
    """The conditioning a fraction w of the way from prompt a to prompt b. Each prompt position mixes a's and b's
    K/V by the attention weight each prompt's mask gives it (exp(bias)): where both have a token, (1 - w) a + w b;
    where only one has, that one's; the bias becomes the log of the mixed weight, so a token of one prompt only
    fades in (or out) with w instead of appearing at the end. w = 0 is a, w = 1 is b."""
    like = a.kv[0][0]
    pa, pb = (torch.ones(like.shape[0], 1, 1, like.shape[2], device=like.device) if t.bias is None
              else t.bias.float().exp() for t in (a, b))
    mix = (1 - w) * pa + w * pb
    wa = torch.where(mix > 0, (1 - w) * pa / mix.clamp(min=torch.finfo(mix.dtype).tiny), 1 - w)
    wa = wa.transpose(-1, -2).to(like.dtype)  # (B, 1, L, 1): over heads and channels
    kv = [(ka * wa + kb * (1 - wa), va * wa + vb * (1 - wa)) for (ka, va), (kb, vb) in zip(a.kv, b.kv)]
    if a.bias is None and b.bias is None:
        return TextKV(kv, None)
    floor = min(t.bias.min().item() for t in (a, b) if t.bias is not None)  # the masks' own "no token" value
    return TextKV(kv, mix.log().clamp(min=floor).to(like.dtype))


def make_step(pipe: Pipeline, latent_hw: tuple[int, int], settings: StreamSettings) -> ChunkStep:
    """The one place that chooses how a stream runs: the fast engine (by default on a GPU) or the eager reference,
    the decoder's fast path (compiled with the engine), and where the decodes run (the VAE's device)."""
    fast = _fast(pipe, settings)
    accelerate(pipe.vae.decoder, compile=fast)
    if fast and pipe.device.type == "cuda":
        autotune_cudnn()
    if not fast:
        return EagerStep(pipe.model, latent_hw, settings.timesteps, settings.bf16_timesteps, pipe.vae_device)
    return ChunkEngine(pipe.model, latent_hw, settings.timesteps, settings.bf16_timesteps, compile=True,
                       vae_device=pipe.vae_device)


def make_decoder(pipe: Pipeline, height: int, width: int, settings: StreamSettings) -> StreamingDecoder:
    """The stream's decoder, as make_step's choice goes: with the fast engine on a GPU, its pieces replay CUDA
    graphs."""
    graphs = _fast(pipe, settings) and pipe.vae_device.type == "cuda"
    return (GraphedDecoder if graphs else StreamingDecoder)(pipe.vae, height, width,
                                                            max_latent_frames_per_call=settings.vae_frames_per_call)


def _fast(pipe: Pipeline, settings: StreamSettings) -> bool:
    """Whether a stream runs the fast path: `settings.compile`, by default on a GPU."""
    return settings.compile if settings.compile is not None else pipe.device.type == "cuda"


def latent_frames(num_frames: int, stride: int = VAEConfig().temporal_stride) -> int:
    """Latent frames that decode to at least `num_frames` video frames (1 + stride (T - 1))."""
    return (max(num_frames, 1) - 1 + stride - 1) // stride + 1


def ramp(first: int | None, most: int) -> list[int]:
    """The chunk lengths after a switch: `first` latent frames, then each twice the one before (as long as all
    before it since the switch), up to `most`: [3, 6, 10] for (3, 10). At 480p on an H100 a chunk takes about 0.1 s
    a latent frame to make and plays 0.25 s, so the next, started when one is handed out, is ready before the ones
    before it have played, where chunks of `most` after a short first one would come late. A few lengths only, each
    compiled once. [most] without a first length."""
    lengths = []
    while first and first < most:
        lengths.append(first)
        first *= 2
    return lengths + [most]


def video_frame(latent_frame: int, stride: int = VAEConfig().temporal_stride) -> int:
    """Index of the first video frame decoded from `latent_frame` (latent 0 -> 1 frame, then `stride` each)."""
    return 0 if latent_frame == 0 else 1 + stride * (latent_frame - 1)


def latent_at_or_after(frame: float, stride: int = VAEConfig().temporal_stride) -> int:
    """The first latent frame whose first video frame is at or after video frame `frame`."""
    return 0 if frame <= 0 else 1 + math.ceil((frame - 1) / stride)


def latent_at_or_before(frame: float, stride: int = VAEConfig().temporal_stride) -> int:
    """The last latent frame whose first video frame is at or before video frame `frame` (0 if none)."""
    return 0 if frame < 1 else 1 + math.floor((frame - 1) / stride)
