"""The fast chunk step (engine.py) against the eager reference step (step.py's `EagerStep`, which test_stream.py checks
against a plain by-hand reference), both through the `ChunkStep` interface, and the stream's fast path (speculative
next chunk, overlapped decode) against the eager stream.

On the CPU the engine runs without CUDA graphs: uncompiled it must equal the eager step bitwise (same operations,
same noise), compiled (backend aot_eager: dynamo tracing, functionalized in-place state updates) within fp32
rounding. The CUDA tests (skipped without a GPU) check graph replays against the eager step within bf16 tolerance.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounter

from longsana import engine as engine_mod
from longsana.cli import set_process_defaults
from longsana.config import get_config
from longsana.engine import AHEAD_QUEUED, ChunkEngine
from longsana.fp8 import to_fp8
from longsana.model import LongSANATransformer
from longsana.step import EagerStep, SideStream
from longsana.stream import Stream
from longsana.testing import (SWITCH_PROMPTS, needs_cuda, randomize_, rel_err, skip_without_fp8, switch_schedule,
                              tiny_pipeline, uncompiled)

P, Q = SWITCH_PROMPTS
TIMESTEPS = (1000.0, 960.0, 889.0, 727.0)
HW = (4, 4)  # latent size of the model tests


def model_and_text(device="cpu", dtype=torch.float32, layers=2, seed=0, fp8=False):
    """The tiny model; with `fp8` its block GEMMs in FP8, the rest bf16."""
    cfg = dataclasses.replace(get_config("tiny").transformer, num_layers=layers)
    model = randomize_(LongSANATransformer(cfg).eval(), seed).to(device, torch.bfloat16 if fp8 else dtype)
    if fp8:
        to_fp8(model)
    g = torch.Generator().manual_seed(seed + 1)
    y, mask = torch.randn(1, 9, cfg.caption_channels, generator=g), torch.ones(1, 9)
    mask[:, 6:] = 0
    with torch.no_grad():
        text = model.prepare_text(y.to(device), mask.to(device))
    return model, text


def run_both(model, text, engine, chunks, texts=None, bf16_like=False, keep=None):
    """Chunks [(n, seed), ...] through the engine and the eager step from the same (zero) state, each chunk's
    clean-context pass deferred to the next; keep[i] cuts chunk i's x0 to its first latent frames before it is
    pending (a switch inside it, as the stream cuts it). Returns both x0 lists and the eager state."""
    ref = EagerStep(model, HW, TIMESTEPS, bf16_like)
    ref.state.copy_(engine.state)
    got, want, pending, pending_ref, pos = [], [], None, None, 0
    for i, (n, seed) in enumerate(chunks):
        t = texts[i] if texts else text
        x0 = engine.denoise(t, n, pos, seed, pending)
        got.append(x0.clone())
        want.append(ref.denoise(t, n, pos, seed, pending_ref))
        pending, pending_ref = (x0, pos), (want[-1], pos)
        if keep and keep.get(i, n) < n:
            pending, pending_ref = ((x[:, :, :keep[i]].contiguous(), pos) for x in (x0, want[-1]))
        pos += keep.get(i, n) if keep else n
    return got, want, ref.state


def agree(got, want, state, ref_state, tol: float | None = None) -> None:
    """Each x0 and the state, fast against eager: bitwise (tol None) or within a relative error of tol."""
    pairs = [*zip(got, want), *zip(state.tensors(), ref_state.tensors())]
    if tol is None:
        assert all(torch.equal(a, b) for a, b in pairs)
    else:
        errors = [rel_err(a, b) for a, b in pairs]
        assert max(errors) < tol, f"relative errors (x0 per chunk, then the state): {[f'{e:.2e}' for e in errors]}"


CHUNKS = [(3, 11), (2, 12), (2, 13), (2, 14)]  # a longer first chunk, then a steady length


def test_uncompiled_engine_equals_the_eager_step_bitwise():
    model, text = model_and_text()
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=False)
    got, want, ref_state = run_both(model, text, engine, CHUNKS)
    agree(got, want, engine.state, ref_state)
    assert all(b.abs().sum() > 0 for b in ref_state.tensors())
    # two x0 slots per length alternate, so the previous chunk's x0 survives the next step
    assert len({engine._slot_of(engine._buffers[2].x0[i]) for i in (0, 1)}) == 2


def test_cut_pending_chunks_of_every_length_equal_the_eager_step():
    """A switch inside a chunk leaves its x0 cut to 1..n latent frames pending: the engine gives such a length only
    a clean-pass slot and RoPE table (no noise), and stays bitwise equal to the eager step, across a new prompt."""
    model, text = model_and_text()
    _, other = model_and_text(seed=7)
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=False)
    chunks = [(3, 11), (2, 12), (2, 13), (2, 14), (2, 15)]
    keep = {0: 1, 2: 1, 3: 2}  # cut the first chunk to 1 frame, a steady one to 1, then keep a whole one
    got, want, ref_state = run_both(model, text, engine, chunks, texts=[text, text, other, other, other], keep=keep)
    agree(got, want, engine.state, ref_state)
    assert engine._buffers[1].noise is None and engine._buffers[2].noise is not None


def test_cut_pending_chunks_run_without_cudnn_benchmark(monkeypatch):
    """The clean pass of a cut length (a new shape at each switch cut) runs with cuDNN's benchmark off, the
    denoising passes with it as set, and the setting is back after."""
    import longsana.model as model_mod

    calls, glu_conv = [], model_mod.glu_conv

    def spy(h, *args):
        calls.append((h.shape[1], torch.backends.cudnn.benchmark))
        return glu_conv(h, *args)

    monkeypatch.setattr(model_mod, "glu_conv", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model, text = model_and_text()
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=False)
    x0 = engine.denoise(text, 3, 0, 11)
    calls.clear()
    engine.denoise(text, 2, 3, 12, (x0[:, :, :1].contiguous(), 0))  # the first chunk cut to 1 latent frame
    clean = [c for c in calls if c[0] < calls[-1][0]]  # 1 frame's tokens, against the 2-frame chunk's
    assert clean and calls[:len(clean)] == clean and {on for _, on in clean} == {False}
    assert {on for _, on in calls[len(clean):]} == {True} and torch.backends.cudnn.benchmark


def test_engine_noise_is_the_eager_samplers():
    model, text = model_and_text()
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=False)
    engine.denoise(text, 3, 0, 5)
    g = torch.Generator().manual_seed(5)
    for eps in engine._buffers[3].noise:
        assert torch.equal(eps, torch.randn((1, 16, 3, *HW), generator=g))


def test_prompt_switch_and_foreign_pending_x0():
    """A new TextKV is copied into the static one; a pending x0 that is not one of the engine's slots (restored
    from a rewind point) is copied into one; bf16-rounded timesteps follow sample_chunk's bf16_like."""
    model, text = model_and_text()
    _, other = model_and_text(seed=7)
    engine = ChunkEngine(model, HW, TIMESTEPS, bf16_like=True, compile=False)
    got, want, _ = run_both(model, text, engine, CHUNKS[:3], texts=[text, other, text], bf16_like=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert engine.t_net == (1000.0, 960.0, 888.0, 728.0)
    foreign, ref = got[-1].clone(), EagerStep(model, HW, TIMESTEPS, bf16_like=True)
    ref.state.copy_(engine.state)
    x0 = engine.denoise(other, 2, 7, 3, (foreign, 5))
    assert engine._slot_of(x0) is not None and engine._text_src is other
    assert torch.equal(x0, ref.denoise(other, 2, 7, 3, (foreign, 5)))
    for a, b in zip(engine.state.tensors(), ref.state.tensors()):
        assert torch.equal(a, b)


def test_work_started_ahead_is_launched_a_few_steps_at_a_time():
    """`ahead` launches AHEAD_QUEUED of the next chunk's 4 denoising steps (the first after the pending chunk's
    clean pass), `pump` the others as the device has room (on the CPU each launch has run when it returns, so one
    call launches AHEAD_QUEUED more), `denoise` what is left when it takes the work. Taken pumped or not, the chunk is
    the eager step's; taken back after some of its steps, the state is the boundary's and the chunk asked for is the
    eager one."""
    model, text = model_and_text()
    _, other = model_and_text(seed=7)
    engine, ref = ChunkEngine(model, HW, TIMESTEPS, compile=False), EagerStep(model, HW, TIMESTEPS)
    x0, want = engine.denoise(text, 3, 0, 11), ref.denoise(text, 3, 0, 11, None)
    engine.ahead(text, 2, 3, 12, (x0, 0))
    assert len(engine._later) == len(TIMESTEPS) - AHEAD_QUEUED > 0
    assert engine.pump() is False and not engine._later
    x1, want1 = engine.denoise(text, 2, 3, 12, (x0, 0)), ref.denoise(text, 2, 3, 12, (want, 0))
    assert torch.equal(x1, want1)
    engine.ahead(text, 2, 5, 13, (x1, 3))
    x2, want2 = engine.denoise(text, 2, 5, 13, (x1, 3)), ref.denoise(text, 2, 5, 13, (want1, 3))  # not pumped
    assert torch.equal(x2, want2) and not engine._later
    before = [t.clone() for t in engine.state.tensors()]
    engine.ahead(text, 2, 7, 14, (x2, 5))
    assert engine._later and any(not torch.equal(a, b) for a, b in zip(engine.state.tensors(), before))
    x3 = engine.denoise(other, 2, 7, 14, (x2, 5))  # a new prompt: the work is taken back after 2 of its steps
    assert not engine._later and torch.equal(x3, ref.denoise(other, 2, 7, 14, (want2, 5)))
    agree([], [], engine.state, ref.state)
    engine.ahead(other, 2, 9, 15, (x3, 7))
    engine.cancel()
    assert not engine._later and engine.pump() is False and engine.work_left() == 0.0
    agree([], [], engine.state, ref.state)


@pytest.mark.slow
def test_compiled_blocks_share_one_graph_and_match_eager(monkeypatch):
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", counter)
    model, text = model_and_text(layers=3)
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=True)
    got, want, ref_state = run_both(model, text, engine, CHUNKS)
    # 3 blocks share each graph: per length (the first, the steady one) the denoising blocks, the clean pass's
    # blocks, and the clean pass's last block (state only)
    assert counter.frame_count == 6
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", "aot_eager")  # functionalized in-place updates
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=True)
    got, want, ref_state = run_both(model, text, engine, CHUNKS[:2])
    agree(got, want, engine.state, ref_state, 1e-5)


