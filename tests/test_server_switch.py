"""Prompt switches and rewinds through the server with the built-in demo model (the real generator on the CPU): a
switch names the frame on screen, the generator lands it a lead later and goes back if it had made frames past
that point, and the session drops what it replaces: the viewer's frame indices advance by one, with no gap and no
repeat, and every switch reports its latency from the prompt's arrival to its first frame on screen. The latency
targets are measured by `python -m longsana.benchmarks.switch` (benchmarks/RESULTS.md); the bound here is what a
busy 2-core CI machine meets. Also measured: when a switch's colours hold on screen, read back from the frames the
viewer gets (the demo model redraws the scene in the new colours within a second after most switches, RESULTS.md)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from longsana.demo.clips import colours_hold_from, parse_caption
from longsana.streaming.client import WsClient
from longsana.streaming.guide import DEMO_EXAMPLES
from longsana.streaming.server import ServerConfig, ServerThread
from longsana.stream import Pipeline

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle moving left on a blue background", "two yellow squares bouncing on a black background",
           "three white stars spinning on a green background"]
CI_LATENCY_BOUND = 4.0  # seconds: far above the measured ~0.6 s, for a loaded CI machine
COLOUR_SWITCHES, COLOUR_SPACING = 8, 3.0  # switches through the page's examples, seconds apart
MIN_HELD = 4  # switches whose colours hold within COLOUR_SPACING: 8 of 8 measured (RESULTS.md); 0 if switches broke


@pytest.fixture(scope="module")
def server():
    pipe = Pipeline.from_pretrained("demo")
    with ServerThread(pipe, ServerConfig(port=0, model_name="demo")) as s:
        yield s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_switches_land_from_the_screen_with_no_gap_or_repeat(server):
    async def main():
        async with await WsClient.connect(server.url, PROMPTS[0], seed=5) as c:
            rng = np.random.default_rng(0)
            await c.wait_until(lambda: len(c.frames) >= 24)
            for k in range(4):
                ack = await c.request("prompt", prompt=PROMPTS[(k + 1) % len(PROMPTS)])
                assert ack["type"] == "ack"
                await asyncio.sleep(1.0 + rng.uniform(0, 0.75))  # switches at random moments
            await c.wait_until(lambda: len([e for e in c.chunks() if "switch_latency" in e]) >= 4, 30)
            return [f.index for f in c.frames], [e["switch_latency"] for e in c.chunks() if "switch_latency" in e]

    indices, latencies = run(main())
    print(f"switch latencies (prompt arrival to its first frame on screen): {[round(x, 2) for x in latencies]}")
    assert np.array_equal(np.diff(indices), np.ones(len(indices) - 1)), "frame indices jumped or repeated"
    assert len(latencies) == 4 and max(latencies) < CI_LATENCY_BOUND


def test_latency_settings_stream_in_pieces_with_no_gap_or_repeat():
    """switch_chunk_frames=1 and piece_frames=1 through the server (`longsana serve --switch-chunk-frames 1
    --piece-frames 1`): chunks arrive a latent frame (4 video frames) at a time (the frames up to a switch that lands
    inside a chunk, past the decoder, together), switches land on screen and report their latency, and the frame
    indices still advance by one."""
    pipe = Pipeline.from_pretrained("demo")
    settings = {"switch_chunk_frames": 1, "piece_frames": 1}
    with ServerThread(pipe, ServerConfig(port=0, model_name="demo", stream_kwargs=settings)) as s:
        async def main():
            async with await WsClient.connect(s.url, PROMPTS[0], seed=8) as c:
                await c.wait_until(lambda: len(c.frames) >= 24)
                for k in range(2):
                    assert (await c.request("prompt", prompt=PROMPTS[k + 1]))["type"] == "ack"
                    await asyncio.sleep(1.0)
                await c.wait_until(lambda: len([e for e in c.chunks() if "switch_latency" in e]) >= 2, 30)
                return [f.index for f in c.frames], list(c.chunks())

        indices, events = run(main())
    assert np.array_equal(np.diff(indices), np.ones(len(indices) - 1)), "frame indices jumped or repeated"
    sizes = [e["frames"] for e in events[1:]]  # (latent 0: the first frame)
    assert events[0]["frames"] == 1 and set(sizes) <= {4, 8} and sizes.count(4) > len(sizes) // 2, sizes
    timed = [e for e in events if e["gen_seconds"] > 0]  # a chunk's time on its last piece, for all its frames
    assert timed and all(e["gen_frames"] in (4, 8, 9, 12, 13) for e in timed), timed
    assert any(e["gen_frames"] == 12 for e in timed), timed
    assert len([e for e in events if "switch_latency" in e]) == 2


def test_rewind_goes_back_from_the_frame_on_screen(server):
    async def main():
        async with await WsClient.connect(server.url, PROMPTS[1], seed=6) as c:
            await c.wait_until(lambda: len(c.frames) >= 48)
            on_screen = c.frames[-1].index
            ack = await c.request("rewind", seconds=2.0)
            n = len(c.frames)
            await c.wait_until(lambda: any(f.index < on_screen for f in c.frames[n:]), 30)
            return ack, on_screen, [f.index for f in c.frames[n:]]

    ack, on_screen, after = run(main())
    assert ack["rewound"] == pytest.approx(2.0, abs=4 / 16)  # to a latent frame: 4 video frames
    back = next(i for a, i in zip(after, after[1:]) if i < a)
    assert abs(back - (on_screen - 32)) <= 8, (back, on_screen)  # a few frames encoded ahead still played first


def colours_hold(frames, switches: list[tuple[float, str]]) -> list[float | None]:
    """Per switch (time sent, prompt), seconds to the first frame received from which the colours the prompt
    names hold (None: not before the next switch)."""
    out = []
    for (t, prompt), (t_next, _) in zip(switches, [*switches[1:], (float("inf"), None)]):
        span = [f for f in frames if t <= f.t < t_next]
        j = colours_hold_from(np.stack([f.thumb for f in span]), parse_caption(prompt)[0])
        out.append(None if j is None else span[j].t - t)
    return out


def test_when_the_new_colours_hold_on_screen(server):
    async def main():
        async with await WsClient.connect(server.url, DEMO_EXAMPLES[0], seed=7, size=None) as c:
            await c.wait_until(lambda: len(c.frames) >= 24)
            switches = []
            for k in range(COLOUR_SWITCHES):
                prompt = DEMO_EXAMPLES[(k + 1) % len(DEMO_EXAMPLES)]
                switches.append((time.monotonic(), prompt))
                assert (await c.request("prompt", prompt=prompt))["type"] == "ack"
                await asyncio.sleep(COLOUR_SPACING)
            return list(c.frames), switches

    frames, switches = run(main())
    holds = colours_hold(frames, switches)
    print("colours hold on screen after (s):", [None if h is None else round(h, 2) for h in holds])
    # a regression check, not the target (RESULTS.md has the benchmark's figures): a switch that failed to reach
    # the screen, or frames that ignored it, would leave the old colours on screen
    assert sum(h is not None and h < COLOUR_SPACING for h in holds) >= MIN_HELD, holds
