"""End-to-end streaming benchmark: `longsana bench` or `python -m longsana.benchmarks.fps` (GPU); `--tiny` is a smoke
test at a tiny size on any device.

Full LongSANA 2B / 480x832 shapes with random weights (the compute does not depend on the values; never zeros):
the transformer and the Wan VAE in bf16, and a full-size random Gemma-2-2B text encoder (bf16) behind a small
word-level tokenizer (the real one needs the hub). It prints, in order:
  1. the cost card: FLOPs of a denoising pass and of the clean-context pass, per chunk and per video frame; VAE
     FLOPs per frame; the matmul and copy ceilings measured in this run, and the FPS ceilings they imply;
  2. the stream, the product path (`Pipeline.stream` with the fast engine, default settings): time to first frame
     from prompt submit (a new prompt: text encoding included; the encoding alone too), then --chunks chunks of
     steady state: per-chunk latency median / p95, end-to-end FPS of the decoded uint8 frames handed out, peak
     GPU memory (weights and text encoder included) and torch.cuda.memory_allocated after every chunk (growth),
     and where the memory goes (weights, the engine's buffers, the VAE cache, the rest of what is allocated and
     reserved on the GPU, the rewind points in pinned host memory);
     `--chunk-variants 3,5` adds streams of those chunk lengths (the lower-latency settings) to the variants;
     with `--devices cuda:0,cuda:1` the stream is split: the transformer and text encoder on the first GPU, the
     VAE on the second (its peak memory reported too), so the decode of a chunk overlaps the next chunk's work;
  3. the chunk step: the fast step against the eager reference step on the same inputs (relative error of x0 and
     of the state, per chunk, graph replays included), and timings: eager pass, compiled pass, graph-replayed
     step (clean + 4 denoising passes) median / p95, transformer-only FPS; then where a steady chunk's time goes,
     stage by stage (transformer, decode to uint8 and its uint8 conversion, copy to the host), and their serial
     sum (the stream's variants above run with and without the decode overlapped);
  4. the VAE: streaming decode of a steady chunk in bf16 (as the stream runs it: norms compiled, --vae-frames-per-call
     latent frames a call; and variants: the other layout than `fast_vae.default_layout`'s, side by side with the
     stream's, on any device; on a GPU the plain decoder and the other of 1 or 2 latent frames a call), and the bf16
     vs fp32 decode error;
  5. diffusers 0.42.1 when importable: SanaVideoTransformer3DModel (eager, and with its blocks compiled) and
     AutoencoderKLWan, same weights, same shapes, same run, with our numbers as ratios;
  6. with `--precision bf16,fp8`: the stream (without its variants) and the chunk step again with an FP8 copy of the
     transformer (longsana/fp8.py), and each precision's x0 against an eager fp32 step, chunk by chunk;
then the targets, met or not, and one JSON line. Each section that fails is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import itertools
import json
import statistics
import time
import traceback

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

from longsana.benchmarks.vae import bench_diffusers as vae_diffusers
from longsana.benchmarks.vae import bench_ours as vae_ours
from longsana.benchmarks.vae import ceilings, decoder_cost, gb, sync, timed
from longsana.cli import set_process_defaults
from longsana.config import get_config
from longsana.engine import ChunkEngine, autotune_cudnn
from longsana.fast_vae import accelerate, default_layout
from longsana.fp8 import to_fp8
from longsana.model import LongSANATransformer
from longsana.step import EagerStep
from longsana.stream import Pipeline, StreamSettings, make_decoder
from longsana.testing import nearly_zero, randomize_, rel_err
from longsana.text import CHI_SANA, TextEncoder, build_gemma2, build_word_tokenizer
from longsana.vae import StreamingDecoder, WanVAE, to_uint8

PROMPTS = ("a red circle moving left on a black background", "two yellow squares bouncing up and down",
           "one white star spinning slowly", "three blue triangles moving right")
TARGETS = dict(e2e_fps=55.0, pass_ms=90.0, step_ms=460.0, tr_fps=87.0, fp8_pass_ms=70.0, vae_fps=130.0, ttff_s=0.7,
               peak_gb=16.0)  # issue 14 (the pass, the step, FP8) and issue 15 (end to end, VAE, first frame, memory)
PRECISIONS = ("bf16", "fp8")  # --precision: the transformer's; the benchmark's own pipeline is bf16
VARIANTS = (("no_rewind", dict(rewind_seconds=0)), ("no_rewind_serial", dict(rewind_seconds=0)),
            ("vae_1_per_call", dict(vae_frames_per_call=1)), ("vae_2_per_call", dict(vae_frames_per_call=2)),
            ("whole_chunks", dict(piece_frames=0)))  # each chunk decoded and handed out at once (2B: in pieces)


# -- models ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_vae(cfg, device, dtype: torch.dtype, seed: int = 1) -> WanVAE:
    """PyTorch's default init (never zeros), the same weights for every dtype."""
    torch.manual_seed(seed)
    with torch.device(device):
        vae = WanVAE(cfg)
    return vae.to(dtype).eval().requires_grad_(False)


def make_text_encoder(device, tiny: bool) -> TextEncoder:
    from transformers import Gemma2Config, Gemma2Model

    tok = build_word_tokenizer(["\n".join(CHI_SANA), " ".join(PROMPTS) + " motion score : . 10"])
    if tiny:
        return TextEncoder(tok, build_gemma2(len(tok), hidden_size=get_config("tiny").transformer.caption_channels)
                           .to(device))
    torch.manual_seed(2)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = Gemma2Model(Gemma2Config())  # gemma-2-2b: 2304 hidden, 26 layers, 256k vocabulary
    return TextEncoder(tok, model)


def build(a, device, vae_device=None) -> Pipeline:
    """The transformer and the text encoder on `device`, the VAE on `vae_device` (default: the same; or a second
    GPU)."""
    spec = get_config("tiny" if a.tiny else "longsana-2b-480p")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device), default_dtype(dtype):
        model = LongSANATransformer(spec.transformer)
    randomize_(model.eval().requires_grad_(False), 0)
    return Pipeline(model, make_vae(spec.vae, vae_device or device, dtype), make_text_encoder(device, a.tiny), spec)