def test_prepare_compiles_what_a_chunk_length_needs_ahead_of_it(monkeypatch):
    """After prepare(text, n) a chunk of n latent frames, and its clean-context pass in the next chunk, compile
    nothing more; a second prepare does no work; the engine's state is untouched."""
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", counter)
    model, text = model_and_text(layers=2)
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=True)
    engine.state.S.normal_()
    before = engine.state.snapshot()
    engine.prepare(text, 1)
    assert counter.frame_count == 3  # the denoising blocks, the clean pass's blocks, its last block (state only)
    assert all(torch.equal(a, b) for a, b in zip(engine.state.tensors(), before.tensors()))
    calls = []
    with monkeypatch.context() as patched:
        patched.setattr(model, "run_prepared", lambda *a, **k: calls.append(a))
        engine.prepare(text, 1)
    assert not calls  # once per process and model
    x0 = engine.denoise(text, 1, 0, 5)
    engine.denoise(text, 1, 1, 6, (x0, 0))
    assert counter.frame_count == 3


def test_prepare_runs_the_plain_clean_pass_at_every_cut_length(monkeypatch):
    """prepare(text, n) also runs the uncompiled clean pass, cuDNN's benchmark off, at each length 1..n-1 a switch may
    cut a chunk of n to (their first use costs seconds at full size), once per process and model."""
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", "eager")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model, text = model_and_text(layers=2)
    calls, run_prepared = [], model.run_prepared

    def spy(x, *args, block=None, **kwargs):
        if block is None:
            calls.append((x.shape[2], kwargs.get("update_state"), torch.backends.cudnn.benchmark))
        return run_prepared(x, *args, block=block, **kwargs)

    monkeypatch.setattr(model, "run_prepared", spy)
    ChunkEngine(model, HW, TIMESTEPS, compile=True).prepare(text, 3)
    assert calls == [(1, True, False), (2, True, False)] and torch.backends.cudnn.benchmark
    ChunkEngine(model, HW, TIMESTEPS, compile=True).prepare(text, 3)
    ChunkEngine(model, HW, TIMESTEPS, compile=True).prepare(text, 2)  # its cut length was prepared with 3
    assert len(calls) == 2


