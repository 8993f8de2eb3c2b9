"""What the server does for the page (issue 20), without a browser: the `stop` message ends a stream and frees its
slot, a recording stays downloadable for `recording_keep_seconds` after its stream ends and is then refused with
a message that says so, `hello` and GET /model tell the page the model's default and example prompts and its
vocabulary (the demo's examples are captions it draws well), and `serve --open` says what it did. The page itself
is driven in tests/test_server_browser.py."""

import asyncio
import json

import av
import numpy as np
import pytest

from longsana.demo.clips import caption_words, matches, parse_caption
from longsana.streaming import server as server_module
from longsana.streaming.client import WsClient, get
from longsana.streaming.guide import DEMO_EXAMPLES, GENERAL_EXAMPLES, prompt_guide
from longsana.streaming.protocol import ProtocolError, parse_message
from longsana.streaming.server import ConfigError, ServerConfig, ServerThread
from longsana.streaming.synthetic import SyntheticPipeline

FOX = "a red fox trotting through snow"
KEEP_SECONDS = 3.0


@pytest.fixture(scope="module")
def server():
    """One slot, recordings kept KEEP_SECONDS, presenting itself as the demo model (the guide follows the name)."""
    config = ServerConfig(port=0, max_streams=1, recording_keep_seconds=KEEP_SECONDS, model_name="demo",
                          stream_kwargs={"height": 64, "width": 48})
    with ServerThread(SyntheticPipeline(), config) as s:
        yield s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def decoded_frames(mp4: bytes, tmp_path) -> int:
    path = tmp_path / "kept.mp4"
    path.write_bytes(mp4)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def test_stop_message_is_checked():
    assert parse_message('{"type": "stop", "seq": 3}') == {"type": "stop", "seq": 3}
    with pytest.raises(ProtocolError) as e:
        parse_message('{"type": "stop", "seq": -1}')
    assert e.value.code == "bad_message"


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "60"])
def test_recording_keep_seconds_is_checked(bad):
    with pytest.raises(ConfigError) as e:
        ServerConfig(recording_keep_seconds=bad)
    assert e.value.name == "recording_keep_seconds"


def test_recording_keep_seconds_may_be_zero():
    assert ServerConfig(recording_keep_seconds=0).recording_keep_seconds == 0


def test_the_guide_of_the_demo_and_of_other_models():
    demo = prompt_guide("demo")
    assert demo["default_prompt"] == DEMO_EXAMPLES[0] and demo["examples"] == list(DEMO_EXAMPLES)
    assert set(demo["vocabulary"]) == {w for w in caption_words() if w.isalpha()} and "," not in demo["vocabulary"]
    for example in DEMO_EXAMPLES:  # every word known, and read back as a scene
        assert set(example.replace(",", " ").split()) <= set(demo["vocabulary"]), example
        parse_caption(example, strict=True)
    other = prompt_guide("/models/longsana-2b")
    assert other == {"default_prompt": GENERAL_EXAMPLES[0], "examples": list(GENERAL_EXAMPLES), "vocabulary": None}


@pytest.mark.slow
def test_the_demo_draws_its_examples():
    """Each example's object color and background, read back from the demo's video of it (chance: 1 in 11)."""
    from longsana.demo.train import generate
    from longsana.stream import Pipeline

    pipe = Pipeline.from_pretrained("demo", device="cpu")
    for example in DEMO_EXAMPLES:
        frames = np.concatenate(generate(pipe, example, chunks=2, seed=0))
        result = matches(frames, parse_caption(example)[0])
        assert result["color"] and result["background"], (example, result)


def test_hello_and_model_route_carry_the_guide(server):
    async def main():
        async with await WsClient.connect(server.url, FOX, decode=False) as c:
            return c.hello

    hello = run(main())
    status, _, body = get(server.url + "model")
    model = json.loads(body)
    guide = prompt_guide("demo")
    assert status == 200 and model == {"model": "demo", "width": 48, "height": 64, **guide,
                                       "recording_keep_seconds": KEEP_SECONDS}
    assert {k: hello[k] for k in (*guide, "model", "recording_keep_seconds")} == {
        **guide, "model": "demo", "recording_keep_seconds": KEEP_SECONDS}


@pytest.mark.slow
def test_stop_frees_the_slot_and_the_recording_outlives_the_stream_for_a_while(server, tmp_path):
    async def streams() -> int:
        return json.loads((await asyncio.to_thread(get, server.url + "health"))[2])["streams"]

    async def main():
        for _ in range(100):  # the module's server holds one stream at most: let an earlier test's be freed
            if await streams() == 0:
                break
            await asyncio.sleep(0.1)
        async with await WsClient.connect(server.url, FOX, decode=False) as c:
            await c.wait_until(lambda: len(c.frames) >= 12)
            ack = await c.request("stop")
            assert ack == {"type": "ack", "seq": ack["seq"], "of": "stop"}
            await c.wait_until(lambda: any(e["type"] == "end" for e in c.events))
            end = next(e for e in c.events if e["type"] == "end")
            assert c.events.index(end) > c.events.index(ack) and end["reason"] == "stopped by the client"
            shown, sid, token = len(c.frames), c.session, c.token
        # the page starts its next stream at once, with the stopped one's token: the server waits for the slot
        async with await WsClient.connect(server.url, FOX, decode=False, replace=token) as again:
            await again.wait_until(lambda: len(again.frames) >= 1)
            # the first stream was freed before this one got the slot: its recording is kept from then on (fetched
            # now, as the KEEP_SECONDS timer runs from then)
            kept = await asyncio.to_thread(get, f"{server.url}recording/{sid}.mp4")
            assert (await again.request("stop"))["type"] == "ack"
        for _ in range(50):  # and the slot is given back
            if await streams() == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the stopped stream still holds its slot after 5 s")
        return shown, sid, kept

    shown, sid, (status, _, mp4) = run(main())
    assert status == 200 and decoded_frames(mp4, tmp_path) >= shown  # the whole stream, its last frames included
    run(asyncio.sleep(KEEP_SECONDS + 0.5))
    status, _, body = get(f"{server.url}recording/{sid}.mp4")
    assert status == 404
    message = json.loads(body)["message"]
    assert f"for {KEEP_SECONDS:g} s after it ends" in message and sid in message


def test_open_says_what_it_did(monkeypatch):
    url = "http://127.0.0.1:8000/"
    monkeypatch.setattr(server_module.webbrowser, "open", lambda u: True)
    assert server_module.open_page(url) == f"Opened {url} in your browser."
    monkeypatch.setattr(server_module.webbrowser, "open", lambda u: False)
    assert server_module.open_page(url) == f"No browser found here: open {url} in a browser."
