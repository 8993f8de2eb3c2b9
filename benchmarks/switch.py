"""Prompt-switch latency: `python -m longsana.benchmarks.switch` (the built-in demo model on the CPU by default).

A simulated viewer plays the stream at the model's frame rate with the server's back-pressure: the producer hands
a chunk over and waits until its first frame is on screen (so it works at most one chunk ahead), and a chunk that
starts before the end of what the viewer holds replaces it from there on. At random moments the viewer switches
the prompt with `Stream.set_prompt(prompt, at_frame=<frame on screen>)` on a control thread, as the server does (the
screen plays on during the call), then wakes the producer. Per switch it records how long the call
took, the time from the call to the first chunk answering it being handed out (`Chunk.request`), and to that
chunk's first frame being on screen; and the frames shown late (stalls) and any frame shown twice or skipped.
With the demo model the switches go through the page's example prompts, and it also records when the new
prompt's colours hold on screen: the first frame from which the object and background colours the prompt names
(read back by `clips.measure`) are on screen in at least 90% of the frames until the next switch
(`clips.colours_hold_from`). Each switch's prompt is encoded when it is asked for, as a new prompt typed by a user
is (the text encoder's time is in the figures), unless --prompt-cache keeps the prompts encoded before.

    python -m longsana.benchmarks.switch                 # demo model, CPU
    python -m longsana.benchmarks.switch --tiny          # tiny random model: a smoke test
    python -m longsana.benchmarks.switch --full          # LongSANA 2B / 480p, random weights (benchmarks/fps.py's)

Prints its progress as it plays (at full size the first frame waits for the compilation), the cost card (model,
chunk, lead, rewind points), one line per switch, medians / p95, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import itertools
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from longsana.benchmarks.fps import PROMPTS, build
from longsana.cli import set_process_defaults
from longsana.stream import Pipeline
from longsana.streaming.guide import DEMO_EXAMPLES

SETTLE_CHUNKS = 3  # chunks played before the first switch (warm caches, a measured lead)
STALL_KINDS = ("start", "switch chunk", "next chunk", "later")  # stalls by the chunk they waited for: one before
# the first switch (the stream's start: at full size its first chunks pay first-use costs), a switch's first, its
# second (which a short switch chunk leaves less time for), a switch's later ones


class Viewer:
    """Plays frames at `fps` from a buffer the producer fills; the producer's `put` returns once the chunk's first
    frame is on screen, or at once after a switch (the server's Handoff, released by a prompt change)."""

    def __init__(self, fps: float):
        self.fps, self.cond = fps, threading.Condition()
        self.frames: dict[int, tuple[int, object]] = {}  # video frame -> (the request its chunk answers, its RGB)
        self.chunk_no: dict[int, int] = {}  # video frame -> which chunk of its request holds it (0: the first)
        self._indices: dict[int, set[int]] = {}  # request -> the chunk indices that answered it
        self.shown_rgb: list = []  # every frame as it was shown
        self.shown_t: list[float] = []  # and when
        self.shown_request: list[int] = []  # and the request its chunk answered
        self.screen = -1  # the frame on screen
        self.released = False
        self.handed: dict[int, float] = {}  # request -> when its first chunk was handed out
        self.shown: dict[int, float] = {}  # request -> when its first frame was on screen
        self.done = False

    def put(self, chunk) -> None:
        with self.cond:  # frames shown stay as they were (as the server's): a chunk replaces what follows them
            first = max(chunk.start_frame, self.screen + 1)
            for f in [f for f in self.frames if f >= first]:
                del self.frames[f]
            seen = self._indices.setdefault(chunk.request, set())
            seen.add(chunk.index)
            for f in range(first, chunk.start_frame + len(chunk.frames)):
                self.frames[f] = chunk.request, chunk.frames[f - chunk.start_frame]
                self.chunk_no[f] = len(seen) - 1
            self.handed.setdefault(chunk.request, time.perf_counter())
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.screen >= chunk.start_frame or self.released or self.done)
            self.released = False

    def release(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()

    def play(self, stream, frames: int, switch_at: set[int], prompts, prompt_cache: bool) -> dict:
        """Show `frames` frames; at each frame count in `switch_at`, switch (without `prompt_cache`, the prompt is
        encoded anew). Returns the switches and the stalls, in all and by the chunk whose frame came late."""
        switches, late, t_next, t0 = [], 0.0, None, time.perf_counter()
        late_by = dict.fromkeys(STALL_KINDS, 0.0)

        def switch(k: int, prompt: str) -> None:
            # on the control thread, as the server's: the screen plays on during the call
            t = time.perf_counter()
            if not prompt_cache:
                stream.pipe.prompts.clear()  # the stream keeps the entry in force; the new one is encoded
            rid = stream.set_prompt(prompt, at_frame=k)
            call_s, (_, busy, new) = time.perf_counter() - t, stream.lead_terms()
            switches.append({"id": rid, "t": t, "frame": k, "lands": stream.landing(rid) - k, "busy_s": busy,
                             "new_s": new, "prompt": prompt, "call_s": call_s})
            self.release()
            print(f"  switched at frame {k} ({len(switches)} of {len(switch_at)})", flush=True)

        control, calls = ThreadPoolExecutor(1, thread_name_prefix="control"), []
        for k in range(frames):
            with self.cond:
                self.cond.wait_for(lambda k=k: k in self.frames)
                now = time.perf_counter()
                if t_next is None or now > t_next + 0.5 / self.fps:  # a stall: the clock restarts
                    if t_next is not None:
                        late += now - t_next
                        late_by[self.stall_kind(k)] += now - t_next
                    t_next = now
            time.sleep(max(0.0, t_next - time.perf_counter()))
            with self.cond:
                self.cond.wait_for(lambda k=k: k in self.frames)  # (a chunk replacing it may have come meanwhile)
                self.screen = k
                request, rgb = self.frames[k]
                self.shown.setdefault(request, time.perf_counter())
                self.shown_rgb.append(rgb)
                self.shown_t.append(time.perf_counter())
                self.shown_request.append(request)
                self.cond.notify_all()
            if k == 0:  # progress: at full size the first frame waits for the stream's compilation
                print(f"  first frame on screen {time.perf_counter() - t0:.1f} s after the start", flush=True)
            t_next += 1 / self.fps
            if k in switch_at:
                calls.append(control.submit(switch, k, next(prompts)))
        control.shutdown(wait=True)
        for c in calls:
            c.result()  # (raises what a call raised)
        return {"switches": switches, "late_s": late, "late_by": late_by}

    def stall_kind(self, k: int) -> str:
        """Which of STALL_KINDS a stall before frame k is (under the lock)."""
        request, n = self.frames[k][0], self.chunk_no[k]
        return "start" if request == 0 else STALL_KINDS[min(n, 2) + 1]


def colours_hold(viewer: Viewer, switches: list[dict]) -> list[tuple[float, int] | None]:
    """Per switch, when the colours its prompt names hold on screen: (seconds from the call, frames after the first
    frame made for it), the model's own part of the wait; None: not before the next switch."""
    from longsana.demo.clips import colours_hold_from, parse_caption

    out = []
    for s, after in zip(switches, [*switches[1:], None]):
        first, end = s["frame"] + 1, after["frame"] + 1 if after else len(viewer.shown_rgb)
        j = colours_hold_from(np.stack(viewer.shown_rgb[first:end]), parse_caption(s["prompt"])[0])
        new = next((k for k in range(first, end) if viewer.shown_request[k] == s["id"]), None)  # made for it
        if j is None:
            out.append(None)
        else:
            out.append((viewer.shown_t[first + j] - s["t"], None if new is None else first + j - new))
    return out


def p95(xs) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def main(argv=None) -> dict:
    set_process_defaults()  # as `longsana serve` runs: set before CUDA or cuBLAS first loads
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model (a smoke test)")
    p.add_argument("--full", action="store_true", help="LongSANA 2B / 480p with random weights (a GPU)")
    p.add_argument("--switches", type=int, default=20)
    p.add_argument("--chunk-frames", type=int, default=None, help="latent frames per chunk (default: the model's)")
    p.add_argument("--lead", type=float, default=None, help="StreamSettings.switch_lead (default: measured)")
    p.add_argument("--switch-chunk-frames", type=int, default=None,
                   help="StreamSettings.switch_chunk_frames: latent frames of a switch's first chunk")
    p.add_argument("--piece-frames", type=int, default=None,
                   help="StreamSettings.piece_frames: latent frames decoded and handed out at a time")
    p.add_argument("--forget-on-switch", action=argparse.BooleanOptionalAction, default=None,
                   help="StreamSettings.forget_on_switch (default: the model's)")
    p.add_argument("--prompt-cache", action="store_true",
                   help="encode the prompts once before (a warm server's cache) instead of at each switch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny or a.full:
        pipe, name = build(SimpleNamespace(tiny=a.tiny), device), "tiny" if a.tiny else "longsana-2b-480p"
    else:
        pipe, name = Pipeline.from_pretrained("demo"), "demo"
    examples = DEMO_EXAMPLES if name == "demo" else PROMPTS
    stream = pipe.stream(examples[0], seed=a.seed, chunk_frames=a.chunk_frames, switch_lead=a.lead,
                         forget_on_switch=a.forget_on_switch, switch_chunk_frames=a.switch_chunk_frames,
                         piece_frames=a.piece_frames)
    fps, chunk = stream.fps, stream.settings.chunk_frames
    rng = random.Random(a.seed)
    chunk_video = stream.stride * chunk
    switch_at, k = set(), SETTLE_CHUNKS * chunk_video
    for _ in range(a.switches):  # one switch in each stretch of 2 chunks' worth of video, at a random frame in it
        switch_at.add(k + rng.randrange(2 * chunk_video))
        k += 2 * chunk_video
    frames = k + 2 * chunk_video
    print(f"# {name} built in {time.perf_counter() - t_start:.1f} s; playing {frames} frames ({frames / fps:.0f} s of "
          f"video) with {len(switch_at)} switches", flush=True)
    viewer = Viewer(fps)
    prompts = itertools.cycle(examples[1:] + examples[:1])
    for q in examples if a.prompt_cache else ():
        pipe.prompts.get(q, stream.settings.motion_score)  # encoded once: a warm server's prompt cache

    def produce():
        for c in stream:
            viewer.put(c)
            if viewer.done:
                break

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    played = viewer.play(stream, frames, switch_at, prompts, a.prompt_cache)
    with viewer.cond:
        viewer.done = True
        viewer.cond.notify_all()
    producer.join(timeout=60)
    stream.close()

    rows = []
    holds = colours_hold(viewer, played["switches"]) if name == "demo" else [None] * len(played["switches"])
    for s, hold in zip(played["switches"], holds):
        handed, shown = viewer.handed.get(s["id"]), viewer.shown.get(s["id"])
        rows.append({"frame": s["frame"], "lands": s["lands"], "busy_s": s["busy_s"], "new_s": s["new_s"],
                     "call_s": s["call_s"],
                     "handed_s": None if handed is None else handed - s["t"],
                     "screen_s": None if shown is None else shown - s["t"], "colours": hold})
    done = [r for r in rows if r["screen_s"] is not None]
    screen, handed = [r["screen_s"] for r in done], [r["handed_s"] for r in done]
    print(f"# switch latency: {name} on {device.type}, {stream.height}x{stream.width} at {fps} fps, chunks of {chunk} "
          f"latent frames ({chunk_video} video frames, {chunk_video / fps:.2f} s); rewind points "
          f"{stream.ring.capacity}; the last switch landed {rows[-1]['lands'] if rows else '?'} frames on (switch_lead "
          f"{a.lead if a.lead is not None else 'measured'}); forget_on_switch {stream.settings.forget_on_switch}; "
          f"switch_chunk_frames {stream.settings.switch_chunk_frames}; piece_frames {stream.settings.piece_frames}; "
          f"prompts {'encoded before' if a.prompt_cache else 'encoded at each switch'}")
    for i, r in enumerate(rows):
        colours = "" if name != "demo" else ", colours hold " + ("never" if r["colours"] is None else
                                                               f"{r['colours'][0]:.3f} s ({r['colours'][1]} frames "
                                                               "after the first new one)")
        print(f"switch {i:2d} at frame {r['frame']:5d}: lands {r['lands']:3d} frames on (work under way "
              f"{r['busy_s']:.2f} s, a switch's first frames {r['new_s']:.2f} s), set_prompt {r['call_s']:.3f} s, "
              f"handed out {r['handed_s'] if r['handed_s'] is None else round(r['handed_s'], 3)} s, on screen "
              f"{r['screen_s'] if r['screen_s'] is None else round(r['screen_s'], 3)} s{colours}")
    res = {"bench": "switch", "model": name, "device": device.type, "chunk_frames": chunk, "fps": fps,
           "prompt_cache": a.prompt_cache,
           "forget_on_switch": stream.settings.forget_on_switch,
           "switch_chunk_frames": stream.settings.switch_chunk_frames, "piece_frames": stream.settings.piece_frames,
           "switches": len(rows), "answered": len(done), "stalls_s": round(played["late_s"], 3),
           "stalls_by": {kind: round(t, 3) for kind, t in played["late_by"].items()},
           "set_prompt_p50": statistics.median(r["call_s"] for r in rows) if rows else None}
    if done:
        res |= {"screen_p50": statistics.median(screen), "screen_p95": p95(screen),
                "handed_p50": statistics.median(handed), "handed_p95": p95(handed),
                "within_1s": sum(s <= 1.0 for s in screen)}
        print(f"on screen: median {res['screen_p50']:.3f} s, p95 {res['screen_p95']:.3f} s, {res['within_1s']}/"
              f"{len(done)} within 1 s; handed out: median {res['handed_p50']:.3f} s, p95 {res['handed_p95']:.3f} s;"
              f" stalls {res['stalls_s']:.2f} s in all (waiting for: "
              + ", ".join(f"{kind} {t:.2f} s" for kind, t in res["stalls_by"].items()) + ")")
    if name == "demo":
        held = [h for h in holds if h is not None]
        res |= {"colours_p50": round(statistics.median(t for t, _ in held), 3) if held else None,
                "colours_within_1s": sum(t <= 1.0 for t, _ in held), "colours_never": len(holds) - len(held),
                "colours_frames_after_new": sorted(n for _, n in held if n is not None)}
        print(f"colours hold: median {res['colours_p50']} s, {res['colours_within_1s']}/{len(holds)} within 1 s, "
              f"{res['colours_never']} not before the next switch; frames after the first new one: "
              f"{res['colours_frames_after_new']}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