def test_an_endless_stream_compiles_before_its_first_frame(pipe, monkeypatch):
    """Every chunk length of the stream (the first, the steady one, a switch's shorter one), each with its
    clean-context pass, compiled before the first frame: none between two frames later, through a switch."""
    torch._dynamo.reset()
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", "eager")  # (the VAE's prologues compile too)
    block_graphs = lambda: len(_debug_get_cache_entry_list(engine_mod._call_block.__code__))  # noqa: E731
    stream = pipe.stream(P, seed=0, compile=True, switch_chunk_frames=1)
    it = iter(stream)
    next(it)
    assert block_graphs() == 9  # 3 lengths x (denoising blocks, clean pass's blocks, its last block)
    stream.set_prompt(Q)
    for _ in range(4):
        next(it)
    assert block_graphs() == 9
    stream.close()


def test_warm_up_leaves_the_first_stream_nothing_to_compile(monkeypatch):
    """After Pipeline.warm_up (what `longsana serve` runs before it serves), a stream of the same settings compiles
    nothing, through its first chunks and a switch cut into a chunk: its first frames wait for no compilation. On
    the eager path there is nothing to warm."""
    pipe = tiny_pipeline(seed=7)  # a model of its own: prepare() remembers the models it prepared
    warm_up_then_stream(pipe, monkeypatch, switch_chunk_frames=1, compile=True)
    assert pipe.warm_up(say=pytest.fail, compile=False) is None


