"""The fast chunk step (`ChunkEngine`, a `ChunkStep` of step.py): every speed decision of the stream is here.

It computes what the eager reference step computes (the pending chunk's clean-context pass, then `sample_chunk` over
the transformer), through the same sampler steps (`chunk_step`), minus the work that does not change from chunk to
chunk:
  - the timestep embeddings (t0, temb) of the 4 steps and of the clean pass (t = 0) are computed once;
  - the prompt's cross-attention K/V (TextKV) are copied into a static copy when the prompt changes;
  - the RoPE tables are computed for the chunk's position before the replay, outside the graph, so the compiled
    graph never sees a Python number that changes from chunk to chunk;
  - all 4 noises of a chunk (the initial one and 3 re-noisings) are drawn before the replay from the chunk's
    seeded generator, in the order the eager sampler draws them: both paths get the same noise;
  - the clean-context pass skips the final projection and, in its last block, all but what the state needs
    (output=False: Block's state_only), as the eager one does.

Static buffers, per chunk length n (a stream has two: the first chunk's and the others'): the noises, the RoPE
tables of the chunk being denoised and of a pending chunk of that length (its clean pass), and two x0 slots, so that
chunk c's x0 can be read (by chunk c+1's clean pass and by the VAE on another stream) while chunk c+1's x0 is
written. The block-causal `State` is the engine's own; rewind, re-cache and RoPE re-basing copy into it in place.

A pending chunk may have any length m from 1 to the longest chunk: a prompt switch or a rewind inside a chunk cuts
its x0 there (stream.py). A length that is only ever pending gets only what its clean pass needs (an x0 slot to copy
the cut x0 into, its RoPE table: at 480p about 1.5 MB per latent frame of m, under 70 MB for every m of a 10-frame
chunk) and runs its clean pass through the plain blocks, not the compiled function: a compiled graph per m would cost
a compilation of the block for that shape (tens of seconds at full size) at the first switch cut there, for one pass
of five. For the same reason that pass runs with cuDNN's benchmark off (the FFN's depthwise convolution has a new
shape for each m), and `prepare` runs it once at every m before the first frame: at full size on an H100 the first
cuts to 1 and 2 latent frames took 3.5-3.7 s, 1.4 s of each compiling the Triton kernels of the plain blocks (one
specialisation for token counts divisible by 16, one for the others), and the first cut at a later new m about 0.2 s
more than the next one. The first denoising step after such a clean pass is a graph like the others: run at its
first use, captured at its second, at most 2 per m, in the shared memory pool.

Compilation is regional: one `torch.compile`d function runs every transformer block (they share one graph, since
blocks differ only in their weights), static shapes, so a stream compiles 2 chunk lengths x (denoise, clean, the
clean pass's last block, which runs state-only) block graphs once per process, 3 with a switch's shorter chunk. An
endless stream has them compiled before its first frame (`prepare`), so that no later frame waits for a compilation
(tens of seconds at full size: a stall in the video, or a frozen first switch). The first use of each step variant (n,
which step, the first's pending slot, the last's output slot) runs for real, so the first chunk of a stream pays no
capture; the second is captured as a CUDA graph (a one-time host synchronisation) and replayed, as later uses are: one
launch that returns at once, provided the graph has few memset nodes: the driver's launch waits on those, and with
cuBLAS's default workspace every split GEMM adds one (1,199 in a 10-frame chunk's graph on an H100, whose launch then
held the host about 350 ms of 610). The command's process settings give cuBLAS no workspace (cli.py); the engine warns
where they are missing. Compiled blocks fuse elementwise work, so the results agree with the eager path within bf16
rounding, not bitwise.

Overlap: the VAE decode of chunk c runs on a second, high-priority CUDA stream (`SideStream`), and the stream calls
`ahead` with chunk c+1's arguments before it waits for c's frames, so c+1's transformer work fills the GPU while c
decodes. With the VAE on a second GPU (`vae_device`) that stream is on the VAE's GPU and c's x0 crosses over to it
first (`SideStream.take`), so c's decode and c+1's transformer work run on two GPUs at once. If the next `denoise`
asks for something else (the prompt changed, or a rewind), the speculative work is taken back: the state is put
back as it was before its clean-context pass and the chunk is redone. So the frames are exactly those of the eager
schedule; a switch costs one chunk's transformer work.

A chunk's work is one graph per denoising step (the first after the pending chunk's clean pass), and the work started
ahead is launched AHEAD_QUEUED steps at a time: `ahead` launches the first of them, and the device worker the next as
one ends (`pump`, called while it is idle). A switch then waits for at most those steps (at 480p on an H100 a pass
each, about 0.12 s, the first with the clean pass twice that), not for a whole chunk's work queued in one launch
(about 0.6 s), before its own work can start. Each step is timed between CUDA events, so that a switch's lead can
count what is left of them (`work_left`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .cli import CUBLAS_WORKSPACE
from .model import Block, LongSANATransformer, State, TextKV
from .sampling import bf16_round, chunk_step
from .step import Pending, SideStream
from .vae import StreamingDecoder

# torch.compile options of the compiled regions (tests on the CPU swap in backend="aot_eager": inductor's C++ build
# of even a tiny model takes minutes on 2 cores).
COMPILE_OPTIONS: dict = dict(dynamic=False)
_COMPILED: dict[tuple, object] = {}  # compiled functions by (function, options): a new one would compile anew
RECOMPILE_LIMIT = 64  # graphs per compiled function: (chunk length, pass kind) per resolution; the VAE's norm shapes
AHEAD_QUEUED = 2  # steps of the work started ahead queued on the device at a time: one running, one next (see the top)
STEP_TIMES = 5  # the last GPU times of each denoising step that `work_left` takes the median of


def compiled(fn):
    """`fn` compiled with COMPILE_OPTIONS, once per process (every caller shares its graphs)."""
    key = (fn, repr(sorted(COMPILE_OPTIONS.items())))
    if key not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(fn, **COMPILE_OPTIONS)
    return _COMPILED[key]


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(n, latent_hw, batch)} compiled


def _call_block(blk: Block, *args):
    return blk(*args)


def compile_block():
    """One compiled function for every transformer block: `run_prepared(..., block=compile_block())`."""
    return compiled(_call_block)


@dataclass
class _Buffers:
    """Static inputs and outputs of the step for chunks of n latent frames. The noise and the denoising RoPE table
    only for a length that is denoised (not one that is only ever a pending chunk cut short)."""

    x0: tuple[torch.Tensor, torch.Tensor]  # two output slots (B, C, n, h, w) fp32
    rope_clean: tuple[torch.Tensor, torch.Tensor]  # cos, sin (N, d/2) of a pending chunk of this length (clean pass)
    noise: torch.Tensor | None = None  # (steps, B, C, n, h, w) fp32: initial noise, then one per re-noising
    x: torch.Tensor | None = None  # (B, C, n, h, w) fp32: the chunk between two denoising steps
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # of the chunk being denoised


class _Launched(NamedTuple):
    """A denoising step launched on the device: CUDA timing events at its start and end, which step of the chunk it
    is (the first also runs the pending chunk's clean pass), and when it was launched (time.perf_counter())."""

    began: torch.cuda.Event
    end: torch.cuda.Event
    i: int
    at: float


class ChunkEngine:
    """The fast `ChunkStep` (step.py) of one stream. `denoise` launches a chunk's work and returns its x0, a static
    buffer; `ahead` launches the next chunk's before it is asked for, while this chunk decodes on the side stream."""

    works_ahead = True

    def __init__(self, model: LongSANATransformer, latent_hw: tuple[int, int], timesteps, bf16_like: bool = False,
                 batch: int = 1, compile: bool | None = None, graphs: bool | None = None,
                 vae_device: torch.device | None = None):
        """timesteps, bf16_like: as `sample_chunk`'s. compile / graphs default to True on CUDA, False elsewhere.
        vae_device: where the decoder is (default: the model's device)."""
        self.model, self.latent_hw, self.batch = model, tuple(latent_hw), batch
        self.device = model.proj_out.weight.device
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if self.graphs and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            warnings.warn(f"CUBLAS_WORKSPACE_CONFIG is not set: each chunk's launch will hold this thread for about "
                          f"half the chunk's work. Set it to {CUBLAS_WORKSPACE!r} before CUDA's first use, as the "
                          f"longsana command does (longsana/cli.py says why)", stacklevel=2)
        self.block = compile_block() if (cuda if compile is None else compile) else None
        if not timesteps:
            raise ValueError("the engine needs at least one timestep")
        self.timesteps, self.bf16_like = tuple(map(float, timesteps)), bf16_like
        self.t_net = tuple(bf16_round(t) if bf16_like else t for t in self.timesteps)  # what the network sees
        self.state = model.new_state(batch, *latent_hw, device=self.device)
        self._before = model.new_state(batch, *latent_hw, device=self.device)  # the boundary, while work runs ahead
        self._ahead: tuple[tuple, torch.Tensor] | None = None  # (denoise arguments, x0) of the work started ahead
        self._later: deque[tuple] = deque()  # the steps of the work started ahead not launched yet, as `_run` keys
        # Read by work_left on any thread, so replaced whole, never changed in place:
        self._queued: tuple[_Launched, ...] = ()  # the steps launched and not yet seen done (CUDA only)
        self._step_seconds: dict[int, tuple[float, ...]] = {}  # step i's last STEP_TIMES GPU times
        self._seen_done = 0.0  # when (time.perf_counter()) a step was last seen done
        self.side = SideStream(vae_device or self.device, self.device)  # the decodes: on the VAE's device
        self.main = torch.cuda.Stream(self.device) if cuda else None  # this step's own CUDA stream
        self._landed: torch.cuda.Event | None = None  # the last download's copy to the host
        with torch.inference_mode():
            self.temb = {t: model.timestep(torch.full((batch,), t, device=self.device), batch) for t in self.t_net}
            self.temb_clean = model.timestep(torch.zeros(batch, device=self.device), batch)  # the clean pass: t = 0
        self.generator = torch.Generator(self.device)
        self.text: TextKV | None = None  # the static copy the graphs read
        self._text_src: TextKV | None = None  # the prompt it holds
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._uses: dict[tuple, int] = {}
        self._pool = None  # one memory pool shared by this engine's graphs (they never run concurrently)
        self._capture_stream = torch.cuda.Stream(self.device) if self.graphs else None

    # -- the ChunkStep interface ----------------------------------------------------------------------------------
    def denoise(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None = None) -> torch.Tensor:
        """Returns x0 (B, C, n, h, w) fp32, a static buffer overwritten two chunks later: the work started ahead if
        it was started with these arguments, else (undoing that work's clean-context pass) launched now."""
        args = (text, n, pos, seed, pending)
        if self._ahead is not None and _same(self._ahead[0], args):
            x0, self._ahead = self._ahead[1], None
            self._launch_steps(len(self._later))
            return x0
        self.cancel()
        return self._launch(*args)

    def ahead(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None = None) -> None:
        """Start the next chunk's work now (it runs while the current one decodes), keeping the boundary's state
        so that the work can be taken back if the next chunk turns out different (a new prompt, a rewind). Its
        first AHEAD_QUEUED steps are launched now, the others by `pump` (see the top)."""
        self.cancel()
        self._before.copy_(self.state)
        self._ahead = (text, n, pos, seed, pending), self._launch(text, n, pos, seed, pending, AHEAD_QUEUED)

    def pump(self) -> bool:
        """Launch steps of the work started ahead while fewer than AHEAD_QUEUED are running or queued on the device;
        True while some are left to launch or to be seen done (the device worker calls this while idle)."""
        self._see_done()  # (first: a step done since the last call makes room for the next one now)
        self._launch_steps(AHEAD_QUEUED - len(self._queued))
        return bool(self._later or self._queued)

    def cancel(self) -> None:
        """Take back the work started ahead: its steps not launched are dropped, and the state is put back after
        those that were (queued after them on this step's stream)."""
        self._later.clear()
        if self._ahead is not None:
            self.state.copy_(self._before)
            self._ahead = None

    def work_left(self) -> float:
        """The device work launched and not yet done, estimated: each such step's median GPU time (of the last
        STEP_TIMES of that step), the first's less the time it has run, since its launch or since the step before
        it was seen done. 0 when none is left (on a CPU each step has run when its launch returns)."""
        left, now, first = 0.0, time.perf_counter(), True
        for s in self._queued:
            if s.end.query():  # (done, not yet seen by `pump`)
                continue
            need = self._step_time(s.i)
            left += max(need - (now - max(s.at, self._seen_done)), 0.0) if first else need
            first = False
        return left

    def chunk_work(self) -> float:
        """The sum of each denoising step's median GPU time (0 before any step was timed; on a CPU, always)."""
        return sum(self._step_time(i) for i in range(len(self.timesteps)))

    def device_idle(self) -> bool:
        """Whether this step's CUDA streams have run all they were given: the steps, the decodes, the downloads. (Of
        the work started ahead, while a step is left to launch another is queued: `pump` launches one as one ends.)
        True on a CPU, where the work has run when its call returns."""
        return all(s.query() for s in self.cuda_streams().values())

    def _step_time(self, i: int) -> float:
        """Step i's median GPU time, of its last STEP_TIMES (0 before it was timed)."""
        return statistics.median(self._step_seconds.get(i, (0.0,)))

    @property
    def nbytes(self) -> int:
        """Bytes of the engine's own device tensors: the state and its boundary copy, the static buffers of every
        chunk length, the static prompt copy (not the graphs' memory pool: the allocator holds that)."""
        buffers = [t for b in self._buffers.values() for t in (*b.x0, *b.rope_clean, b.noise, b.x, *(b.rope or ()))]
        text = [] if self.text is None else [*itertools.chain.from_iterable(self.text.kv), self.text.bias]
        return self.state.nbytes + self._before.nbytes + sum(t.nbytes for t in buffers + text if t is not None)

    def cuda_streams(self) -> dict[str, torch.cuda.Stream]:
        """This step's CUDA streams by role (for memory reports: the allocator keeps each stream's freed blocks for
        that stream's later work)."""
        named = dict(transformer=self.main, capture=self._capture_stream, decode=self.side.stream)
        return {role: s for role, s in named.items() if s is not None}

    def boundary_state(self) -> State:
        return self._before if self._ahead is not None else self.state

    def prepare(self, text: TextKV, n: int) -> None:
        """Get chunks of n latent frames ready now (once per process and model), not at the first such chunk,
        whose frames would wait: compile their block graphs (tens of seconds at full size), and run the plain
        blocks' clean pass once at every length a switch may cut such a chunk to, which compiles the eager path's
        Triton kernels for those token counts (1.4 s at the first cuts at full size) and takes every other first use
        of those shapes (cuBLAS's, the allocator's). All are passes of zeros against a scratch state, with `text` as
        the static prompt copy."""
        done = _PREPARED.setdefault(self.model, set())
        keys = {length: (length, kind, self.latent_hw, self.batch) for length, kind in
                [(n, "compiled"), *((cut, "cut") for cut in range(1, n))]}
        if self.block is None or done.issuperset(keys.values()):
            return
        m = self.model
        with torch.inference_mode(self.state.S.is_inference()):  # made as our state was: the graphs guard on it
            scratch = m.new_state(self.batch, *self.latent_hw, device=self.device)
        with torch.inference_mode():
            self._set_text(text)
            for length, key in keys.items():
                if key in done:
                    continue
                x = torch.zeros(self.batch, m.cfg.in_channels, length, *self.latent_hw, device=self.device)
                rope = self._rope(0, length)
                if length == n:
                    m.run_prepared(x, self.temb[self.t_net[0]], self.text, rope, scratch, block=self.block)
                self._clean_pass(x, rope, scratch, cut=length != n)
                done.add(key)

    def context(self):
        """Run on this step's own CUDA stream, after the work queued so far on the current one (where the device
        worker encodes prompts): the steps of several streams then wait for each other's work only where the GPU
        makes them, and one stream's decode waits for its own transformer work alone."""
        if self.main is None:
            return contextlib.nullcontext()
        self.main.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.main)

    def decode(self, decoder: StreamingDecoder, z: torch.Tensor, waited: bool = False) -> torch.Tensor:
        """Queued on the side stream (on the VAE's device, z handed over to it), after the transformer work queued
        so far, which produced z, or with `waited` after the side stream's last work (`SideStream.decode`)."""
        return self.side.decode(decoder, z, waited)

    def download(self, frames: torch.Tensor) -> np.ndarray:
        """A non-blocking copy into pinned host memory: the frames are there after `finish`, which the stream's
        consumer thread waits in, so the device worker can launch other streams' work meanwhile."""
        with self.side():
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=self.main is not None)
            host.copy_(frames, non_blocking=True)
            self._landed = self.side.mark()
        return host.numpy()

    def finish(self) -> None:
        if self._landed is not None:
            self._landed.synchronize()
            self._landed = None

    # -- the work ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _launch(self, text: TextKV, n: int, pos: int, seed: int, pending: Pending | None,
                steps: int | None = None) -> torch.Tensor:
        """The pending chunk's clean-context pass (with `text`), then the denoising steps of a chunk of n latent
        frames at RoPE position `pos`: the first `steps` of them (None: all), the others left for `_launch_steps`.
        Asynchronous on CUDA: nothing waits for the GPU."""
        self._set_text(text)
        out = self._buffers_for(n, denoise=True)
        g = self.generator.manual_seed(seed)
        for eps in out.noise:  # the eager sampler's draws, in its order
            eps.normal_(generator=g)
        prev = None
        if pending is not None:
            x0_prev, pos_prev = pending
            prev = self._slot_of(x0_prev)
            if prev is None:  # not one of ours (restored from a rewind point): copy it into a slot
                prev = (x0_prev.shape[2], 0)
                self._buffers_for(prev[0]).x0[0].copy_(x0_prev)
            _copy(self._buffers[prev[0]].rope_clean, self._rope(pos_prev, prev[0]))
        _copy(out.rope, self._rope(pos, n))
        slot = 1 if prev == (n, 0) else 0
        last = len(self.timesteps) - 1
        self._later = deque((prev if i == 0 else None, n, slot if i == last else None, i) for i in range(last + 1))
        self._launch_steps(len(self._later) if steps is None else steps)
        return out.x0[slot]

    @torch.inference_mode()
    def _launch_steps(self, k: int) -> None:
        """Launch the next k steps `_launch` left, each between two timing events on CUDA (`work_left`)."""
        self._see_done()
        for _ in range(min(k, len(self._later))):
            key, began, at = self._later.popleft(), self._mark(), time.perf_counter()
            self._run(key)
            if began is not None:
                self._queued = (*self._queued, _Launched(began, self._mark(), key[-1], at))

    def _see_done(self) -> None:
        """Forget the launched steps the device has done, keeping their GPU times."""
        queued = self._queued
        while queued and queued[0].end.query():
            s, queued = queued[0], queued[1:]
            times = (*self._step_seconds.get(s.i, ())[1 - STEP_TIMES:], s.began.elapsed_time(s.end) / 1e3)
            self._step_seconds = {**self._step_seconds, s.i: times}
            self._seen_done = time.perf_counter()
        self._queued = queued

    def _mark(self) -> torch.cuda.Event | None:
        """A timing event recorded on the current CUDA stream (None on a CPU)."""
        if self.main is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _step(self, prev: tuple[int, int] | None, n: int, slot: int | None, i: int) -> None:
        """What a graph holds: denoising step i (`chunk_step`) over run_prepared, on the static buffers; the first
        after the pending chunk's clean-context pass (prev: its x0 slot), the last writing x0 slot `slot`, the others
        the chunk between steps."""
        m, b = self.model, self._buffers[n]
        if prev is not None:
            p = self._buffers[prev[0]]
            self._clean_pass(p.x0[prev[1]], p.rope_clean, self.state, cut=p.noise is None)

        def velocity(x, t):
            return m.run_prepared(x, self.temb[t], self.text, b.rope, self.state, block=self.block)

        x = chunk_step(velocity, lambda: b.noise[i + 1], b.noise[0] if i == 0 else b.x, i, self.timesteps,
                       self.bf16_like)
        (b.x if slot is None else b.x0[slot]).copy_(x)

    def _clean_pass(self, x0: torch.Tensor, rope, state: State, cut: bool) -> None:
        """A pending chunk's clean-context pass into `state`; a cut length's through the plain blocks, with cuDNN's
        benchmark off (see the top)."""
        with cudnn_benchmark(False) if cut else contextlib.nullcontext():
            self.model.run_prepared(x0, self.temb_clean, self.text, rope, state, update_state=True, output=False,
                                    block=None if cut else self.block)

    def _run(self, key: tuple) -> None:
        """Step `key` (`_step`'s arguments): run at its first use, captured at its second, replayed after."""
        self._uses[key] = uses = self._uses.get(key, 0) + 1
        if not self.graphs or uses == 1:  # a variant used once (the first chunk) is never captured
            self._step(*key)
            return
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # Second use: captured, which records without running, then replayed: that replay is the use's work. No
        # warm-up run on the capture stream first (PyTorch's advice, for libraries that set up per-stream state
        # lazily): the first use ran this code already, and with no cuBLAS workspace (cli.py) nothing is set up per
        # stream. Such a run's activations stayed cached for that stream beside the graph pool's until the capture
        # began, the peak of a stream's GPU memory (+1.2 GB at 480p, benchmarks/RESULTS.md, 2026-12-06).
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream, capture_error_mode="thread_local"):
            self._step(*key)
        self._pool = graph.pool()
        self._graphs[key] = graph
        graph.replay()

    # -- static buffers -------------------------------------------------------------------------------------------
    def _buffers_for(self, n: int, denoise: bool = False) -> _Buffers:
        C, (h, w) = self.model.cfg.in_channels, self.latent_hw
        f32 = {"device": self.device, "dtype": torch.float32}
        shape = (self.batch, C, n, h, w)
        if n not in self._buffers:
            self._buffers[n] = _Buffers((torch.zeros(shape, **f32), torch.zeros(shape, **f32)), self._rope(0, n))
        b = self._buffers[n]
        if denoise and b.noise is None:
            b.noise, b.x = torch.empty(len(self.t_net), *shape, **f32), torch.empty(shape, **f32)
            b.rope = self._rope(0, n)
        return b

    def _rope(self, pos: int, n: int):
        m = self.model
        return m.rope(pos // m.cfg.patch_size[0], *m.token_grid(n, *self.latent_hw), device=self.device)

    def _slot_of(self, x0: torch.Tensor) -> tuple[int, int] | None:
        for n, b in self._buffers.items():
            for i, buf in enumerate(b.x0):
                if x0 is buf:
                    return n, i
        return None

    def _set_text(self, text: TextKV) -> None:
        """Copy a new prompt into the static TextKV. A prompt without a padding mask gets a zero bias (the graphs
        are captured with one)."""
        if text is self._text_src:
            return
        L = text.kv[0][0].shape[2]
        bias = text.bias if text.bias is not None else torch.zeros(self.batch, 1, 1, L, device=self.device,
                                                                   dtype=text.kv[0][0].dtype)
        if self.text is None:
            self.text = TextKV([(k.clone(), v.clone()) for k, v in text.kv], bias.clone())
        else:
            if self.text.bias.shape != bias.shape or len(self.text.kv) != len(text.kv):
                raise ValueError(f"prompt K/V of shape {tuple(bias.shape)} do not fit this engine's "
                                 f"{tuple(self.text.bias.shape)}")
            for (k, v), (k_new, v_new) in zip(self.text.kv, text.kv):
                k.copy_(k_new)
                v.copy_(v_new)
            self.text.bias.copy_(bias)
        if self.main is not None:  # encoded on another CUDA stream: its memory must outlive this stream's reads
            for t in [*itertools.chain.from_iterable(text.kv), *([] if text.bias is None else [text.bias])]:
                t.record_stream(self.main)
        self._text_src = text


CUDNN_TRIALS = 0  # algorithms cuDNN's benchmark times at a new shape, 0: all. PyTorch's default, the first 10 of
# cuDNN's heuristics, left the VAE's streaming decode 10% slower on an H100 (benchmarks/RESULTS.md, 2026-12-06)


def autotune_cudnn(trials: int = CUDNN_TRIALS) -> None:
    """cuDNN's benchmark on for the process, over every algorithm (`trials`: the first that many): the fast path's
    convs have fixed shapes, so each shape is timed once, at its first use, and runs the fastest algorithm after."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = trials


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's benchmark (the fastest algorithm found by timing them at each new shape) on or off, for a block of
    work. Safe to flip here: every device job runs on the one worker thread (worker.py)."""
    before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _same(a: tuple, b: tuple) -> bool:
    """Same denoise arguments: the same prompt and pending x0 objects (a new prompt or a restored x0 is a new one)."""
    (text, *nums, pending), (text_b, *nums_b, pending_b) = a, b
    same_pending = pending is pending_b or (pending is not None and pending_b is not None
                                            and pending[0] is pending_b[0] and pending[1] == pending_b[1])
    return text is text_b and nums == nums_b and same_pending


def _copy(dst: tuple[torch.Tensor, ...], src: tuple[torch.Tensor, ...]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)
