"""The failures a probe of `longsana serve` found, one test each (numbered as in the issue that listed them): no bad
message may silence a stream or end it, every HTTP request gets an answer, stalled clients are timed out and
connections capped, option values are checked at startup, refusals say which request they refuse, slots go only to
valid offers, only the holder of a stream may replace it, recordings are muxed once and downloads are bounded,
prompt encoding runs per stream, and a server on another address keeps its Host/Origin policy and says so."""

import asyncio
import json
import math
import socket
import threading
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from multidict import CIMultiDict

from longsana.cli import main as cli
from longsana.streaming import server as server_module
from longsana.streaming.client import Refused, RtcClient, WsClient, address, get, http, post_json, refusals
from longsana.streaming.server import ServerConfig, ServerThread, check_origin
from longsana.streaming.synthetic import SyntheticPipeline

FOX, OWL = "a red fox trotting through snow", "an owl gliding over a moonlit lake"
SURROGATE_PROMPT = '"a fox \\ud800"'  # valid JSON, not valid Unicode text


def serve(pipe=None, **config):
    config = ServerConfig(**{"port": 0, "ice_loopback": True, **config})
    return ServerThread(pipe or SyntheticPipeline(height=64, width=96), config)


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def still_streaming(c, seconds=0.6) -> None:
    n = len(c.frames)
    await c.wait_until(lambda: len(c.frames) >= n + int(seconds * 16 * 0.6), 10)


async def answers(c) -> None:
    """The stream's control loop is alive: stats, a prompt change, and frames keep coming."""
    assert (await c.request("stats"))["type"] == "stats"
    assert (await c.request("prompt", prompt=OWL))["type"] == "ack"
    await still_streaming(c)


class HookedPipeline(SyntheticPipeline):
    """A synthetic source whose streams call `hook(prompt)` first in set_prompt (a stand-in for a text encoder)."""

    def __init__(self, hook, **kwargs):
        super().__init__(**kwargs)
        self.hook = hook

    def stream(self, *args, **kwargs):
        stream = super().stream(*args, **kwargs)
        set_prompt = stream.set_prompt

        def hooked(prompt, **kwargs):
            self.hook(prompt)
            return set_prompt(prompt, **kwargs)

        stream.set_prompt = hooked
        return stream


def fails_on_boom(prompt: str) -> None:
    """What no handler expects, for one prompt, as a buggy text encoder would raise."""
    if prompt == "boom":
        raise TypeError("simulated handler bug")


def slow_on_slow(prompt: str) -> None:
    """3 s for one prompt, as a large text encoder on a busy GPU may take."""
    if prompt == "slow":
        time.sleep(3)


# -- 1. one bad control message silenced the stream's control loop ------------------------------------------------
BAD_CONTROL = [  # (raw message, error code, seq echoed)
    ('{"type": "rewind", "seq": 1, "seconds": ' + "9" * 400 + "}", "bad_message", 1),  # float overflow
    ("[" * 10_000, "bad_json", None),
    ('{"type": "prompt", "seq": 3, "prompt": "a", "x": ' + "[" * 5000 + "]" * 5000 + "}", "bad_json", None),
    ('{"type": "prompt", "seq": 4, "prompt": ' + SURROGATE_PROMPT + "}", "bad_prompt", 4),
    ('{"type": "rewind", "seq": 5, "seconds": NaN}', "bad_json", None),
    ('{"type": "rewind", "seq": 6, "seconds": 1e999}', "bad_json", None),
    ('{"type": "stats", "seq": 7, "x": {"y": 1}}', "bad_message", 7),
    ('{"type": "prompt", "seq": 8, "prompt": "boom"}', "internal", 8),  # a handler failure
    ('{"type": "prompt", "seq": 9, "prompt": "a", "transition": -1}', "bad_message", 9),
    ('{"type": "prompt", "seq": 10, "prompt": "a", "transition": 11}', "bad_message", 10),  # over 10 s
    ('{"type": "prompt", "seq": 11, "prompt": "a", "transition": "2"}', "bad_message", 11),
    ('{"type": "prompt", "seq": 12, "prompt": "a", "transition": true}', "bad_message", 12),
]