def warm_up_then_stream(pipe, monkeypatch, **settings):
    """Warm `pipe` up, then run a stream of `settings` with a switch; assert that it compiled nothing."""
    torch._dynamo.reset()
    counter = CompileCounter()  # counts every graph compiled with the engine's options: the blocks, the VAE's
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", counter)
    said = []
    assert pipe.warm_up(say=said.append, **settings) > 0
    warmed = counter.frame_count
    assert warmed > 0 and said[0].startswith(f"Warming up on {pipe.device}") and said[1].startswith("Warmed up in")
    assert not any(type(o) is Stream and o.pipe is pipe for o in gc.get_objects())  # freed before the cache empties
    stream = pipe.stream(P, seed=4, **settings)
    chunks = iter(stream)
    for _ in range(3):
        chunk = next(chunks)
    stream.set_prompt(Q, at_frame=chunk.start_frame)
    for _ in range(6):
        next(chunks)
    stream.close()
    assert counter.frame_count == warmed


@pytest.mark.parametrize("compile", [False, True])
def test_a_closed_stream_is_freed_while_the_worker_idles(pipe, monkeypatch, compile):
    """A stream that was closed and dropped is freed although no more work comes to the device worker (whose thread
    held its last job, and the fast path's poll, until the next came): a viewer's GPU memory (state, buffers, CUDA
    graphs) goes when the viewer does, and the warm-up's before the first viewer comes."""
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", "eager")
    stream = pipe.stream(P, seed=1, compile=compile)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    freed = threading.Event()
    weakref.finalize(stream, freed.set)
    stream.close()
    del stream, chunks
    for _ in range(100):
        gc.collect()
        if freed.wait(0.05):
            break
    assert freed.is_set()


def test_fp8_blocks_compile_and_match_the_eager_step(monkeypatch):
    """FP8 layers (row quantization, the scaled product) trace into the one shared block graph, functionalized: the
    compiled engine equals the eager step on the same FP8 model."""
    torch._dynamo.reset()
    monkeypatch.setitem(engine_mod.COMPILE_OPTIONS, "backend", "aot_eager")
    model, text = model_and_text(layers=2, fp8=True)
    engine = ChunkEngine(model, HW, TIMESTEPS, compile=True)
    got, want, ref_state = run_both(model, text, engine, CHUNKS[:3])
    agree(got, want, engine.state, ref_state, 1e-2)


def test_bad_engine_use():
    model, text = model_and_text()
    with pytest.raises(ValueError, match="CUDA graphs"):
        ChunkEngine(model, HW, TIMESTEPS, graphs=True)
    with pytest.raises(ValueError, match="at least one timestep"):
        ChunkEngine(model, HW, (), compile=False)


# -- the stream's fast path ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def schedule(pipe, compile, **settings):
    """Chunks of one stream with a prompt switch after chunk 1 and a rewind after chunk 3, then 2 more."""
    stream = pipe.stream(P, seed=3, compile=compile, early_first_frame=False, **settings)
    it, out = iter(stream), []
    for i in range(6):
        out.append(next(it))
        if i == 1:
            pipe.worker.run(lambda: None)  # the next chunk's work is launched first (worker.Later), then undone
            stream.set_prompt(Q)
        if i == 3:
            stream.rewind(len(out[3].frames) / stream.fps)  # to the start of chunk 3
    return stream, out


