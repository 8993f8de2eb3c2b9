"""Several streams on one GPU: `python -m longsana.benchmarks.streams` (GPU; `--tiny` is a smoke test anywhere).

Full LongSANA 2B / 480x832 shapes with random weights, bf16, one pipeline (one set of weights, one device worker:
worker.py), each stream on its own thread as the server's producers run them. It prints, in order:
  0. the warm-up that `longsana serve` runs before it serves (Pipeline.warm_up: compilation, on a GPU), timed;
  1. the card: one stream alone, unpaced: its FPS, and the most real-time streams that rate implies (FPS / fps);
  2. N streams at once, unpaced (as fast as the GPU gives them frames), started together and started apart:
     each stream's FPS after its first --settle chunks, the time to its first frames, and any error, and the
     run's peak GPU memory (reserved: what the allocator took from the device);
  3. admission: 2 streams paced to real time (a consumer taking frames at the model's fps) for --paced-seconds,
     then the worker's measured load and whether it admits a third (and why);
  4. with --minutes M: 2 streams together for M minutes of video each (errors, FPS over the whole run).
Then one JSON line. A stream's FPS is its frames handed out over the wall time they took: what its viewer gets.

With --gpus 0,1 it measures a machine instead: the real-time streams its GPUs hold together. A process per GPU
(as `longsana serve --gpus` runs them) builds the model, then every GPU runs n paced streams at the same time, for
n = 1, 2, ... until a stream on some GPU falls behind real time; the machine holds n - 1 per GPU. Compare
`--gpus 0` with `--gpus 0,1` for what a second GPU adds.

    python -m longsana.benchmarks.streams --gpus 0,1 --paced-seconds 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from longsana.benchmarks.fps import PROMPTS, build
from longsana.cli import set_process_defaults

REAL_TIME_MARGIN = 1.0  # a stream is real time at >= fps frames a second
PACED_SLACK = 0.97  # a paced stream keeps up at >= this share of fps (its measured rate jitters around fps)


def run_streams(pipe, n: int, chunks: int, settle: int, stagger: float = 0.0, paced: bool = False,
                seed: int = 0) -> list[dict]:
    """n streams on their own threads; each takes `chunks` whole chunks (a chunk handed out in pieces ends at the
    piece that carries its gen_seconds and gen_frames). Returns one record a stream."""
    out = [dict() for _ in range(n)]

    def one(i: int):
        r = out[i]
        t0 = time.perf_counter()
        try:
            stream = pipe.stream(f"{PROMPTS[i % len(PROMPTS)]} ({seed + i})", seed=seed + i)
            it, frames, times, shown = iter(stream), [], [], 0
            while len(times) < chunks:
                c = next(it)
                now = time.perf_counter()
                r.setdefault("first_frames_s", now - t0)
                shown += len(c.frames)
                if c.ends_chunk:  # its last piece carries the chunk's frame count
                    frames.append(c.gen_frames)
                    times.append(now)
                if paced:  # the viewer plays at the model's fps: the producer waits for it
                    time.sleep(max(0.0, t0 + shown / stream.fps - time.perf_counter()))
            stream.close()
            w = min(settle, chunks - 2)
            r.update(fps=sum(frames[w + 1:]) / (times[-1] - times[w]), video_s=sum(frames) / stream.fps,
                     chunks=chunks)
        except Exception as e:  # noqa: BLE001 (a failed stream is a result)
            r["error"] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(i,), name=f"viewer-{i}") for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join()
    return out


def report(title: str, rs: list[dict], fps: int, paced: bool = False, memory: dict | None = None) -> None:
    slow = lambda r: not paced and r["fps"] < fps * REAL_TIME_MARGIN  # noqa: E731 (paced streams run at fps at most)
    parts = [(f"error {r['error']}" if "error" in r else
              f"{r['fps']:.1f} FPS{' (below real time)' if slow(r) else ''}, "
              f"first frames {r['first_frames_s']:.2f} s") for r in rs]
    peak = f"; GPU memory peak reserved {memory['peak_reserved'] / 1e9:.2f} GB" if memory else ""
    print(f"  {title}: " + "; ".join(f"#{i} {p}" for i, p in enumerate(parts)) + peak)


def take_peak(device: torch.device) -> dict:
    """The GPU memory peaks (bytes) since the last call, which starts the next window; {} off CUDA. Weights, text
    encoder and every stream's tensors included."""
    if device.type != "cuda":
        return {}
    peak = dict(peak_reserved=torch.cuda.max_memory_reserved(device),
                peak_allocated=torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def paced_chunks(a, pipe) -> int:
    """Chunks a paced stream takes to play --paced-seconds of video (at least a few after --settle)."""
    return max(a.settle + 2, round(a.paced_seconds * pipe.spec.fps / (4 * pipe.spec.chunk_frames)))


def held(rs: list[dict], fps: int) -> bool:
    """Did every paced stream keep up with its viewer, without an error?"""
    return all("fps" in r and r["fps"] >= PACED_SLACK * fps for r in rs)


def serve_rounds(a) -> None:
    """A process of `--gpus`: build the model on this process's GPU, say so, then for every n read from stdin run
    n paced streams and answer with one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build(a, device)
    pipe.warm_up(say=lambda line: None)  # as a worker of `longsana serve --gpus` does before it says it is ready
    print(json.dumps({"ready": torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}), flush=True)
    for line in sys.stdin:
        n = int(line)
        rs = run_streams(pipe, n, paced_chunks(a, pipe), a.settle, paced=True, seed=1000 * n)
        print(json.dumps({"n": n, "fps": pipe.spec.fps, "streams": rs, "held": held(rs, pipe.spec.fps)}), flush=True)


def machine(a, argv: list[str]) -> dict:
    """--gpus: the real-time streams all the GPUs hold at once (the module's doc)."""
    gpus = [g.strip() for g in a.gpus.split(",")]
    # the processes get the same options (--rounds goes before --gpus: they ignore it)
    procs = [subprocess.Popen([sys.executable, "-m", "longsana.benchmarks.streams", "--rounds", *argv],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": g}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for g in gpus]
    try:
        names = [json.loads(p.stdout.readline())["ready"] for p in procs]
        print(f"# real-time streams on {len(gpus)} GPU(s) at once: {', '.join(names)}; "
              f"{'tiny' if a.tiny else 'LongSANA 2B 480x832'}, paced for {a.paced_seconds:g} s, "
              f"{datetime.date.today()}")
        res = dict(bench="streams-machine", gpus=gpus, devices=names, date=str(datetime.date.today()), tiny=a.tiny,
                   rounds=[])
        per_gpu = 0
        for n in range(1, a.max_streams + 1):
            for p in procs:
                p.stdin.write(f"{n}\n")
                p.stdin.flush()
            rounds = [json.loads(p.stdout.readline()) for p in procs]
            res["rounds"].append(rounds)
            for g, r in zip(gpus, rounds):
                report(f"GPU {g}, {n} paced", r["streams"], r["fps"], paced=True)
            if not all(r["held"] for r in rounds):
                break
            per_gpu = n
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
    res |= {"per_gpu": per_gpu, "machine_streams": per_gpu * len(gpus)}
    capped = " at least (--max-streams reached)" if per_gpu == a.max_streams else ""
    print(f"## the machine holds{capped} {res['machine_streams']} real-time streams ({per_gpu} per GPU, at once)")
    return finish(res, a)


def finish(res: dict, a) -> dict:
    """The JSON line, printed and, with --json, written."""
    line = json.dumps(res)
    print(line)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config and size: a smoke test for any machine")
    p.add_argument("--chunks", type=int, default=12, help="chunks each stream takes in the unpaced runs")
    p.add_argument("--settle", type=int, default=3, help="chunks before a stream's FPS is measured")
    p.add_argument("--stagger", type=float, default=4.0, help="seconds between stream starts in the 'apart' runs")
    p.add_argument("--max-streams", type=int, default=3)
    p.add_argument("--paced-seconds", type=float, default=30.0)
    p.add_argument("--minutes", type=float, default=0.0, help="minutes of video for the long 2-stream run (0: skip)")
    p.add_argument("--gpus", help="measure a machine: the real-time streams these GPUs hold at once, e.g. 0,1")
    p.add_argument("--rounds", action="store_true", help=argparse.SUPPRESS)  # a process of --gpus
    p.add_argument("--json", help="also write the result to this file")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    set_process_defaults()  # as `longsana serve` runs: set before CUDA or cuBLAS first loads
    if a.rounds:
        return serve_rounds(a)
    if a.gpus:
        return machine(a, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build(a, device)
    fps = pipe.spec.fps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# streams on one {name}: {'tiny' if a.tiny else 'LongSANA 2B 480x832'}, "
          f"{next(pipe.model.parameters()).dtype}, {datetime.date.today()}")
    res = dict(bench="streams", device=name, torch=torch.__version__, date=str(datetime.date.today()), tiny=a.tiny)

    res["warm_up_s"] = pipe.warm_up(say=lambda line: None)  # as `longsana serve` does before it serves
    if res["warm_up_s"] is not None:
        print(f"## warm-up (a stream of two chunks and a switch, as `longsana serve` runs before serving): "
              f"{res['warm_up_s']:.1f} s")
    take_peak(device)  # (the build's and the warm-up's)
    alone = run_streams(pipe, 1, a.chunks, a.settle)
    res["alone"], res["memory_alone"] = alone[0], take_peak(device)
    capacity = int(alone[0].get("fps", 0) // fps)
    print(f"## card: one stream alone {alone[0].get('fps', float('nan')):.1f} FPS -> at most {capacity} real-time "
          f"streams at {fps} fps on this device")
    report("alone (the first viewer after the warm-up)", alone, fps,
           memory=res["memory_alone"])

    print("## several streams, unpaced")
    for n in range(2, a.max_streams + 1):
        for key, stagger in (("together", 0.0), ("apart", a.stagger)):
            rs = run_streams(pipe, n, a.chunks, a.settle, stagger, seed=10 * n)
            res[f"{key}_{n}"], res[f"memory_{key}_{n}"] = rs, take_peak(device)
            report(f"{n} {key}", rs, fps, memory=res[f"memory_{key}_{n}"])

    print(f"## admission: 2 streams paced to {fps} fps for {a.paced_seconds:.0f} s")
    admitted = {}

    def probe():  # while the paced streams run, after they settle
        time.sleep(min(a.paced_seconds * 0.8, a.paced_seconds - 2))
        admitted["load"] = pipe.worker.load()
        admitted["admits"], admitted["why"] = pipe.worker.admits()

    prober = threading.Thread(target=probe)
    prober.start()
    rs = run_streams(pipe, 2, paced_chunks(a, pipe), a.settle, paced=True, seed=100)
    prober.join()
    res["paced_2"], res["admission"] = rs, admitted
    report("2 paced", rs, fps, paced=True)
    print(f"  load {admitted['load']:.0%}; a third stream: {'admitted' if admitted['admits'] else 'refused'} "
          f"({admitted['why']})")

    if a.minutes:
        chunks = round(a.minutes * 60 * fps / (4 * pipe.spec.chunk_frames))
        rs = run_streams(pipe, 2, chunks, a.settle, seed=200)
        res["long_2"] = rs
        report(f"2 together, {a.minutes:g} min of video each", rs, fps)

    runs = [r for k, v in res.items() if isinstance(v, list) for r in v]
    res["errors"] = sum("error" in r for r in runs)
    res["min_fps_two_streams"] = min((r.get("fps", 0.0) for k in ("together_2", "apart_2", "long_2")
                                      for r in res.get(k, ())), default=None)
    if res["min_fps_two_streams"] is not None:
        print(f"## two streams: slowest {res['min_fps_two_streams']:.1f} FPS (target >= {fps}); errors in all runs: "
              f"{res['errors']}; median FPS of all unpaced streams "
              f"{statistics.median(r['fps'] for r in runs if 'fps' in r):.1f}")
    return finish(res, a)


if __name__ == "__main__":
    main()