@pytest.mark.parametrize("client", [RtcClient, WsClient], ids=["webrtc", "websocket"])
def test_bad_control_messages_never_silence_the_stream(client):
    async def main(server):
        c = await client.connect(server.url, FOX, decode=False)
        await c.wait_until(lambda: len(c.frames) >= 8)
        assert await refusals(c, [raw for raw, _, _ in BAD_CONTROL]) == [(code, seq) for _, code, seq in BAD_CONTROL]
        await answers(c)
        await c.close()

    with serve(HookedPipeline(fails_on_boom, height=64, width=96)) as server:
        run(main(server))


# -- 2. a lone-surrogate prompt ended the whole stream --------------------------------------------------------------
def test_a_lone_surrogate_prompt_is_refused_and_ends_nothing():
    async def main(server):
        ws_url = server.url.replace("http", "ws") + "ws"
        async with aiohttp.ClientSession() as http_session, http_session.ws_connect(ws_url) as ws:
            await ws.send_str('{"type": "start", "seq": 1, "prompt": ' + SURROGATE_PROMPT + "}")
            reply = await ws.receive_json(timeout=10)
            assert (reply["type"], reply["code"], reply["seq"]) == ("error", "bad_prompt", 1)
        raw = b'{"type": "offer", "sdp": "v=0", "prompt": ' + SURROGATE_PROMPT.encode() + b"}"
        status, body = await asyncio.to_thread(http, server.url, b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                               b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        assert status == 400 and json.loads(body)["code"] == "bad_prompt"
        assert server.server.metrics.value("longsana_streams_started_total") == 0
        c = await WsClient.connect(server.url, FOX, decode=False)
        c.send_raw('{"type": "prompt", "seq": 9, "prompt": ' + SURROGATE_PROMPT + "}")
        await c.wait_until(lambda: c.errors(), 10)
        assert c.errors()[0]["code"] == "bad_prompt"
        await asyncio.sleep(1.0)  # the generator would fail at its next chunk
        await answers(c)
        assert server.server.metrics.value("longsana_stream_failures_total", stage="generator") == 0
        await c.close()

    with serve() as server:
        run(main(server))


# -- 3. HTTP requests dropped without a response ---------------------------------------------------------------------
def test_malformed_http_gets_an_answer():
    with serve() as server:
        url = server.url
        head = b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        assert http(url, head + "Content-Length: ²\r\n\r\n".encode())[0] == 400
        assert http(url, head + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n")[0] in (400, 413)
        deep = b"[" * 50_000
        status, body = http(url, head + b"Content-Length: %d\r\n\r\n" % len(deep) + deep)
        assert status == 400 and json.loads(body)["code"] == "bad_json"

        async def deep_first_message():
            ws_url = url.replace("http", "ws") + "ws"
            async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
                await ws.send_str("[" * 10_000)
                assert (await ws.receive_json(timeout=10))["code"] == "bad_json"
                assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008

        run(deep_first_message())
        assert http(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200


# -- 4. conflicting lengths waited forever; stalled connections were never closed and never capped --------------------
@pytest.mark.slow
def test_conflicting_lengths_stalled_clients_and_the_connection_cap():
    with serve(request_timeout=1.0, max_connections=8) as server:
        url = server.url
        t = time.monotonic()
        status, _ = http(url, b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                              b"Content-Length: 7\r\n\r\nhello", timeout=5)
        assert status == 400 and time.monotonic() - t < 2
        # a body that never comes: 408 after the request timeout
        status, _ = http(url, b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{", timeout=5)
        assert status == 408
        # slowloris: heads that never end are cut off after the request timeout
        stalled = [socket.create_connection(address(url), timeout=5) for _ in range(8)]
        for s in stalled:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        time.sleep(0.3)
        # over the cap: a new connection is answered 503 and closed at once
        assert http(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)[0] == 503
        t = time.monotonic()
        for s in stalled:
            assert s.recv(100) == b"", "a stalled connection got data instead of being closed"
            s.close()
        assert time.monotonic() - t < 3
        time.sleep(0.2)
        assert http(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200


# -- 5. option values are checked at startup -------------------------------------------------------------------------
@pytest.fixture
def serve_cli(monkeypatch):
    """`longsana serve ARGS` up to where it would serve: (exit code, output, ServerConfig or None)."""
    got = {}
    monkeypatch.setattr(server_module, "_run_loop", lambda coro: (got.update(ran=True), coro.close()))

    def run_cli(*args):
        got.clear()
        r = CliRunner().invoke(cli, ["serve", "--model", "synthetic", *args])
        return r.exit_code, r.output, got.get("ran")

    return run_cli


@pytest.mark.parametrize("args", [("--client-timeout", "nan"), ("--client-timeout", "inf"),
                                  ("--request-timeout", "nan"), ("--height", "17"), ("--width", "101")])
def test_bad_option_values_are_refused_at_startup(serve_cli, args):
    code, output, ran = serve_cli(*args)
    assert code == 2 and args[0] in output and "Traceback" not in output and not ran, output
    with pytest.raises(ValueError):
        ServerConfig(client_timeout=math.nan)


# -- 6. too_many refusals carried seq null ----------------------------------------------------------------------------
def test_refusals_of_a_flood_carry_their_seq():
    async def main(server):
        c = await WsClient.connect(server.url, FOX, decode=False)
        c.send_burst([json.dumps({"type": "stats", "seq": i}) for i in range(1, 201)])
        await c.wait_until(lambda: sum(e["type"] == "stats" or e.get("code") == "too_many" for e in c.events) >= 200)
        answered = {e["seq"] for e in c.events if e["type"] == "stats"}
        refused = {e["seq"] for e in c.errors() if e["code"] == "too_many"}
        assert refused and answered | refused == set(range(1, 201)) and not answered & refused
        await c.close()

    with serve() as server:
        run(main(server))


# -- 7. slots before valid offers; replace by anyone; remux per download; one control thread ---------------------------
def test_a_slot_is_taken_only_by_a_valid_offer():
    async def main(server):
        for sdp in ("v=0", "this is not SDP"):
            status, reply = await asyncio.to_thread(post_json, server.url + "offer",
                                                    {"type": "offer", "sdp": sdp, "prompt": FOX})
            assert status == 400 and reply["code"] == "bad_offer"
        assert server.server.metrics.value("longsana_streams_started_total") == 0 and not server.server.sessions
        c = await WsClient.connect(server.url, FOX, decode=False)  # the only slot is free at once
        await c.wait_until(lambda: len(c.frames) >= 2)
        await c.close()

    with serve(max_streams=1) as server:
        run(main(server))


@pytest.mark.slow
def test_only_the_holder_can_replace_a_stream():
    async def main(server):
        a = await RtcClient.connect(server.url, FOX, decode=False)
        await a.wait_until(lambda: len(a.frames) >= 4)
        assert a.token and a.token != a.session
        with pytest.raises(Refused) as refused:  # the session id is public (it is in the recording's URL)
            await WsClient.connect(server.url, OWL, decode=False, replace=a.session)
        assert refused.value.reply["code"] == "busy"
        await still_streaming(a)
        b = await WsClient.connect(server.url, OWL, decode=False, replace=a.token)
        await a.wait_until(lambda: any(e["type"] == "end" for e in a.events), 10)
        await b.wait_until(lambda: len(b.frames) >= 4)
        await a.close()
        await b.close()

    with serve(max_streams=1) as server:
        run(main(server))


@pytest.mark.slow
def test_recordings_are_muxed_once_and_downloads_are_bounded(monkeypatch):
    async def main(server):
        c = await WsClient.connect(server.url, FOX, decode=False)
        await c.wait_until(lambda: len(c.frames) >= 16)
        url = f"{server.url}recording/{c.session}.mp4"
        status, _, first = await asyncio.to_thread(get, url)
        assert status == 200
        await c.wait_until(lambda: len(c.frames) >= 32)
        status, _, second = await asyncio.to_thread(get, url)
        # one MP4, written as the stream goes: an earlier download is the start of a later one
        assert status == 200 and len(second) > len(first) and second.startswith(first)

        held = threading.Event()
        read = server_module.read_piece

        def slow_read(f, size):  # the first download stalls until released
            held.wait(10)
            return read(f, size)

        monkeypatch.setattr(server_module, "read_piece", slow_read)
        stalled = asyncio.create_task(asyncio.to_thread(get, url))
        await asyncio.sleep(0.5)
        status, _, body = await asyncio.to_thread(get, url)
        assert status == 503 and json.loads(body)["code"] == "busy"
        held.set()
        status, _, third = await stalled
        assert status == 200 and third.startswith(second)
        await c.close()

    with serve(max_downloads=1) as server:
        run(main(server))


@pytest.mark.slow
def test_prompt_encoding_of_one_stream_does_not_hold_up_another():
    async def main(server):
        a, b = await asyncio.gather(WsClient.connect(server.url, FOX, decode=False),
                                    WsClient.connect(server.url, FOX, decode=False))
        await asyncio.gather(a.wait_until(lambda: a.frames), b.wait_until(lambda: b.frames))
        slow = asyncio.create_task(a.request("prompt", prompt="slow"))
        await asyncio.sleep(0.2)
        t = time.monotonic()
        assert (await b.request("prompt", prompt=OWL))["type"] == "ack"
        assert time.monotonic() - t < 1.5
        assert (await slow)["type"] == "ack"
        await a.close()
        await b.close()

    with serve(HookedPipeline(slow_on_slow, height=64, width=96)) as server:
        run(main(server))


# -- 8. another address: a warning, the same Host policy; bind errors in one line -------------------------------------
def origin_status(config: ServerConfig, host: str, origin: str | None = None) -> int:
    headers = CIMultiDict({"Host": host, **({"Origin": origin} if origin else {})})
    try:
        check_origin(SimpleNamespace(headers=headers), config)
    except web.HTTPException as e:
        return e.status
    return 200


def test_the_host_policy_holds_on_every_address():
    lan = ServerConfig(host="0.0.0.0")
    # DNS rebinding: the attacker's name, now pointing at this machine
    assert origin_status(lan, "evil.example:8000", "http://evil.example:8000") == 403
    assert origin_status(lan, "evil.example:8000") == 403
    # the machine's own addresses, and names given with --allow-host
    assert origin_status(lan, "192.168.1.5:8000", "http://192.168.1.5:8000") == 200
    assert origin_status(lan, "[fe80::1]:8000", "http://[fe80::1]:8000") == 200
    assert origin_status(lan, "localhost:8000", "http://localhost:8000") == 200
    named = ServerConfig(host="0.0.0.0", allowed_hosts=("studio.lan",))
    assert origin_status(named, "studio.lan:8000", "http://studio.lan:8000") == 200
    assert origin_status(named, "studio.lan:8000", "http://evil.example") == 403


def test_another_address_is_warned_about(serve_cli):
    code, output, ran = serve_cli("--host", "0.0.0.0", "--allow-host", "studio.lan")
    assert code == 0 and ran and "warning" in output.lower() and "0.0.0.0" in output, output
    code, output, ran = serve_cli()
    assert code == 0 and "warning" not in output.lower(), output


def test_a_bind_error_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", "--model", "synthetic", "--port", str(port)])
    assert r.exit_code == 1 and f"127.0.0.1:{port}" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


# -- any unexpected error: a 500, not a dropped connection, and its traceback logged once ------------------------------
def test_a_bug_answers_500_and_is_logged_once(monkeypatch, caplog):
    async def broken(self, request):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(server_module.Server, "_health", broken)
    with serve() as server:
        status, body = http(server.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 500 and json.loads(body)["code"] == "internal"
        assert http(server.url, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") == (200, b"")
    logged = [r for r in caplog.records if r.exc_info and "simulated bug" in str(r.exc_info[1])]
    assert len(logged) == 1, caplog.text