@pytest.mark.parametrize("forget", [False, True])
def test_fast_stream_equals_the_eager_stream_through_splits(pipe, monkeypatch, forget):
    uncompiled(monkeypatch)
    fast, got = switch_schedule(pipe, True, forget_on_switch=forget)
    eager, want = switch_schedule(pipe, False, forget_on_switch=forget)
    assert isinstance(fast.step, ChunkEngine) and isinstance(eager.step, EagerStep)
    assert [(c.index, c.start_frame, len(c.frames), c.prompt, c.request) for c in got] == \
           [(c.index, c.start_frame, len(c.frames), c.prompt, c.request) for c in want]
    assert [c.start_frame for c in got] == [0, 9, 17, 21, 29, 25, 33, 41, 45]
    for a, b in zip(got, want):
        assert np.array_equal(a.frames, b.frames)
    assert set(fast.step._buffers) == {1, 2, 3}  # a cut to 1 latent frame: its clean-pass slot only
    fast.close()


def watched(pipe, compile: bool, frames: int = 72, **settings) -> np.ndarray:
    """The video a consumer shows (each chunk or piece replaces what it holds from its start on) of a stream through
    a switch landing in the past (latent 6), a rewind inside a chunk (to latent 7) and a switch with a transition
    landing ahead (latent 14), each asked once the video reaches a frame count, whatever the pieces."""
    P, Q = SWITCH_PROMPTS
    stream = pipe.stream(P, seed=5, compile=compile, early_first_frame=False, switch_lead=0, **settings)
    actions = {24: lambda: stream.set_prompt(Q, at_frame=18), 36: lambda: stream.rewind(0.3, at_frame=32),
               48: lambda: stream.set_prompt(P, at_frame=50, transition_frames=12)}
    video = np.zeros((0, 32, 32, 3), np.uint8)
    for c in stream:
        assert c.start_frame <= len(video), "a gap"
        video = np.concatenate([video[:c.start_frame], c.frames])
        for k in [k for k in actions if len(video) >= k]:
            actions.pop(k)()
        if len(video) >= frames and not actions:
            stream.close()
            return video[:frames]


@pytest.mark.parametrize("compile, piece_frames", [(False, 1), (True, 1), (True, 2)])
def test_pieces_give_the_frames_of_whole_chunks(pipe, monkeypatch, compile, piece_frames):
    """piece_frames: the same video as whole chunks, eager or fast (the next chunk's work launched at a chunk's
    first piece), through switches and a rewind that land before, inside and after what was decoded."""
    uncompiled(monkeypatch)
    want = watched(pipe, False)
    assert np.array_equal(watched(pipe, compile, piece_frames=piece_frames), want)


def test_later_pieces_wait_for_nothing_new(pipe, monkeypatch):
    """A chunk's later pieces are queued after the side stream's last work, not after what the transformer's stream
    got since (the next chunk's work, launched at the first piece), which they do not need: the side stream waits
    once per chunk, not once per piece."""
    uncompiled(monkeypatch)
    waits = []
    monkeypatch.setattr(SideStream, "wait", lambda self: waits.append(1))
    stream = pipe.stream(P, seed=5, compile=True, early_first_frame=False, piece_frames=1)
    pieces = [c for _, c in zip(range(9), stream)]
    stream.close()
    chunks = {c.index for c in pieces}
    assert len(pieces) > len(chunks) > 2 and len(waits) == len(chunks)


def test_a_chunk_goes_out_before_the_next_chunks_work_is_launched(pipe, monkeypatch):
    """Chunk c's frames reach the consumer before `ahead` launches chunk c+1's work, which on a GPU can hold the
    launching thread for a while (benchmarks/RESULTS.md, 6 Dec): here each launch waits until the consumer holds the
    chunk before it, which, had that chunk waited for the launch, would time out."""
    uncompiled(monkeypatch)
    cond, held, waits = threading.Condition(), set(), []
    launch = ChunkEngine.ahead

    def ahead(self, *args):
        with cond:
            waits.append(cond.wait_for(lambda: stream.index - 1 in held, timeout=5))
        launch(self, *args)

    monkeypatch.setattr(ChunkEngine, "ahead", ahead)
    stream = pipe.stream(P, seed=5, compile=True, early_first_frame=False)
    for _, c in zip(range(4), stream):
        with cond:
            held.add(c.index)
            cond.notify_all()
    stream.close()
    assert len(waits) >= 2 and all(waits), waits


