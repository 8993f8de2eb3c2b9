"""How a chunk's frames cross from a GPU worker process to the server (`longsana serve --gpus`):
`python -m longsana.benchmarks.frames [--frames 40 --height 480 --width 832] [--chunks 10] [--keep]`.

Two ways, each with a worker process of its own: pickled through a multiprocessing Connection (how the frames
crossed before), and through the stream's shared-memory block (streaming/gpus.py: `_FrameBlock` writes them in the
worker, `_FrameReader` copies them out in the server). Per chunk it times, in the server, from asking for the chunk to
holding its own numpy array of the frames: the wall time and the server thread's CPU time. One chunk warms each way
up; it reports medians and ends with one JSON line. `--keep` keeps every chunk's frames in the server, so each copy
lands in memory the process has not touched before (as a server that buffers frames would), else each is dropped
before the next. The frames are random and checked on arrival.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import numpy as np

from longsana.chunk import Chunk
from longsana.streaming.gpus import SharedFrames, _FrameBlock, _FrameReader

WAYS = ("pickled", "shared memory")


def _worker(conn, shape: tuple[int, ...], shared: bool) -> None:
    """Answer each request with a chunk of the same frames, until asked to stop (False)."""
    frames = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    block = _FrameBlock(0)
    while conn.recv():
        conn.send(Chunk(block.put(frames) if shared else frames, 0, 0, "", 0, 0.0))
    block.close()


def crossings(shape: tuple[int, ...], chunks: int, shared: bool, keep: bool) -> tuple[list[float], list[float]]:
    """(wall seconds, server CPU seconds) per chunk, after one chunk of warm-up."""
    conn, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_worker, args=(child, shape, shared))
    process.start()
    want = np.random.default_rng(0).integers(0, 256, shape, np.uint8)  # what the worker sends
    reader, kept, walls, cpus = _FrameReader(), [], [], []
    for i in range(1 + chunks):
        t, c = time.perf_counter(), time.thread_time()
        conn.send(True)
        frames = conn.recv().frames
        frames = reader.read(frames) if isinstance(frames, SharedFrames) else frames
        if i:
            walls.append(time.perf_counter() - t)
            cpus.append(time.thread_time() - c)
        if not np.array_equal(frames, want):
            raise AssertionError(f"{WAYS[shared]}: the frames arrived changed")
        if keep:
            kept.append(frames)
    reader.close()
    conn.send(False)
    process.join()
    return walls, cpus


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=40, help="video frames a chunk (a 10-latent-frame chunk: 40)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="keep every chunk's frames in the server")
    a = p.parse_args(argv)
    shape = (a.frames, a.height, a.width, 3)
    nbytes = int(np.prod(shape))
    print(f"# frames from a worker process to the server: chunks of {a.frames} x {a.height} x {a.width} x 3 uint8 "
          f"= {nbytes / 1e6:.1f} MB, {a.chunks} chunks a way after one of warm-up, "
          f"{'kept' if a.keep else 'dropped'} by the server")
    res = {"bench": "frames", "shape": shape, "bytes": nbytes, "chunks": a.chunks, "keep": a.keep}
    for shared, way in enumerate(WAYS):
        walls, cpus = crossings(shape, a.chunks, bool(shared), a.keep)
        res[way] = {"median_s": statistics.median(walls), "server_cpu_median_s": statistics.median(cpus),
                    "wall_s": walls}
        print(f"  {way:13s}: median {res[way]['median_s'] * 1e3:7.1f} ms a chunk (server CPU "
              f"{res[way]['server_cpu_median_s'] * 1e3:6.1f} ms), "
              f"{nbytes / res[way]['median_s'] / 1e9:5.2f} GB/s")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