@contextlib.contextmanager
def parked(model: torch.nn.Module):
    """`model` in host memory meanwhile, if on a GPU: another precision's stream then reads its own memory, not its
    own plus this model's weights."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


def with_fp8(pipe: Pipeline) -> Pipeline:
    """The same pipeline with an FP8 copy of its transformer (fp8.py; bf16 around the FP8 products, also where the
    benchmark's own model is fp32, on a CPU); the VAE and the text encoder are shared."""
    return Pipeline(to_fp8(copy.deepcopy(pipe.model).bfloat16()), pipe.vae, pipe.text, pipe.spec)


def devices_of(pipe: Pipeline) -> list[torch.device]:
    """The transformer's device, then the VAE's where it is another (a split stream)."""
    return list(dict.fromkeys([pipe.device, pipe.vae_device]))


def sync_all(pipe: Pipeline) -> None:
    for d in devices_of(pipe):
        sync(d)


def reset_peaks(pipe: Pipeline) -> None:
    for d in devices_of(pipe):
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def vae_peak(pipe: Pipeline) -> dict:
    """The peak allocated on the VAE's own GPU, for a split stream (the transformer's is the current device's)."""
    split = len(devices_of(pipe)) > 1 and pipe.vae_device.type == "cuda"
    return {"peak_allocated_vae_device": torch.cuda.max_memory_allocated(pipe.vae_device)} if split else {}


# -- 1. cost card --------------------------------------------------------------------------------------------------
def transformer_flops(cfg, hw: tuple[int, int], chunk: int) -> dict:
    """FLOPs of a denoising pass and of a clean-context pass over a chunk of `chunk` latent frames of size hw
    (counted on meta, with a 300-token prompt)."""
    with torch.device("meta"):
        m = LongSANATransformer(cfg).to(torch.bfloat16)
        text = m.prepare_text(torch.empty(1, 300, cfg.caption_channels), torch.ones(1, 300))
        state = m.new_state(1, *hw)
        x, t = torch.empty(1, cfg.in_channels, chunk, *hw), torch.zeros(1)
    flops = {}
    for name, kw in (("denoise", {}), ("clean", dict(update_state=True, output=False))):
        with FlopCounterMode(display=False) as f:
            m.forward_chunk(x, t, text, state, 0, **kw)
        flops[name] = f.get_total_flops()
    return flops


def cost_card(pipe: Pipeline, a, hw) -> dict:
    dev = pipe.device
    flops = transformer_flops(pipe.model.cfg, hw, a.chunk)
    frames = pipe.vae.cfg.temporal_stride * a.chunk
    steps = len(pipe.spec.denoise_timesteps)
    c = dict(pass_flops=flops["denoise"], clean_flops=flops["clean"],
             chunk_flops=steps * flops["denoise"] + flops["clean"], frames_per_chunk=frames)
    c["tr_flops_per_frame"] = c["chunk_flops"] / frames
    c["vae_flops_per_frame"] = decoder_cost(pipe.vae, a.height, a.width, a.chunk, pipe.vae.dtype)["flops_per_frame"]
    c |= ceilings(dev, pipe.vae.dtype, a.tiny)
    peak = c["matmul_flops_per_s"]
    c |= dict(pass_floor_ms=1e3 * flops["denoise"] / peak, tr_ceiling_fps=peak / c["tr_flops_per_frame"],
              vae_ceiling_fps=peak / c["vae_flops_per_frame"],
              e2e_ceiling_fps=peak / (c["tr_flops_per_frame"] + c["vae_flops_per_frame"]))
    print(f"## cost card ({a.chunk}-latent-frame chunk = {frames} video frames, {steps} denoising passes + 1 clean)")
    print(f"  denoising pass {flops['denoise'] / 1e12:.1f} TFLOP, clean pass {flops['clean'] / 1e12:.1f} TFLOP, "
          f"chunk {c['chunk_flops'] / 1e12:.0f} TFLOP -> transformer {c['tr_flops_per_frame'] / 1e12:.2f} "
          f"TFLOP/frame, VAE {c['vae_flops_per_frame'] / 1e12:.2f} TFLOP/frame")
    print(f"  measured: {peak / 1e12:.0f} TFLOP/s bf16 matmul, {c['copy_bytes_per_s'] / 1e9:.0f} GB/s copy -> "
          f"pass floor {c['pass_floor_ms']:.1f} ms; ceilings: transformer {c['tr_ceiling_fps']:.0f} FPS, VAE "
          f"{c['vae_ceiling_fps']:.0f} FPS, end to end {c['e2e_ceiling_fps']:.0f} FPS")
    return c


# -- 2. the stream -------------------------------------------------------------------------------------------------
def _mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _reserved() -> int:
    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def bench_stream(pipe: Pipeline, a) -> dict:
    r = {}
    settings = dict(vae_frames_per_call=a.vae_frames_per_call)
    r["warmup_s"] = pipe.warm_up(say=lambda line: None, **settings)  # as `longsana serve` runs before it serves
    reset_peaks(pipe)
    where = " and ".join(map(str, devices_of(pipe)))
    warm = "nothing to compile" if r["warmup_s"] is None else f"{r['warmup_s']:.1f} s"
    print(f"## stream (fast engine, default settings, on {where}): warm-up (Pipeline.warm_up: compilation) {warm}")

    t0 = time.perf_counter()
    pipe.prompts.get(PROMPTS[2], pipe.spec.motion_score)
    sync_all(pipe)
    r["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stream = pipe.stream(PROMPTS[1], seed=1, **settings)  # a prompt not seen before: encoded here
    it = iter(stream)
    first = next(it)
    r["ttff_s"] = time.perf_counter() - t0
    r["first_chunk_frames"] = len(first.frames)
    print(f"  time to first frame {r['ttff_s']:.3f} s (prompt submit -> first piece of {len(first.frames)} "
          f"frames handed out; text encoding alone {r['encode_s'] * 1e3:.0f} ms)")

    times, lat, frames, mem, reserved = [], [], [], [], []
    t_last = time.perf_counter()
    for k in range(a.chunks):
        n, seconds = next_chunk(it)
        times.append(time.perf_counter())
        lat.append(seconds)
        frames.append(n)
        mem.append(_mem())
        reserved.append(_reserved())
        if (k + 1) % 40 == 0:
            print(f"  ... {k + 1} chunks, {sum(frames) / (times[-1] - t_last):.1f} FPS overall, "
                  f"allocated {gb(mem[-1])}")
    w = min(a.settle, len(times) - 2)
    steady = lat[w + 1:]
    r["startup_latencies_s"] = lat[:w + 1]  # graph captures, the rewind ring's first (pinned) allocations
    print("  chunk latencies before the steady state: " + ", ".join(f"{x * 1e3:.0f}" for x in lat[:w + 1]) + " ms")
    r |= dict(chunks=a.chunks, settle=w, video_s=(len(first.frames) + sum(frames)) / stream.fps,
              e2e_fps=sum(frames[w + 1:]) / (times[-1] - times[w]),
              latency_median_s=statistics.median(steady), latency_p95_s=_p95(steady),
              mem_after_settle=mem[w], mem_last=mem[-1], mem_growth=mem[-1] - mem[w],
              mem_range_after_settle=max(mem[w:]) - min(mem[w:]), mem_per_chunk=mem,
              reserved_growth=reserved[-1] - reserved[w], reserved_per_chunk=reserved)
    if pipe.device.type == "cuda":
        r |= dict(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                  **vae_peak(pipe))
    r["memory"] = memory_card(pipe, stream)
    stream.close()
    del stream, it
    print(f"  steady state over chunks {w + 1}..{a.chunks} ({r['video_s']:.0f} s of video in all): "
          f"{r['e2e_fps']:.1f} FPS end to end; chunk latency median {r['latency_median_s'] * 1e3:.0f} ms, p95 "
          f"{r['latency_p95_s'] * 1e3:.0f} ms")
    print(f"  GPU memory: peak allocated {gb(r.get('peak_allocated'))}, reserved {gb(r.get('peak_reserved'))}; "
          f"allocated after chunk {w}: {gb(mem[w])}, after the last: {gb(mem[-1])} (growth {r['mem_growth']} "
          f"bytes, range {r['mem_range_after_settle']} bytes); reserved growth {r['reserved_growth']} bytes"
          + (f"; on the VAE's {pipe.vae_device}: peak allocated {gb(r['peak_allocated_vae_device'])}"
             if "peak_allocated_vae_device" in r else ""))

    chunk_sizes = [(f"chunk_{n}", dict(chunk_frames=n)) for n in a.chunk_variants]  # the latency setting's FPS
    for i, (key, settings) in enumerate([*VARIANTS, *chunk_sizes] if a.variant_chunks else ()):
        reset_peaks(pipe)
        t0 = time.perf_counter()
        stream = pipe.stream(f"{PROMPTS[i % 4]} ({key})", seed=2, **settings)  # a new prompt each
        if key.endswith("serial"):
            stream.step.ahead = lambda *args: None  # the next chunk's transformer work waits for this decode
        it = iter(stream)
        n = [len(next(it).frames)]
        ts = [time.perf_counter()]
        for _ in range(a.variant_chunks):
            n.append(next_chunk(it)[0])
            ts.append(time.perf_counter())
        r[f"ttff_s_{key}"] = ts[0] - t0
        w = min(a.settle, len(ts) - 2)  # as the main stream: after the graph captures and allocations
        r[f"e2e_fps_{key}"] = sum(n[w + 1:]) / (ts[-1] - ts[w])
        if pipe.device.type == "cuda":
            r[f"peak_allocated_{key}"] = torch.cuda.max_memory_allocated()
        stream.close()
        print(f"  {key} {settings}: time to first frame {r[f'ttff_s_{key}']:.3f} s, {r[f'e2e_fps_{key}']:.1f} FPS "
              f"end to end, peak allocated {gb(r.get(f'peak_allocated_{key}'))}")
    return r


def next_chunk(it) -> tuple[int, float]:
    """(frames, gen_seconds) of a stream's next chunk, gathered from its pieces (the rest of one begun)."""
    n = 0
    while True:
        c = next(it)
        n += len(c.frames)
        if c.ends_chunk:
            return n, c.gen_seconds


def memory_card(pipe: Pipeline, stream) -> dict:
    """Where a streaming pipeline's memory goes (bytes): the weights, the stream's own tensors (the engine's state
    and static buffers, the VAE's causal cache), and on the transformer's GPU what the allocator holds beyond those:
    the rest of what is allocated (the CUDA graphs' pool: activations; cached prompts) and what it has reserved but
    not allocated. The rewind points and the text encoder's token embedding table are in host memory."""
    def weights(m: torch.nn.Module, device: torch.device) -> int:
        return sum(t.nbytes for t in itertools.chain(m.parameters(), m.buffers()) if t.device == device)

    step = stream.step
    card = dict(transformer=weights(pipe.model, pipe.device), text_encoder=weights(pipe.text.model, pipe.device),
                vae=weights(pipe.vae, pipe.vae_device),
                engine=getattr(step, "nbytes", step.state.nbytes), vae_cache=stream.decoder.nbytes,
                rewind_host=stream.ring.nbytes)
    where = {"vae": pipe.vae_device, "vae_cache": pipe.vae_device, "rewind_host": torch.device("cpu")}
    here = sum(v for k, v in card.items() if where.get(k, pipe.device) == pipe.device)
    if pipe.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(pipe.device)
        card |= dict(other_allocated=allocated - here,
                     reserved_unallocated=torch.cuda.memory_reserved(pipe.device) - allocated)
    print("  memory: " + ", ".join(f"{k.replace('_', ' ')} {gb(v)}" for k, v in card.items()))
    if pipe.device.type == "cuda":
        card["reserved_by"] = by = reserved_by(pipe.device, getattr(step, "cuda_streams", dict)())
        print("  reserved by (allocated of it): " + ", ".join(f"{who} {gb(g['reserved'])} ({gb(g['allocated'])})"
                                                          for who, g in by.items()))
    return card


def reserved_by(device: torch.device, streams: dict[str, torch.cuda.Stream]) -> dict[str, dict[str, int]]:
    """The allocator's memory on `device` by who may reuse it: each CUDA graph's pool (its activations, allocated only
    while it is captured) and the ordinary pool by CUDA stream, since a block freed by one stream's work is reused
    only by that stream's. {who: {"reserved": bytes, "allocated": bytes}}; `streams` names the streams by role."""
    names = {0: "default stream"} | {s.cuda_stream: name for name, s in streams.items()}
    index = torch.cuda.current_device() if device.index is None else device.index
    out = {}
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] != index:
            continue
        pool = tuple(seg.get("segment_pool_id") or (0, 0))
        who = f"graph pool {pool}" if pool != (0, 0) else names.get(seg["stream"], f"stream {seg['stream']:#x}")
        g = out.setdefault(who, dict(reserved=0, allocated=0))
        g["reserved"] += seg["total_size"]
        g["allocated"] += seg["allocated_size"]
    return out


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error; absolute where the reference is zero (the state before the first clean pass)."""
    return (out.double() - ref.double()).norm().item() if nearly_zero(ref) else rel_err(out, ref)


def _p95(xs) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def profile(fn, title: str, rows: int, calls: int = 1) -> list:
    """The GPU kernels of an fn() call (averaged over `calls` calls), by self device time (the top `rows`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / calls
    print(f"  profile of {title}: {total / 1e3:.1f} ms of kernels")
    out = []
    for e in events[:rows]:
        ms, n = e.self_device_time_total / calls / 1e3, e.count // calls
        out.append(dict(name=e.key[:90], ms=ms, calls=n))
        print(f"    {ms:8.2f} ms {n:5d}x  {e.key[:90]}")
    return out


# -- 3. the chunk step ---------------------------------------------------------------------------------------------
def against_reference(engine: ChunkEngine, ref: EagerStep, text, ref_text, seq):
    """Chunks (n latent frames, seed) of `seq` through the fast step and the reference step, each chunk from the fast
    step's own state and pending x0 (the reference's state is set to the fast step's first), so that differences do
    not compound across chunks. Yields (n, pos, x0, the reference's x0) per chunk."""
    pending, pos = None, 0
    for n, seed in seq:
        ref.state.copy_(engine.state)
        x0 = engine.denoise(text, n, pos, seed, pending)
        yield n, pos, x0, ref.denoise(ref_text, n, pos, seed, pending)
        pending, pos = (x0, pos), pos + n


def bench_step(pipe: Pipeline, a, hw) -> dict:
    m, dev = pipe.model, pipe.device
    timesteps = tuple(map(float, pipe.spec.denoise_timesteps))
    text = pipe.prompts.get(PROMPTS[0], pipe.spec.motion_score).ctx
    engine, ref = ChunkEngine(m, hw, timesteps), EagerStep(m, hw, timesteps)
    ref_state = ref.state
    # accuracy: each fast step against the eager reference step from the same state and pending x0
    seq = [(a.chunk + 1, 100)] + [(a.chunk, 101 + i) for i in range(7)]  # steps 4, 5 capture; 6, 7 replay
    errs = []
    for n, pos, x0, want in against_reference(engine, ref, text, text, seq):
        errs.append(dict(n=n, x0=_err(x0, want), S=_err(engine.state.S, ref_state.S),
                         z=_err(engine.state.z, ref_state.z), tail=_err(engine.state.tail, ref_state.tail)))
    pending, pos = (x0, pos), pos + n
    g = torch.Generator(dev).manual_seed(seq[-1][1])
    noise_equal = torch.equal(engine._buffers[a.chunk].noise[0],
                              torch.randn((1, m.cfg.in_channels, a.chunk, *hw), generator=g, device=dev))
    r = dict(errors=errs, noise_equal=noise_equal, graphs=len(engine._graphs),
             max_x0_err=max(e["x0"] for e in errs),
             max_state_err=max(max(e["S"], e["z"], e["tail"]) for e in errs))
    print(f"## chunk step: fast vs eager reference, {len(seq)} chunks ({len(engine._graphs)} CUDA graphs captured, "
          f"the last 2 chunks replayed on a GPU): max rel. error x0 {r['max_x0_err']:.2e}, state "
          f"{r['max_state_err']:.2e}; noise identical: {noise_equal}")
    for i, e in enumerate(errs):
        print(f"  chunk {i} ({e['n']} latent frames): x0 {e['x0']:.2e}, S {e['S']:.2e}, z {e['z']:.2e}, "
              f"tail {e['tail']:.2e}")

    # timings
    x = torch.randn(1, m.cfg.in_channels, a.chunk, *hw, device=dev)
    t = torch.tensor([960.0], device=dev)
    with torch.inference_mode():
        eager = timed(lambda: m.forward_chunk(x, t, text, ref_state, pos), dev, 1, max(2, a.reps // 2))
        rope = m.rope(pos, *m.token_grid(a.chunk, *hw), device=dev)
        temb = engine.temb[engine.t_net[1]]
        compiled = timed(lambda: m.run_prepared(x, temb, text, rope, ref_state, block=engine.block),
                         dev, 2, a.reps)
    steps = []
    for i in range(a.reps):
        sync(dev)
        t0 = time.perf_counter()
        x0 = engine.denoise(text, a.chunk, pos, 200 + i, pending)
        sync(dev)
        steps.append(time.perf_counter() - t0)
        pending, pos = (x0, pos), pos + a.chunk
    r |= dict(eager_pass_s=eager["median_s"], compiled_pass_s=compiled["median_s"],
              step_median_s=statistics.median(steps), step_p95_s=_p95(steps))
    r["tr_fps"] = pipe.vae.cfg.temporal_stride * a.chunk / r["step_median_s"]
    if a.profile and dev.type == "cuda":
        with torch.inference_mode():
            r["profile"] = profile(lambda: m.run_prepared(x, temb, text, rope, ref_state,
                                                          block=engine.block), "a compiled denoising pass", a.profile)
    print(f"  denoising pass ({a.chunk} latent frames): eager {r['eager_pass_s'] * 1e3:.1f} ms, compiled "
          f"{r['compiled_pass_s'] * 1e3:.1f} ms; graph-replayed chunk step (clean + {len(timesteps)} passes) "
          f"median {r['step_median_s'] * 1e3:.1f} ms, p95 {r['step_p95_s'] * 1e3:.1f} ms "
          f"({r['step_median_s'] * 1e3 / (len(timesteps) + 1):.1f} ms a pass) -> transformer alone "
          f"{r['tr_fps']:.1f} FPS")
    return r


def bench_accuracy(pipes: dict[str, Pipeline], a, hw) -> dict:
    """Each precision's fast step against an eager fp32 step of the same weights (the bf16 ones, in fp32): the
    relative error of x0 per chunk (`against_reference`)."""
    base = next(iter(pipes.values()))
    timesteps = tuple(map(float, base.spec.denoise_timesteps))
    m32 = copy.deepcopy(base.model).float()
    entry = base.prompts.get(PROMPTS[0], base.spec.motion_score)
    text32 = m32.prepare_text(entry.emb, entry.mask)
    ref = EagerStep(m32, hw, timesteps)
    seq = [(a.chunk + 1, 100)] + [(a.chunk, 101 + i) for i in range(5)]
    r = {}
    for name, pipe in pipes.items():
        engine, text = ChunkEngine(pipe.model, hw, timesteps), pipe.prompts.get(PROMPTS[0], pipe.spec.motion_score).ctx
        r[name] = [_err(x0, want) for _, _, x0, want in against_reference(engine, ref, text, text32, seq)]
    del m32, ref
    print(f"## accuracy: x0 of the fast step against an fp32 eager step, same weights, per chunk ({len(seq)} chunks)")
    for name, errs in r.items():
        print(f"  {name:5s} " + " ".join(f"{e:.2e}" for e in errs) + f"   max {max(errs):.2e}")
    return r


def bench_stages(pipe: Pipeline, a, hw) -> dict:
    """Where a steady chunk's time goes, each stage run alone and synchronized: the transformer step (clean-context
    pass + denoising passes, graph-replayed on a GPU), the VAE decode to uint8 frames on the device (as the stream
    runs it; of which the uint8 conversion, timed alone on a video of the same size), and the copy of the frames to
    pinned host memory. Their sum is a chunk's serial time: what the stream takes without overlapping the decode
    with the next chunk's transformer work. Also how long the transformer step's launch held the host (`launch_s`,
    of `transformer_s`) and the decode's (`decode_launch_s`): a graph replay is meant to return at once; a launch
    that waits keeps the stream's frames and the device worker's other jobs waiting too."""
    m, dev, vae = pipe.model, pipe.device, pipe.vae
    accelerate(vae.decoder, compile=dev.type == "cuda")  # as make_step does
    settings = StreamSettings.from_spec(pipe.spec, vae_frames_per_call=a.vae_frames_per_call)
    engine = ChunkEngine(m, hw, settings.timesteps, vae_device=pipe.vae_device)
    dec = make_decoder(pipe, a.height, a.width, settings)  # as the stream makes it
    text = pipe.prompts.get(PROMPTS[0], pipe.spec.motion_score).ctx
    stages: dict[str, list[float]] = {"transformer": [], "decode": [], "host copy": []}
    launch, decode_launch = [], []
    warm = 5  # the first chunk's length, then the steady length's two variants (x0 slots alternate): a first use
    # and a graph capture each
    pending, pos = None, 0
    for i in range(warm + a.reps):
        n = a.chunk + (1 if i == 0 else 0)
        t = [time.perf_counter()]
        x0 = engine.denoise(text, n, pos, 300 + i, pending)
        launched = time.perf_counter()
        sync(dev)
        t.append(time.perf_counter())
        frames = dec.decode(x0)
        decode_launched = time.perf_counter()
        sync(pipe.vae_device)
        t.append(time.perf_counter())
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=dev.type == "cuda")
        host.copy_(frames)
        t.append(time.perf_counter())
        if i >= warm:
            launch.append(launched - t[0])
            decode_launch.append(decode_launched - t[1])
            for key, t0, t1 in zip(stages, t, t[1:]):
                stages[key].append(t1 - t0)
        pending, pos = (x0, pos), pos + n
    video = torch.rand(1, 3, vae.cfg.temporal_stride * a.chunk, a.height, a.width, device=pipe.vae_device,
                       dtype=vae.dtype) * 2 - 1
    uint8 = timed(lambda: to_uint8(video), pipe.vae_device, 2, a.reps)["median_s"]
    r = {f"{key.replace(' ', '_')}_s": statistics.median(ts) for key, ts in stages.items()}
    r |= dict(uint8_s=uint8, serial_s=sum(r.values()), launch_s=statistics.median(launch),
              decode_launch_s=statistics.median(decode_launch), frames=vae.cfg.temporal_stride * a.chunk)
    r["serial_fps"] = r["frames"] / r["serial_s"]
    print(f"## stages of a steady chunk ({r['frames']} frames), each alone, medians of {a.reps}: "
          + ", ".join(f"{key} {r[key.replace(' ', '_') + '_s'] * 1e3:.1f} ms" for key in stages)
          + f" (of the transformer, its launch held the host {r['launch_s'] * 1e3:.1f} ms; of the decode, its launch"
          f" {r['decode_launch_s'] * 1e3:.1f} ms and the uint8 conversion {uint8 * 1e3:.1f} ms); serial"
          f" {r['serial_s'] * 1e3:.1f} ms = {r['serial_fps']:.1f} FPS")
    return r


# -- 4. the VAE ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def decoder_layout(vae: WanVAE, channels_last: bool | None):
    """The fast path in the given layout (None: the decoder as it is) inside, as a stream runs it after."""
    if channels_last is None:
        yield
        return
    compile = vae.device.type == "cuda"  # as in bench_vae
    accelerate(vae.decoder, compile=compile, channels_last=channels_last)
    try:
        yield
    finally:
        accelerate(vae.decoder, compile=compile)


def bench_vae(pipe: Pipeline, a, hw) -> dict:
    vae, dev = pipe.vae, pipe.vae_device
    z_first = torch.randn(1, vae.cfg.z_dim, 1 + a.chunk, *hw, device=dev)
    accelerate(vae.decoder, compile=dev.type == "cuda")  # as make_step does (it has, if the stream section ran)
    ours = default_layout(vae.decoder)  # the stream's layout
    flipped = f"channels-last {'off' if ours else 'on'}"  # the other layout, side by side
    layouts = {ours: "as the stream runs it", not ours: flipped}
    per_call, graphs = a.vae_frames_per_call, dev.type == "cuda"  # the stream's
    # (vae, max_latent_frames_per_call, channels_last, CUDA graphs)
    variants = {layouts[ours]: (vae, per_call, None, graphs)}
    if graphs:  # what the graphs save, always beside them
        variants["launched op by op (no CUDA graphs)"] = (vae, per_call, None, False)
    if a.vae_variants:
        variants[layouts[not ours]] = (vae, per_call, not ours, graphs)
    if a.vae_variants and dev.type == "cuda":
        variants["plain (no fast_vae)"] = (make_vae(vae.cfg, dev, vae.dtype), per_call, None, False)
        other = 2 if per_call == 1 else 1
        variants[f"{other} latent frame{'s' * (other > 1)} per call"] = (vae, other, None, graphs)
    r = dict(variants={})
    print(f"## VAE streaming decode, {vae.dtype}, steady chunks of {a.chunk} latent frames")
    for name, (v, pieces, channels_last, graphed) in variants.items():
        try:
            with decoder_layout(v, channels_last):
                out = vae_ours(v, a.height, a.width, a.chunk, pieces, 1, max(2, a.reps // 2), z_first, graphed)
        except Exception as e:  # a variant that fails is reported, not fatal
            print(f"  {name}: failed: {type(e).__name__}: {e}")
            continue
        r["variants"][name] = out
        print(f"  {name}: steady {out['steady_fps']:.1f} FPS ({out['steady_s'] * 1e3:.0f} ms / "
              f"{vae.cfg.temporal_stride * a.chunk} frames, peak {gb(out['steady_peak_bytes'])}); first chunk "
              f"{out['first_s'] * 1e3:.0f} ms")
    if all(name in r["variants"] for name in layouts.values()):
        on, off = (r["variants"][layouts[x]] for x in (True, False))
        r["channels_last_speedup"] = on["steady_fps"] / off["steady_fps"]
        print(f"  default layout -> channels-last: steady {off['steady_fps']:.1f} -> {on['steady_fps']:.1f} FPS "
              f"(x{r['channels_last_speedup']:.2f}), peak {gb(off['steady_peak_bytes'])} -> "
              f"{gb(on['steady_peak_bytes'])}; first chunk {off['first_s'] * 1e3:.0f} -> {on['first_s'] * 1e3:.0f} ms")
    r["steady_fps"] = r["variants"]["as the stream runs it"]["steady_fps"]
    r["best_variant"] = max(r["variants"], key=lambda k: r["variants"][k]["steady_fps"])
    ref = make_vae(vae.cfg, dev, torch.float32)
    want = StreamingDecoder(ref, a.height, a.width).decode_float(z_first)
    got = StreamingDecoder(vae, a.height, a.width).decode_float(z_first)
    r["bf16_vs_fp32_err"] = rel_err(got, want)
    best, pieces, channels_last, _ = variants[r["best_variant"]]
    with decoder_layout(best, channels_last):
        r["best_vs_fp32_err"] = rel_err(StreamingDecoder(best, a.height, a.width, max_latent_frames_per_call=pieces)
                                        .decode_float(z_first), want)
    levels = (StreamingDecoder(vae, a.height, a.width).decode(z_first).int()
              - StreamingDecoder(ref, a.height, a.width).decode(z_first).int()).abs()
    r["uint8_mean_abs_diff"], r["uint8_max_abs_diff"] = levels.float().mean().item(), levels.max().item()
    del ref, want, got, levels
    print(f"  {vae.dtype} vs fp32 decode: relative error {r['bf16_vs_fp32_err']:.2e} (best variant "
          f"'{r['best_variant']}': {r['best_vs_fp32_err']:.2e}); uint8 frames differ by {r['uint8_mean_abs_diff']:.2f}"
          f" levels on average, {r['uint8_max_abs_diff']} at most")
    if a.profile and dev.type == "cuda":
        dec = StreamingDecoder(vae, a.height, a.width)
        dec.decode(z_first[:, :, :1])
        r["profile"] = profile(lambda: dec.decode(z_first[:, :, 1:]), f"a steady VAE decode ({vae.dtype})",
                               a.profile)
    return r


# -- 5. diffusers --------------------------------------------------------------------------------------------------
def bench_diffusers(pipe: Pipeline, a, hw) -> dict:
    from diffusers import SanaVideoTransformer3DModel

    m, dev, cfg = pipe.model, pipe.device, pipe.model.cfg
    kw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device(dev):  # not meta: diffusers computes buffers (RoPE) at construction
        ref = SanaVideoTransformer3DModel(**kw)
    ref.load_state_dict(m.state_dict(), assign=True)  # our tensors: its own weights are freed
    ref.eval().requires_grad_(False)
    dtype = m.proj_out.weight.dtype
    x = torch.randn(1, cfg.in_channels, a.chunk, *hw, device=dev, dtype=dtype)
    y = torch.randn(1, 300, cfg.caption_channels, device=dev, dtype=dtype)
    t, mask = torch.tensor([960.0], device=dev), torch.ones(1, 300, device=dev)
    fn = lambda: ref(x, y, t, encoder_attention_mask=mask)  # noqa: E731
    r = {}
    with torch.no_grad():
        r["tr_eager_pass_s"] = timed(fn, dev, 1, max(2, a.reps // 2))["median_s"]
        print(f"## diffusers: transformer pass ({a.chunk} latent frames, bidirectional) eager "
              f"{r['tr_eager_pass_s'] * 1e3:.1f} ms", end="", flush=True)
        if a.diffusers_compile:
            for blk in ref.transformer_blocks:
                blk.compile(dynamic=False)
            r["tr_compiled_pass_s"] = timed(fn, dev, 2, a.reps)["median_s"]
            print(f", blocks compiled {r['tr_compiled_pass_s'] * 1e3:.1f} ms", end="")
        print()
    z_first = torch.randn(1, pipe.vae.cfg.z_dim, 1 + a.chunk, *hw, device=pipe.vae_device)
    d, _ = vae_diffusers(pipe.vae, z_first, 1, max(2, a.reps // 2))
    r["vae_fps"], r["vae_peak"] = d["fps"], d["peak_bytes"]
    frames = pipe.vae.cfg.temporal_stride * a.chunk
    steps = len(pipe.spec.denoise_timesteps) + 1
    r["serial_e2e_fps_eager"] = frames / (steps * r["tr_eager_pass_s"] + frames / r["vae_fps"])
    if "tr_compiled_pass_s" in r:
        r["serial_e2e_fps_compiled"] = frames / (steps * r["tr_compiled_pass_s"] + frames / r["vae_fps"])
    print(f"  VAE decode of {1 + a.chunk} latent frames ({pipe.vae.dtype}): {r['vae_fps']:.1f} FPS; serial end "
          f"to end ({steps} passes + decode): {r['serial_e2e_fps_eager']:.1f} FPS eager"
          + (f", {r['serial_e2e_fps_compiled']:.1f} FPS compiled" if "serial_e2e_fps_compiled" in r else ""))
    return r


# -- summary -------------------------------------------------------------------------------------------------------
def targets(res: dict, full_size: bool = True) -> dict:
    """The issues' targets, each marked met or not; none is judged off the full model's shapes (--tiny)."""
    s, st, v = res.get("stream", {}), res.get("step", {}), res.get("vae", {})
    pass_ms = 1e3 * st["compiled_pass_s"] if "compiled_pass_s" in st else None
    step_ms = 1e3 * st["step_median_s"] if "step_median_s" in st else None
    fp8_step = res.get("fp8", {}).get("step", {})
    fp8_pass_ms = 1e3 * fp8_step["compiled_pass_s"] if "compiled_pass_s" in fp8_step else None
    fp8_err = max(res["accuracy"]["fp8"]) if "fp8" in res.get("accuracy", {}) else None
    vae_fps = max((x["steady_fps"] for x in v.get("variants", {}).values()), default=None)
    peak = s.get("peak_reserved")
    rows = [
        ("end-to-end FPS (steady, uint8 frames out)", s.get("e2e_fps"), f">= {TARGETS['e2e_fps']}",
         lambda x: x >= TARGETS["e2e_fps"]),
        ("transformer pass, 10-frame chunk (ms, compiled)", pass_ms, f"<= {TARGETS['pass_ms']}",
         lambda x: x <= TARGETS["pass_ms"]),
        ("graph-replayed chunk step (ms)", step_ms, f"<= {TARGETS['step_ms']}", lambda x: x <= TARGETS["step_ms"]),
        ("transformer alone (FPS)", st.get("tr_fps"), f">= {TARGETS['tr_fps']}", lambda x: x >= TARGETS["tr_fps"]),
        ("FP8 transformer pass (ms, compiled)", fp8_pass_ms, f"<= {TARGETS['fp8_pass_ms']}",
         lambda x: x <= TARGETS["fp8_pass_ms"]),
        ("FP8 end-to-end FPS", res.get("fp8", {}).get("stream", {}).get("e2e_fps"), f">= {TARGETS['e2e_fps']}",
         lambda x: x >= TARGETS["e2e_fps"]),
        ("FP8 x0 vs fp32, max rel. error (reported)", fp8_err, "-", lambda x: None),
        ("VAE streaming decode FPS (bf16, best variant)", vae_fps, f">= {TARGETS['vae_fps']}",
         lambda x: x >= TARGETS["vae_fps"]),
        ("VAE bf16 vs fp32 relative error", v.get("bf16_vs_fp32_err"), "<= 1e-2", lambda x: x <= 1e-2),
        ("time to first frame (s)", s.get("ttff_s"), f"<= {TARGETS['ttff_s']}", lambda x: x <= TARGETS["ttff_s"]),
        ("peak GPU memory, one stream (GB reserved)", None if peak is None else peak / 1e9,
         f"<= {TARGETS['peak_gb']}", lambda x: x <= TARGETS["peak_gb"]),
        ("memory growth after warm-up (bytes, alloc./reserved)",
         max((s[k] for k in ("mem_growth", "reserved_growth") if k in s), default=None), "<= 0", lambda x: x <= 0),
        ("fast step vs eager, max rel. error of x0", st.get("max_x0_err"), "<= 2e-2", lambda x: x <= 2e-2),
    ]
    out = {}
    print("## targets" + ("" if full_size else " (not judged: they are for the full model's shapes, not --tiny)"))
    for name, value, want, ok in rows:
        met = None if value is None or not full_size or ok(value) is None else bool(ok(value))
        out[name] = dict(value=value, target=want, met=met)
        shown = "n/a" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        print(f"  {name:52s} {shown:>12s}  target {want:8s}  {'MET' if met else 'not met' if met is False else '-'}")
    return out


def tune_kernels() -> dict:
    """The kernels' tilings swept in this process (each module's CONFIG left at its best), before anything compiles."""
    from longsana.benchmarks.kernels import sweep_all  # imports Triton; needs a GPU

    print("## tuning the Triton kernels' tilings (benchmarks/kernels.py's sweep)")
    return sweep_all(torch.Generator().manual_seed(0))


def main(argv=None) -> dict:
    set_process_defaults()  # as `longsana bench` runs: set before CUDA or cuBLAS first loads
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config and size: a smoke test for any machine")
    p.add_argument("--chunks", type=int, default=240, help="steady-state chunks of the stream (240 = 10 min video)")
    p.add_argument("--settle", type=int, default=4, help="chunks before the steady state is measured")
    p.add_argument("--vae-frames-per-call", type=int, default=StreamSettings.vae_frames_per_call,
                   help="the main stream's StreamSettings.vae_frames_per_call")
    p.add_argument("--variant-chunks", type=int, default=12,
                   help="chunks of each variant stream (VARIANTS: no rewind points, serial, VAE pieces; 0: skip)")
    p.add_argument("--chunk-variants", default="",
                   help="comma-separated latent frames per chunk to run as variant streams too (e.g. 3,5: the "
                        "lower-latency settings; each length compiles its own block graphs)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sections", default="stream,step,stages,vae,diffusers")
    p.add_argument("--vae-variants", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--diffusers-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", type=int, default=0, help="print the top N GPU kernels of a pass and of a decode")
    p.add_argument("--devices", help="the transformer's device, then the VAE's: cuda:0,cuda:1 splits the stream over "
                                     "two GPUs, the decode on the second (default: the GPU, else the CPU)")
    p.add_argument("--precision", default="bf16",
                   help=f"the transformer's precisions, comma-separated, of {', '.join(PRECISIONS)}: bf16 runs every "
                        "section; each other one runs the stream and the chunk step again with its own model, and "
                        "x0 of each is compared with an fp32 step (bf16,fp8: side by side)")
    p.add_argument("--tune", action="store_true",
                   help="first sweep the Triton kernels' tilings at full shapes (benchmarks/kernels.py's sweep, a GPU) "
                        "and run everything after with the best, and with the FFN kernel or its compiled reference, "
                        "whichever was faster")
    p.add_argument("--json", help="also write the result to this file (after each section: a run cut short keeps "
                                  "what it measured)")
    a = p.parse_args(argv)
    a.precision = [x.strip() for x in a.precision.split(",")]
    a.chunk_variants = [int(n) for n in a.chunk_variants.split(",") if n.strip()]
    if not set(a.precision) <= set(PRECISIONS) or "bf16" not in a.precision:
        p.error(f"--precision takes bf16 and optionally the others of {PRECISIONS}, got {','.join(a.precision)}")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    devices = [torch.device(d.strip()) for d in (a.devices or default).split(",")]
    if not 1 <= len(devices) <= 2:
        p.error(f"--devices takes one or two devices, got {a.devices!r}")
    spec = get_config("tiny" if a.tiny else "longsana-2b-480p")
    a.height, a.width, a.chunk = spec.height, spec.width, spec.chunk_frames
    if a.tiny:
        a.chunks, a.settle, a.variant_chunks, a.reps = 6, 2, 4, 2
    device, vae_device = devices[0], devices[-1]
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the "current" GPU of the memory readings and the kernels launched here
    autotune_cudnn()  # as the stream sets it
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    split = f" (the VAE on {vae_device}: one stream split over two devices)" if vae_device != device else ""
    print(f"# LongSANA streaming benchmark on {name}{split}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}: {'tiny' if a.tiny else 'longsana-2b-480p'} {a.height}x{a.width}, "
          f"chunks of {a.chunk} latent frames, random weights")
    t0 = time.perf_counter()
    pipe = build(a, device, vae_device)
    hw = (a.height // pipe.vae.cfg.spatial_stride, a.width // pipe.vae.cfg.spatial_stride)
    res = dict(bench="fps", device=name, devices=[str(d) for d in devices_of(pipe)], torch=torch.__version__,
               date=datetime.date.today().isoformat(),
               tiny=a.tiny, height=a.height, width=a.width, chunk=a.chunk, build_s=time.perf_counter() - t0,
               errors={})
    print(f"built in {res['build_s']:.0f} s: transformer {sum(q.numel() for q in pipe.model.parameters()) / 1e9:.2f}"
          f" B, text encoder {sum(q.numel() for q in pipe.text.model.parameters()) / 1e9:.2f} B, VAE "
          f"{sum(q.numel() for q in pipe.vae.parameters()) / 1e6:.0f} M params; allocated {gb(_mem())}")
    sections = dict(cost=lambda: cost_card(pipe, a, hw), stream=lambda: bench_stream(pipe, a),
                    step=lambda: bench_step(pipe, a, hw), stages=lambda: bench_stages(pipe, a, hw),
                    vae=lambda: bench_vae(pipe, a, hw),
                    diffusers=lambda: bench_diffusers(pipe, a, hw), tune=tune_kernels)
    for key in ["tune"] * a.tune + ["cost", *a.sections.split(",")]:
        if key == "diffusers" and importlib.util.find_spec("diffusers") is None:
            print("## diffusers: not importable, skipped")
            continue
        section(res, key, sections[key], a.json)
    if len(a.precision) > 1:
        run_precisions(pipe, a, hw, res)
    _ratios(res)
    res["targets"] = targets(res, full_size=not a.tiny)
    print(save(res, a.json))
    return res


def save(res: dict, path: str | None) -> str:
    """The result as one JSON line, also written to `path` when given."""
    line = json.dumps(res, default=float)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")
    return line


def section(res: dict, key: str, fn, path: str | None) -> None:
    """res[key] = fn(); a failure is reported (res["errors"]) and skipped: one broken section must not lose the
    others. The result so far is saved to `path` (--json) after each section, so a run cut short keeps it."""
    try:
        res[key] = fn()
    except Exception as e:
        res["errors"][key] = f"{type(e).__name__}: {e}"
        print(f"## {key}: FAILED\n{traceback.format_exc()}")
    gc.collect()
    save(res, path)


def run_precisions(pipe: Pipeline, a, hw, res: dict) -> None:
    """The stream and the chunk step (those of --sections) again for each precision other than bf16
    (res[precision]), then every precision's x0 against fp32 (res["accuracy"]; the benchmark's own model is fp32 on
    a CPU, and named so)."""
    pipes = {"bf16" if pipe.model.proj_out.weight.dtype == torch.bfloat16 else "fp32": pipe}
    once = argparse.Namespace(**{**vars(a), "variant_chunks": 0})  # the stream's variants: bf16 only
    runs = {"stream": lambda q: bench_stream(q, once), "step": lambda q: bench_step(q, a, hw)}
    for precision in a.precision[1:]:
        print(f"# precision {precision}: the transformer's block GEMMs in FP8 (longsana/fp8.py), the rest as above")
        pipes[precision] = q = with_fp8(pipe)
        with parked(pipe.model):  # the bf16 transformer's 4 GB out of the FP8 stream's memory figures
            section(res, precision, lambda: {k: fn(q) for k, fn in runs.items() if k in a.sections.split(",")},
                    a.json)
    section(res, "accuracy", lambda: bench_accuracy(pipes, a, hw), a.json)


def _ratios(res: dict) -> None:
    d, st, s, v = res.get("diffusers"), res.get("step", {}), res.get("stream", {}), res.get("vae", {})
    if not d:
        return
    r = {}
    if "compiled_pass_s" in st:
        r["pass_vs_diffusers_eager"] = d["tr_eager_pass_s"] / st["compiled_pass_s"]
        if "tr_compiled_pass_s" in d:
            r["pass_vs_diffusers_compiled"] = d["tr_compiled_pass_s"] / st["compiled_pass_s"]
    if v.get("variants"):
        r["vae_vs_diffusers"] = max(x["steady_fps"] for x in v["variants"].values()) / d["vae_fps"]
    if "e2e_fps" in s:
        r["e2e_vs_diffusers_serial_eager"] = s["e2e_fps"] / d["serial_e2e_fps_eager"]
        if "serial_e2e_fps_compiled" in d:
            r["e2e_vs_diffusers_serial_compiled"] = s["e2e_fps"] / d["serial_e2e_fps_compiled"]
    res["ratios"] = r
    print("## ours / diffusers (speed ratios, > 1: we are faster): "
          + ", ".join(f"{k} {x:.2f}x" for k, x in r.items()))


@click.command("bench", context_settings=dict(ignore_unknown_options=True, help_option_names=[]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cmd(args):
    """The end-to-end streaming benchmark (benchmarks/fps.py; --help for its options)."""
    main(list(args))


if __name__ == "__main__":
    main()