def test_the_idle_worker_launches_the_rest_of_the_work_started_ahead(pipe, monkeypatch):
    """The next chunk's steps that `ahead` left are launched by the device worker's poll once the chunk is handed
    out, not when the next chunk is asked for."""
    uncompiled(monkeypatch)
    launched, pump = [], ChunkEngine.pump  # how many steps were left at each call
    monkeypatch.setattr(ChunkEngine, "pump", lambda self: launched.append(len(self._later)) or pump(self))
    stream = pipe.stream(P, seed=5, compile=True, early_first_frame=False)
    it = iter(stream)
    next(it), next(it)  # chunk 1's hand-out started chunk 2's work
    deadline = time.monotonic() + 10
    while (stream.step._later or not launched) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.step._ahead is not None and not stream.step._later and launched[0] > 0
    stream.close()


@pytest.mark.parametrize("forget", [False, True])
def test_fast_stream_equals_the_eager_stream(pipe, monkeypatch, forget):
    """Also with forget_on_switch: the switch lands on the boundary the engine had worked ahead of."""
    uncompiled(monkeypatch)
    steps = []
    orig = ChunkEngine._launch
    monkeypatch.setattr(ChunkEngine, "_launch", lambda self, *a: steps.append(a[1:3]) or orig(self, *a))
    fast, got = schedule(pipe, True, forget_on_switch=forget)
    eager, want = schedule(pipe, False, forget_on_switch=forget)
    assert isinstance(fast.step, ChunkEngine) and isinstance(eager.step, EagerStep)
    assert [(c.index, c.start_frame, c.prompt, c.prompt_seq) for c in got] == \
           [(c.index, c.start_frame, c.prompt, c.prompt_seq) for c in want]
    assert [c.index for c in got] == [0, 1, 2, 3, 3, 4]  # the rewind replays chunk 3
    for a, b in zip(got, want):
        assert np.array_equal(a.frames, b.frames)
    # steps (n, pos): each chunk speculated right after its predecessor; the switch after chunk 1 redoes chunk 2,
    # the rewind after chunk 3 redoes chunk 3 (the speculated chunk 4 is dropped)
    assert steps[:4] == [(3, 0), (2, 3), (2, 5), (2, 5)]
    assert [b.index for b in fast.ring.points] == [b.index for b in eager.ring.points]
    for a, b in zip(fast.ring.points, eager.ring.points):
        assert (a.copy is None) == (b.copy is None) == (a.index == 0)  # the start is all zeros: nothing copied
        if a.copy is not None:
            (n, pos), x0s = a.copy.pending, [p.copy.x0[:, :, :p.copy.pending[0]] for p in (a, b)]
            assert b.copy.pending == (n, pos) and n > 0
            for x, y in zip([*a.copy.state.tensors(), x0s[0]], [*b.copy.state.tensors(), x0s[1]]):
                assert torch.equal(x, y)
    fast.close()


def test_fast_stream_memory_is_constant(pipe, monkeypatch):
    uncompiled(monkeypatch)
    stream = pipe.stream(P, seed=1, compile=True, chunk_frames=1, rewind_seconds=0)
    it = iter(stream)
    for _ in range(stream.ring.capacity + 2):  # the ring full, its oldest point's buffers reused
        next(it)
    ptrs = [a.data_ptr() for a in stream.state.tensors()]
    before = stream.memory_bytes()
    for _ in range(6):
        next(it)
    assert stream.memory_bytes() == before and [a.data_ptr() for a in stream.state.tensors()] == ptrs
    assert set(stream.step._buffers) == {1, 2}  # the first chunk's length and the steady one


# -- on a GPU -----------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=skip_without_fp8())])
def test_graph_replays_match_the_eager_step_on_the_gpu(fp8):
    torch._dynamo.reset()
    model, text = model_and_text("cuda", torch.bfloat16, layers=3, fp8=fp8)
    engine = ChunkEngine(model, HW, TIMESTEPS)
    assert engine.graphs and engine.block is not None
    chunks = CHUNKS + [(2, 15 + i) for i in range(4)]
    got, want, ref_state = run_both(model, text, engine, chunks)
    # A chunk is 4 steps: the first's variant is set by the pending chunk's slot, the last's by the output slot, the
    # middle ones by neither. The steady variants are run, then captured on their second use, then replayed.
    assert len(engine._graphs) == 6 and sorted(engine._uses.values()) == [1, 1, 1, 1, 1, 3, 3, 3, 4, 7, 7]
    # Compiled blocks fuse the elementwise work, so the activations round differently: bf16's 2**-8 relative, or
    # e4m3's 2**-4 where FP8 quantizes them (a value may round to a neighbour a step away, 2**-3). On an H100 the FP8
    # case differed by 1.0e-2..1.8e-2 in x0 and 5.8e-2 in the state, so e4m3's step is its bound, not bf16's 2e-2.
    agree(got, want, engine.state, ref_state, 2 ** -3 if fp8 else 2e-2)


