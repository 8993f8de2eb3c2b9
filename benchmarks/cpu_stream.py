"""Streaming speed of a model on the CPU (the built-in demo by default): decoded frames per second.

    python -m longsana.benchmarks.cpu_stream [--model demo] [--threads 2] [--chunks 8] [--reps 3]

Prints the cost card (FLOPs per video frame of the transformer passes and of the VAE decode, counted with
torch's FlopCounterMode on one chunk), warms up two chunks, reports the median over repetitions of `--chunks`
steady chunks, and ends with one JSON line. The issue-8 target is >= 16 FPS on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from longsana.stream import Pipeline

PROMPT = "two yellow squares bouncing on a black background"


def flops_per_frame(pipe: Pipeline) -> dict[str, float]:
    """FLOPs of one steady chunk per video frame: all of it, and the VAE decode alone (the rest is the
    transformer's 4 denoising passes and 1 clean-context pass)."""
    from longsana.vae import StreamingDecoder

    stream = pipe.stream(PROMPT, seed=0, rewind_seconds=0)
    it = iter(stream)
    next(it)
    with FlopCounterMode(display=False) as total:
        frames = len(next(it).frames)
    stream.close()
    dec = StreamingDecoder(pipe.vae, pipe.spec.height, pipe.spec.width)
    z = torch.randn(1, pipe.vae.cfg.z_dim, pipe.spec.chunk_frames, *(s // pipe.vae.cfg.spatial_stride
                                                                       for s in (pipe.spec.height, pipe.spec.width)))
    dec.decode(z[:, :, :1])
    with FlopCounterMode(display=False) as vae:
        dec.decode(z)
    vae_flops = vae.get_total_flops() / (4 * pipe.spec.chunk_frames)
    return {"transformer": total.get_total_flops() / frames - vae_flops, "vae": vae_flops}


def run(pipe: Pipeline, chunks: int) -> float:
    stream = pipe.stream(PROMPT, seed=0)
    it = iter(stream)
    next(it), next(it)  # warm-up
    t, n = time.perf_counter(), 0
    for _ in range(chunks):
        n += len(next(it).frames)
    stream.close()
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--spec", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = Pipeline.from_pretrained(a.model, device="cpu", spec=a.spec)
    print(f"# CPU streaming, model {a.model!r}, {pipe.spec.height}x{pipe.spec.width}, {a.threads} threads, "
          f"chunks of {pipe.spec.chunk_frames} latent frames")
    card = flops_per_frame(pipe)
    print(f"cost card: transformer {card['transformer'] / 1e9:.2f} GFLOP/frame, VAE {card['vae'] / 1e9:.2f} "
          f"GFLOP/frame (the VAE's small 3D convs run far below a CPU's matmul rate)")
    fps = [run(pipe, a.chunks) for _ in range(a.reps)]
    med = statistics.median(fps)
    print(f"end to end: median {med:.1f} FPS over {a.reps} runs of {a.chunks} chunks "
          f"(min {min(fps):.1f}, max {max(fps):.1f}); target >= 16 FPS: {'met' if med >= 16 else 'not met'}")
    print(json.dumps({"bench": "cpu_stream", "model": a.model, "threads": a.threads, "fps_median": med,
                      "fps": fps, "gflop_per_frame": {k: v / 1e9 for k, v in card.items()}}))


if __name__ == "__main__":
    main()
