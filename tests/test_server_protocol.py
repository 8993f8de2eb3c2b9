"""The streaming protocol end to end without a browser: a real aiortc client (and an aiohttp WebSocket client) against the
server running the synthetic source in a background thread. Frames arrive at the model's fps with evenly spaced,
increasing pts; a new prompt applies at the generator's next chunk and the decoded pixels follow it; pause,
resume, rewind and stats do what they say; the HTTP endpoints and the MP4 recording hold what was streamed."""

import asyncio
import dataclasses
import json
import re
from importlib import resources

import av
import numpy as np
import pytest

from longsana.streaming.client import RtcClient, WsClient, frame_rate, get
from longsana.streaming.server import ServerConfig, ServerThread
from longsana.streaming.session import CLOCK_RATE, STEP_MARGIN
from longsana.streaming.synthetic import MappedPipeline, SyntheticPipeline, prompt_color
from longsana.text import MAX_PROMPT_CHARS

FPS = SyntheticPipeline().spec.fps  # 16: the synthetic source stands in for LongSANA 2B
STEP = CLOCK_RATE // FPS  # 5625 ticks of 90 kHz per frame
FOX, OWL = "a red fox trotting through snow", "an owl gliding over a moonlit lake"


@pytest.fixture(scope="module")
def server():
    with ServerThread(SyntheticPipeline(height=96, width=160), ServerConfig(port=0, ice_loopback=True)) as s:
        yield s


def background(thumb: np.ndarray) -> np.ndarray:
    """The frame's solid color: the median pixel ignores the moving white bar."""
    return np.median(thumb.reshape(-1, 3), axis=0)


def assert_color(thumb: np.ndarray, prompt: str, what: str) -> None:
    got, want = background(thumb), np.array(prompt_color(prompt))
    assert np.abs(got - want).max() <= 24, f"{what}: color {got} is not {prompt!r}'s {want}"


def assert_paced(pts: list[int], step: int) -> None:
    """pts steps of exactly `step`, but where a stall of the server (its event loop held up on a busy machine)
    restarted the pacer: a jump of over 2 steps, by design (never a catch-up burst), which must stay rare."""
    steps = np.diff(pts)
    paced = steps[steps <= 2 * step]
    assert len(paced) >= 0.8 * len(steps) and (paced == step).all(), f"pts steps {steps}, want {step}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.slow
def test_webrtc_pace_pts_and_prompt_switch(server):
    async def main():
        async with await RtcClient.connect(server.url, FOX) as c:
            await c.wait_until(lambda: len(c.frames) >= 40)
            frames = c.frames[:40]
            pts = [f.pts for f in frames]
            assert pts[0] == 0
            assert_paced(pts, STEP)
            rate = frame_rate(frames[8:])  # the first frames can arrive together while the connection settles
            assert 13 <= rate <= 19, f"{rate:.1f} fps"

            # switch right after a chunk went on screen: that chunk's successor is already being generated with
            # the old prompt, so the generator's next chunk, two after the one on screen, is the first new one
            n = len(c.chunks())
            await c.wait_until(lambda: len(c.chunks()) > n)
            on_screen = c.chunks()[-1]["index"]
            ack = await c.request("prompt", prompt=OWL)
            assert ack == {"type": "ack", "seq": ack["seq"], "of": "prompt"}
            await c.wait_until(lambda: any(ch["prompt"] == OWL for ch in c.chunks()))
            first = next(ch for ch in c.chunks() if ch["prompt"] == OWL)
            assert first["index"] == on_screen + 2 and first["prompt_seq"] == 1
            assert all(ch["prompt"] == FOX and ch["prompt_seq"] == 0 for ch in c.chunks() if ch["index"] < first["index"])
            assert first["switch_latency"] > 0

            # the decoded pixels follow the chunks: the old color up to the switch, the new one after
            await c.wait_until(lambda: c.frames[-1].pts >= first["pts"] + 8 * STEP)
            for f in c.frames:
                assert_color(f.thumb, OWL if f.pts >= first["pts"] else FOX, f"frame at pts {f.pts}")
            assert all(b.pts > a.pts for a, b in zip(c.frames, c.frames[1:]))

    run(main())