@needs_cuda
def test_a_steps_second_use_is_its_capture_replayed_with_no_warm_up_run():
    """A step's first use runs it, its second captures it and replays the capture as its work: no run of the step on
    the capture stream outside the capture, whose activations would stay cached for that stream beside the graph
    pool's until the capture began (the peak of a stream's GPU memory, benchmarks/RESULTS.md, 2026-12-06)."""
    torch._dynamo.reset()
    model, text = model_and_text("cuda", torch.bfloat16, layers=2)
    engine = ChunkEngine(model, HW, TIMESTEPS)
    runs, step = [], engine._step
    engine._step = lambda *key: (runs.append((key, torch.cuda.is_current_stream_capturing())), step(*key))[1]
    got, want, ref_state = run_both(model, text, engine, CHUNKS + [(2, 15 + i) for i in range(4)])
    assert len(engine._graphs) == 6
    for key in engine._graphs:  # run, then captured (not run), then only replayed
        assert [capturing for k, capturing in runs if k == key] == [False, True], key
    agree(got, want, engine.state, ref_state, 2e-2)  # and the replay of the capture did the second use's work


def gpu_pipeline():
    pipe = tiny_pipeline()
    pipe.model.cuda().bfloat16()
    pipe.vae.cuda().bfloat16()
    pipe.text.model.cuda().bfloat16()
    pipe.device = torch.device("cuda")
    return pipe


@needs_cuda
def test_warm_up_on_the_gpu_leaves_the_first_stream_nothing_to_compile(monkeypatch):
    """As on the CPU, with a GPU's defaults: the fast path, the decoder's pieces replayed as CUDA graphs."""
    warm_up_then_stream(gpu_pipeline(), monkeypatch, switch_chunk_frames=1)


@needs_cuda
def test_fast_stream_on_the_gpu_equals_the_eager_stream():
    torch._dynamo.reset()
    pipe = gpu_pipeline()
    _, got = schedule(pipe, True)
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.benchmark_limit == 0  # every algorithm timed
    _, want = schedule(pipe, False)
    for a, b in zip(got, want):
        diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
        assert a.frames.shape == b.frames.shape and diff.mean() < 2.0, diff.mean()


@needs_cuda
def test_pieces_on_the_gpu_equal_whole_chunks():
    """A chunk's later pieces are decoded without waiting for the transformer's stream, where the next chunk's work
    is queued meanwhile: the same video as whole chunks, bitwise, through switches and a rewind (a piece that
    raced the work it needs, or work that overwrote what it reads, would differ)."""
    torch._dynamo.reset()
    pipe = gpu_pipeline()
    assert np.array_equal(watched(pipe, True, piece_frames=1), watched(pipe, True))


@needs_cuda
def test_gpu_rewind_replays_from_reused_pinned_copies():
    """Rewind points on a GPU are pinned host buffers, filled by non-blocking copies and reused as the ring turns:
    a rewind after the ring has turned several times replays the original chunks (a copy that raced the work
    after it would not)."""
    torch._dynamo.reset()
    stream = gpu_pipeline().stream(P, seed=6, compile=True, rewind_seconds=0, early_first_frame=False)
    it = iter(stream)
    original = [next(it) for _ in range(7)]
    copies = {id(b.copy) for b in stream.ring.points}
    assert [b.index for b in stream.ring.points] == [3, 4, 5, 6] and len(copies) == 4
    assert all(b.copy.x0.is_pinned() and b.copy.state.S.is_pinned() for b in stream.ring.points)
    # a full ring reaches back to its second oldest point (the oldest may turn before the request is taken)
    assert stream.rewind(100) == pytest.approx(sum(len(c.frames) for c in original[4:]) / 16)
    replay = [next(it), next(it)]
    assert [c.index for c in replay] == [4, 5]
    for a, b in zip(replay, original[4:6]):
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 0.1
    assert {id(b.copy) for b in stream.ring.points} <= copies | {id(c) for c in stream.ring.spare}
    stream.close()


