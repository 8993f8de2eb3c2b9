"""Streaming speed of a model on the CPU (the built-in demo by default): decoded frames per second.

    longsana bench-cpu [--model demo] [--threads N] [--chunks 8] [--reps 3] [--busy 1]
    python -m longsana.benchmarks.cpu_stream ...     # the same, without the `longsana` command's thread policy

Prints the cost card (FLOPs per video frame of the transformer passes and of the VAE decode, counted with
torch's FlopCounterMode on one chunk), warms up two chunks, reports the median over repetitions of `--chunks`
steady chunks, and ends with one JSON line. The issue-8 target is >= 16 FPS on a 2-core CPU.

`--busy N` runs N other processes that each keep a core busy (a Python busy loop) while it measures: a browser
playing the stream on the same laptop is such a process. Run through `longsana bench-cpu`, the benchmark gets the
CPU thread policy that every `longsana` command sets before torch loads (cli.py); run as a module, it gets
whatever the environment says, which is how the policy's effect is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import click
import torch

from longsana.benchmarks.fps import transformer_flops
from longsana.benchmarks.vae import decoder_cost
from longsana.stream import Pipeline

PROMPT = "two yellow squares bouncing on a black background"


def flops_per_frame(pipe: Pipeline) -> dict[str, float]:
    """FLOPs of one steady chunk per video frame: the transformer's denoising passes and clean-context pass, and
    the VAE decode. Counted on meta, in this thread: the stream itself runs on its device worker's thread, which a
    FlopCounterMode here would not see."""
    spec, s = pipe.spec, pipe.vae.cfg.spatial_stride
    flops = transformer_flops(pipe.model.cfg, (spec.height // s, spec.width // s), spec.chunk_frames)
    frames = pipe.vae.cfg.temporal_stride * spec.chunk_frames
    return {"transformer": (len(spec.denoise_timesteps) * flops["denoise"] + flops["clean"]) / frames,
            "vae": decoder_cost(pipe.vae, spec.height, spec.width, spec.chunk_frames, pipe.vae.dtype)["flops_per_frame"]}


def run(pipe: Pipeline, chunks: int) -> float:
    stream = pipe.stream(PROMPT, seed=0)
    it = iter(stream)
    next(it), next(it)  # warm-up
    t, n = time.perf_counter(), 0
    for _ in range(chunks):
        n += len(next(it).frames)
    stream.close()
    return n / (time.perf_counter() - t)


@contextlib.contextmanager
def busy_cores(n: int):
    """n processes spinning a core each, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


# The environment variables that decide how torch's OpenMP pool runs, reported with the result.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--spec", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own choice)")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, help="other processes keeping a core busy while measuring")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    env = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    pipe = Pipeline.from_pretrained(a.model, device="cpu", spec=a.spec)
    print(f"# CPU streaming, model {a.model!r}, {pipe.spec.height}x{pipe.spec.width}, {threads} threads "
          f"({' '.join(f'{k}={v}' for k, v in env.items()) or 'no OpenMP settings'}), {a.busy} busy processes, "
          f"chunks of {pipe.spec.chunk_frames} latent frames")
    card = flops_per_frame(pipe)
    print(f"cost card: transformer {card['transformer'] / 1e9:.2f} GFLOP/frame, VAE {card['vae'] / 1e9:.2f} "
          f"GFLOP/frame (the VAE's small 3D convs run far below a CPU's matmul rate)")
    with busy_cores(a.busy):
        fps = [run(pipe, a.chunks) for _ in range(a.reps)]
    med = statistics.median(fps)
    print(f"end to end: median {med:.1f} FPS over {a.reps} runs of {a.chunks} chunks "
          f"(min {min(fps):.1f}, max {max(fps):.1f}); target >= 16 FPS: {'met' if med >= 16 else 'not met'}")
    print(json.dumps({"bench": "cpu_stream", "model": a.model, "threads": threads, "env": env, "busy": a.busy,
                      "fps_median": med, "fps": fps, "gflop_per_frame": {k: v / 1e9 for k, v in card.items()}}))


@click.command("bench-cpu", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cpu_cmd(args):
    """Streaming speed on the CPU, beside busy processes if asked (benchmarks/cpu_stream.py; --help for its
    options)."""
    main(list(args))


if __name__ == "__main__":
    main()