def test_webrtc_vp8_when_h264_is_not_offered(server):
    """A browser without H.264 gets the raw frames encoded by aiortc (VP8); the recording is H.264 all the same."""
    async def main():
        async with await RtcClient.connect(server.url, FOX, codecs=("video/VP8",)) as c:
            assert c.hello["codec"] == "VP8"
            await c.wait_until(lambda: len(c.frames) >= 16)
            # monotonic at about 16 fps: where the source runs slower than real time (a busy machine) the server
            # spaces pts at its measured rate, by design, so the steps need not all be exactly 1/16 s
            steps = [b.pts - a.pts for a, b in zip(c.frames, c.frames[1:])]
            assert min(steps) > 0 and 0.75 * STEP <= sum(steps) / len(steps) <= 1.35 * STEP, f"pts steps {steps}"
            for f in c.frames[4:]:  # VP8 starts blurry for a frame or two
                assert_color(f.thumb, FOX, f"frame at pts {f.pts}")

    run(main())


@pytest.mark.slow
def test_pause_resume_rewind_stats(server):
    async def main():
        async with await RtcClient.connect(server.url, FOX, decode=False) as c:
            await c.wait_until(lambda: len(c.frames) >= 24)

            assert (await c.request("pause"))["type"] == "ack"
            await asyncio.sleep(0.3)  # frames already on their way still arrive
            n = len(c.frames)
            await asyncio.sleep(0.8)
            assert len(c.frames) == n, "frames kept coming while paused"
            assert (await c.request("stats"))["state"] == "paused"
            assert (await c.request("resume"))["type"] == "ack"
            resumed = asyncio.get_running_loop().time()
            await c.wait_until(lambda: len(c.frames) >= n + 8)
            steps = np.diff([f.pts for f in c.frames[n - 8:]])  # (aiortc's receiver holds a frame until the next)
            # the pause is one gap in the timeline; the other steps are 1/16 s, or longer where a busy machine made
            # the source slower than real time or stalled the server (see assert_paced), never shorter
            gaps = steps >= 0.8 * CLOCK_RATE
            assert gaps.sum() == 1 and steps.min() >= STEP, f"pts steps around the pause: {steps}"

            # rewind 1 s: after the frames already generated, the video continues with what followed the frame that
            # was on screen 1 s (16 frames) before (up to 3 frames of slack: aiortc's receiver holds one frame back,
            # one or two are on their way)
            n = len(c.chunks())
            await c.wait_until(lambda: len(c.chunks()) > n)
            chunk = c.chunks()[-1]
            on_screen = chunk["start_frame"] + (c.frames[-1].pts - chunk["pts"]) // STEP
            ack = await c.request("rewind", seconds=1.0)
            assert ack["type"] == "ack" and ack["rewound"] == pytest.approx(1.0, abs=0.07)
            await c.wait_until(lambda: any(b["start_frame"] < a["start_frame"] for a, b in zip(c.chunks(), c.chunks()[1:])))
            back = next(b for a, b in zip(c.chunks(), c.chunks()[1:]) if b["start_frame"] < a["start_frame"])
            assert 0 <= back["start_frame"] - (on_screen + 1 - FPS) <= 3, (back, on_screen)

            await asyncio.sleep(resumed + 2.2 - asyncio.get_running_loop().time())  # send_fps: the last 2 s
            stats = await c.request("stats")
            assert stats["type"] == "stats" and stats["state"] == "playing" and stats["session"] == c.session
            assert stats["frames_sent"] >= len(c.frames) and stats["gen_fps"] > FPS  # synthetic: 2x real time
            assert stats["send_fps"] == pytest.approx(FPS, rel=0.25)
            assert (stats["width"], stats["height"]) == (160, 96)

    run(main())