@needs_cuda
@pytest.mark.parametrize("stagger", [0.0, 0.3])
def test_concurrent_streams_on_one_gpu_match_each_alone(stagger):
    """3 streams on their own threads, started together or apart: every CUDA graph capture happens on the
    pipeline's device worker, so none overlaps another stream's work (captured on the threads themselves, this
    crashed: "operation not permitted when stream is capturing"); each stream's frames equal the stream alone."""
    torch._dynamo.reset()
    pipe = gpu_pipeline()
    seeds, chunks = (11, 12, 13), 6
    alone = {s: take_chunks(pipe.stream(P, seed=s, compile=True), chunks) for s in seeds}
    got, errors = {}, []

    def run(s):
        try:
            got[s] = take_chunks(pipe.stream(P, seed=s, compile=True), chunks)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join()
    assert not errors, errors
    for s in seeds:
        for a, b in zip(got[s], alone[s]):
            diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
            assert a.frames.shape == b.frames.shape and diff.mean() < 2.0, diff.mean()


def take_chunks(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    stream.close()
    return out


@needs_cuda
def test_the_engine_times_its_steps_for_the_work_left():
    """work_left (what a switch's lead adds for the work under way): each step launched and not yet done at that
    step's median GPU time (timed between CUDA events), the first less the time it has run; 0 once all are done.
    chunk_work (the lead's time for a switch, until one is timed): the steps' medians summed."""
    pipe = gpu_pipeline()
    stream = pipe.stream(P, seed=1, compile=True)
    it = iter(stream)
    t = time.perf_counter()
    for _ in range(6):
        next(it)
    pipe.worker.run(lambda: None)  # the last hand-out's launch of the next chunk's work is done
    wall, step = time.perf_counter() - t, stream.step
    while pipe.worker.run(step.pump):  # the rest of the work started ahead launched, run and seen done
        torch.cuda.synchronize()
    times = step._step_seconds
    assert set(times) == set(range(len(step.timesteps))), times
    assert all(0 < len(x) <= engine_mod.STEP_TIMES and all(0 < y < wall for y in x) for x in times.values()), times
    assert step.work_left() == 0.0 and step._ahead is not None and not step._queued
    assert step.chunk_work() == pytest.approx(sum(statistics.median(x) for x in times.values()))

    def relaunch():  # the same work started ahead again, behind a spin that holds the device up
        step._step_seconds = {i: (10.0,) for i in times}  # as if each step had taken 10 s
        with step.context():
            torch.cuda._sleep(1_000_000_000)
            step.ahead(*step._ahead[0])

    pipe.worker.run(relaunch)
    assert 10.0 * (AHEAD_QUEUED - 1) < step.work_left() <= 10.0 * AHEAD_QUEUED
    torch.cuda.synchronize()
    assert step.work_left() == 0.0
    stream.close()


# A graph of one GEMM at a pass's own shape (a chunk's 15,600 tokens, dim 2240, bf16), captured in a fresh process;
# prints how many of its nodes are memsets (the driver's node types: 2 = memset).
MEMSETS_OF_A_GEMM = """
import ctypes, torch, torch.nn.functional as F
x = torch.randn(15600, 2240, device="cuda", dtype=torch.bfloat16)
w = torch.randn(2240, 2240, device="cuda", dtype=torch.bfloat16)
F.linear(x, w)
g = torch.cuda.CUDAGraph(keep_graph=True)
with torch.cuda.graph(g):
    F.linear(x, w)
cuda, n = ctypes.CDLL("libcuda.so.1"), ctypes.c_size_t(0)
cuda.cuGraphGetNodes(ctypes.c_void_p(g.raw_cuda_graph()), None, ctypes.byref(n))
nodes = (ctypes.c_void_p * n.value)()
cuda.cuGraphGetNodes(ctypes.c_void_p(g.raw_cuda_graph()), nodes, ctypes.byref(n))
kinds = [ctypes.c_int(-1) for _ in nodes]
for node, kind in zip(nodes, kinds):
    assert cuda.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)) == 0
print(n.value, sum(k.value == 2 for k in kinds))
"""


@needs_cuda
def test_the_process_settings_keep_cublas_memsets_out_of_the_graphs():
    """cuBLAS zeroes its workspace with a memset before a GEMM whose reduction it splits, and a CUDA graph's launch
    waits on memset nodes (a chunk's graph held the host for most of its run). The CLI's process settings give cuBLAS
    no workspace: no memset nodes. Without them this GEMM has one, which shows that the test looks at the cause."""
    def nodes(env):
        out = subprocess.run([sys.executable, "-c", MEMSETS_OF_A_GEMM], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return tuple(map(int, out.stdout.split()))

    bare = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    ours = dict(bare)
    set_process_defaults(ours)
    total, memsets = nodes(bare)
    assert total > 0 and memsets > 0, (total, memsets)
    total, memsets = nodes(ours)
    assert total > 0 and memsets == 0, (total, memsets)
