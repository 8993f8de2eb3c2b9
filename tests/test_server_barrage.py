"""A bounded fault barrage against a server with 2 live streams (one WebRTC, one WebSocket): malformed HTTP,
malformed WebSocket and data-channel messages, stalled clients, floods and abrupt disconnects, all at once, three
rounds. Both streams keep their frame rate and answer `stats` afterwards, and the process's resident memory and
open files come back to where they were after the first round (the server runs in this process)."""

import asyncio
import json
import os
import socket
import struct

import aiohttp
import pytest

from longsana.streaming.client import Refused, RtcClient, WsClient, address, frame_rate, post_json
from longsana.streaming.server import ServerConfig, ServerThread
from longsana.streaming.synthetic import SyntheticPipeline

pytestmark = pytest.mark.slow  # about 15 s

FPS = SyntheticPipeline().spec.fps
FOX = "a red fox trotting through snow"
ROUNDS = 3
RSS_SLACK = 16 << 20  # bytes over the level after the first round (warm-up: codecs, pools, imports)
HOST = b"Host: 127.0.0.1\r\n"
BAD_HTTP = [
    b"POST /offer HTTP/1.1\r\n" + HOST + "Content-Length: ²\r\n\r\n".encode(),
    b"POST /offer HTTP/1.1\r\n" + HOST + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"POST /offer HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"POST /offer HTTP/1.1\r\n" + HOST + b"Content-Length: 50000\r\n\r\n" + b"[" * 50_000,
    b"POST /offer HTTP/1.1\r\n" + HOST + b"Content-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
    b"POST /offer HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"NONSENSE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS hello
    b"GET /recording/" + b"x" * 3000 + b".mp4 HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /ws HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # no key
    b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
]
BAD_MESSAGES = [
    '{"type": "rewind", "seq": 1, "seconds": ' + "9" * 400 + "}",
    "[" * 10_000,
    '{"type": "prompt", "seq": 3, "prompt": "a", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"type": "prompt", "seq": 4, "prompt": "\\ud800"}',
    '{"type": "rewind", "seq": 5, "seconds": NaN}',
    '{"type": "start", "seq": 6, "prompt": "again"}',
    "x" * 20_000,
    '{"type": "stats", "seq": "1"}',
]


def process() -> tuple[int, int]:
    """(resident bytes, open file descriptors) of this process."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir("/proc/self/fd"))


def answered(url: str, raw: bytes) -> int:
    """Send raw bytes; the status of the answer (0 if the connection closed without one)."""
    with socket.create_connection(address(url), timeout=10) as s:
        s.sendall(raw)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def abrupt(url: str, n: int) -> None:
    """Connections that vanish: closed at once, reset mid-request (SO_LINGER 0)."""
    for i in range(n):
        s = socket.create_connection(address(url), timeout=5)
        if i % 2:
            s.sendall(b"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900\r\n\r\n{")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


async def websocket_faults(url: str) -> None:
    """Bad first messages, a start while every slot is taken, an over-size message, a client that drops."""
    async with aiohttp.ClientSession() as session:
        for first in BAD_MESSAGES[:4] + ['{"type": "start", "seq": 1, "prompt": "\\ud800"}']:
            async with session.ws_connect(url + "ws") as ws:
                await ws.send_str(first)
                assert (await ws.receive_json(timeout=10))["type"] == "error"
        with pytest.raises(Refused):
            await WsClient.connect(url, FOX, decode=False)
        async with session.ws_connect(url + "ws", max_msg_size=0) as ws:
            try:
                await ws.send_bytes(b"\x00" * (2 << 20))
            except ConnectionError:  # the server may close the connection before all of it is sent: as it should
                pass
            else:
                assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        ws = await session.ws_connect(url + "ws")
        ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        await ws.close()


async def barrage(url: str, streams: list) -> None:
    stalled = [socket.create_connection(address(url), timeout=10) for _ in range(8)]
    for s in stalled:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    statuses = await asyncio.gather(*(asyncio.to_thread(answered, url, raw) for raw in BAD_HTTP))
    assert all(400 <= s < 600 for s in statuses), statuses
    offers = [asyncio.to_thread(post_json, url + "offer", {"type": "offer", "sdp": "v=0", "prompt": FOX})
              for _ in range(6)]
    assert {status for status, _ in await asyncio.gather(*offers)} <= {400, 503}
    for c in streams:
        for raw in BAD_MESSAGES:
            c.send_raw(raw)
    streams[1].send_burst([json.dumps({"type": "stats", "seq": 1000 + i}) for i in range(100)])
    await asyncio.gather(websocket_faults(url), asyncio.to_thread(abrupt, url, 10))
    for s in stalled:  # the server cut them off (request_timeout)
        assert s.recv(100) == b""
        s.close()


def test_fault_barrage_leaves_the_streams_and_the_process_as_they_were():
    pipe = SyntheticPipeline(height=64, width=96)
    config = ServerConfig(port=0, ice_loopback=True, request_timeout=1.0, max_connections=32)

    async def main(server):
        url = server.url
        streams = [await RtcClient.connect(url, FOX, decode=False), await WsClient.connect(url, FOX, decode=False)]
        levels = []
        for _ in range(ROUNDS):
            await barrage(url, streams)
            await asyncio.sleep(1.0)  # refused connections linger up to 1 s
            levels.append(process())
        for c in streams:
            n = len(c.frames)
            await asyncio.sleep(2.0)
            rate = frame_rate(c.frames[n:])
            assert rate >= 0.7 * FPS, f"{type(c).__name__}: {rate:.1f} fps after the barrage"
            stats = await c.request("stats")
            assert stats["type"] == "stats" and stats["state"] == "playing"
            assert not [e for e in c.errors() if e["code"] in ("generator", "encoder", "internal")]
        assert len(server.server.sessions) == 2
        for c in streams:
            await c.close()
        (rss0, fds0), rest = levels[0], levels[1:]
        print(f"RSS {rss0 / 2**20:.1f} MB -> {[round(r / 2**20, 1) for r, _ in rest]}, fds {fds0} -> "
              f"{[f for _, f in rest]}")
        assert all(fds == fds0 for _, fds in rest), levels
        assert all(rss <= rss0 + RSS_SLACK for rss, _ in rest), levels

    with ServerThread(pipe, config) as server:
        asyncio.run(asyncio.wait_for(main(server), 120))