@pytest.mark.slow
@pytest.mark.parametrize("seconds, step", [
    ((0.25, 0.25, 0.25, 2.0, 0.25), STEP),  # one slow chunk (a busy machine's hiccup) leaves the pace alone
    ((0.75,), round(STEP_MARGIN * 0.75 / 8 * CLOCK_RATE)),  # slower than real time: paced at its rate, 5% slower
], ids=["hiccup", "slow"])
def test_pace_follows_the_generation_rate(seconds, step):
    async def main(server):
        async with await WsClient.connect(server.url, FOX, decode=False) as c:
            await c.wait_until(lambda: len(c.frames) >= 40)
        assert_paced([f.pts for f in c.frames], step)  # (a moving average paced the hiccup case at ~9000 ticks)

    def reported(i, chunk):  # made at once, reporting the given generation time: no timing noise
        return dataclasses.replace(chunk, gen_seconds=seconds[min(i, len(seconds) - 1)])

    with ServerThread(MappedPipeline(reported, delay=0.0, height=64, width=96), ServerConfig(port=0)) as server:
        run(main(server))


@pytest.mark.slow
def test_websocket_stream(server):
    async def main():
        async with await WsClient.connect(server.url, FOX) as c:
            assert c.hello["transport"] == "websocket" and c.hello["codec"] == "JPEG"
            assert c.hello["fps"] == FPS and c.hello["max_prompt_chars"] == MAX_PROMPT_CHARS
            await c.wait_until(lambda: len(c.frames) >= 24)
            assert frame_rate(c.frames[4:24]) == pytest.approx(FPS, rel=0.2)
            assert (await c.request("prompt", prompt=OWL))["type"] == "ack"
            await c.wait_until(lambda: c.frames[-1].prompt_seq == 1 and c.frames[-9].prompt_seq == 1)
            for f in c.frames:  # each binary frame says which prompt it shows, and shows it
                assert_color(f.thumb, OWL if f.prompt_seq else FOX, f"frame at pts {f.pts}")
            pts = [f.pts for f in c.frames]
            assert pts[0] == 0
            assert_paced(pts, STEP)

    run(main())


@pytest.mark.slow
def test_recording_health_and_metrics(server, tmp_path):
    async def main():
        async with await RtcClient.connect(server.url, FOX, decode=False) as c:
            await c.wait_until(lambda: len(c.frames) >= 20)
            await c.request("prompt", prompt=OWL)
            await c.wait_until(lambda: any(ch["prompt"] == OWL for ch in c.chunks()))
            switch_pts = next(ch["pts"] for ch in c.chunks() if ch["prompt"] == OWL)
            await c.wait_until(lambda: c.frames[-1].pts >= switch_pts + 8 * STEP)
            health = json.loads(get(server.url + "health")[2])
            assert health["status"] == "ok" and health["streams"] == 1 and health["max_streams"] == 2
            status, kind, mp4 = await asyncio.to_thread(get, f"{server.url}recording/{c.session}.mp4")
            sent = len(c.frames)
        return status, kind, mp4, sent

    status, kind, mp4, sent = run(main())
    assert status == 200 and kind == "video/mp4"
    path = tmp_path / "stream.mp4"
    path.write_bytes(mp4)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("mov,mp4") and stream.average_rate == FPS
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    # everything encoded so far: what the client got plus at most the encoder's few frames ahead
    assert sent <= len(frames) <= sent + 12
    colors = [OWL if np.abs(background(f) - prompt_color(OWL)).max() <= 24 else FOX for f in frames]
    for f, prompt in zip(frames, colors):
        assert_color(f, prompt, "recorded frame")
    switch = colors.index(OWL)
    assert switch > 0 and all(p == OWL for p in colors[switch:])

    status, kind, text = get(server.url + "metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    metrics = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#"))
    assert float(metrics['longsana_frames_sent_total{transport="webrtc"}']) >= sent
    assert float(metrics['longsana_messages_total{type="prompt"}']) >= 1
    assert float(metrics["longsana_time_to_first_frame_seconds_count"]) >= 1
    assert float(metrics["longsana_prompt_switch_seconds_sum"]) > 0
    assert float(metrics["process_threads"]) > 1 and float(metrics["process_resident_memory_bytes"]) > 1 << 20

    page = get(server.url)
    assert page[0] == 200 and page[1].startswith("text/html") and b"/app.js" in page[2]
    assert get(server.url + "app.js")[0] == 200 and get(server.url + "style.css")[0] == 200
    assert get(server.url + "nope")[0] == 404 and get(server.url + "offer")[0] == 405
    assert get(f"{server.url}recording/unknown.mp4")[0] == 404


def test_the_page_takes_its_limits_and_frame_rate_from_hello():
    """The server says them (test_websocket_stream); the page writes neither down (test_server_browser.py runs it)."""
    web = resources.files("longsana.web")
    html, js = (web / "index.html").read_text(), (web / "app.js").read_text()
    assert "maxlength" not in html.lower() and not re.search(r"\bfps\s*=\s*\d", js)
    assert "el.prompt.maxLength = m.max_prompt_chars" in js and "fps: m.fps" in js


class RecordingPipeline(SyntheticPipeline):
    """A synthetic source whose streams record the keyword arguments of each set_prompt."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[dict] = []

    def stream(self, *args, **kwargs):
        stream = super().stream(*args, **kwargs)
        set_prompt = stream.set_prompt
        stream.set_prompt = lambda prompt, **kw: self.calls.append(kw) or set_prompt(prompt, **kw)
        return stream


def test_a_switch_can_blend_over_seconds():
    """The page's "blend" choice: `transition` seconds reach the generator as video frames (0: a cut; left out: the
    generator's default)."""
    pipe = RecordingPipeline(height=64, width=96)

    async def main(server):
        async with await WsClient.connect(server.url, FOX, decode=False) as c:
            await c.wait_until(lambda: len(c.frames) >= 4)
            for fields in ({"transition": 2.5}, {"transition": 0}, {}):
                assert (await c.request("prompt", prompt=OWL, **fields))["type"] == "ack"

    with ServerThread(pipe, ServerConfig(port=0)) as server:
        asyncio.run(asyncio.wait_for(main(server), 60))
    assert [call["transition_frames"] for call in pipe.calls] == [round(2.5 * FPS), 0, None]


def test_a_late_switch_waits_at_its_landing_rather_than_repeat_frames():
    """A switch whose new frames come after the encoder could have passed its landing frame (here a lead of one frame
    against a chunk's 0.25 s): the viewer's frame index still goes on by one, no repeat, and from the first new frame
    on every frame is the new prompt's. The stream waits at the landing; it never shows old frames past it that the
    new ones would replace under the same indices."""
    pipe = SyntheticPipeline(height=64, width=96, switch_lead=1)
    is_owl = lambda f: np.abs(background(f.thumb) - prompt_color(OWL)).max() <= 24  # noqa: E731

    async def main(server):
        async with await WsClient.connect(server.url, FOX) as c:
            await c.wait_until(lambda: len(c.frames) >= 12)
            assert (await c.request("prompt", prompt=OWL))["type"] == "ack"
            n = len(c.frames)
            await c.wait_until(lambda: sum(map(is_owl, c.frames[n:])) >= 8)
            return [f.index for f in c.frames], [is_owl(f) for f in c.frames]

    with ServerThread(pipe, ServerConfig(port=0)) as server:
        indices, owl = asyncio.run(asyncio.wait_for(main(server), 60))
    assert np.array_equal(np.diff(indices), np.ones(len(indices) - 1)), f"indices repeated or jumped: {indices}"
    first = owl.index(True)
    assert all(owl[first:]), f"old frames after new ones: {owl}"
