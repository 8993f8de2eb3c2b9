"""A Python client for the streaming server, over WebRTC (aiortc) or the WebSocket fallback (aiohttp). The
protocol, fault and soak tests drive the server with it, and it measures a server from the command line:

    python -m longsana.streaming.client http://127.0.0.1:8000/ --prompt "a fox" --switch "an owl" --seconds 10 \
        [--websocket]
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import aiohttp
import av
import click
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from longsana.streaming.protocol import FRAME_HEADER

THUMB = (8, 16)  # (height, width) of the thumbnail kept per frame
HEARTBEAT_SECONDS = 1.0


class Refused(Exception):
    """The server refused the stream (busy, bad request); `reply` is its error message."""

    def __init__(self, reply: dict):
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.reply = reply


@dataclass
class Received:
    t: float  # arrival, time.monotonic()
    pts: int  # 90 kHz; over WebRTC rebased so that the stream's first frame is 0, as on the server
    thumb: np.ndarray | None  # RGB (height, width, 3) at the client's `size` (a thumbnail by default), if decoding
    prompt_seq: int | None = None  # WebSocket frames carry it; over WebRTC use the chunk events
    index: int | None = None  # the video frame index (WebSocket frames carry it)


@dataclass
class Client:
    url: str
    decode: bool = True
    size: tuple[int, int] | None = THUMB  # (height, width) decoded frames are kept at; None: as sent
    frames: list[Received] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    session: str | None = None
    token: str | None = None  # the secret that lets this client replace its stream (`replace`)
    hello: dict | None = None  # the server's hello message

    def __post_init__(self):
        self._seq = 0
        self._replies: dict[int, asyncio.Future] = {}
        self._arrived = asyncio.Event()  # set on every frame or message
        self._heartbeat: asyncio.Task | None = None

    def _on_text(self, text: str) -> None:
        msg = json.loads(text)
        self.events.append(msg)
        if msg.get("type") == "hello":
            self.hello, self.session, self.token = msg, msg["session"], msg["token"]
        future = self._replies.pop(msg.get("seq"), None) if msg.get("type") in ("ack", "error", "stats") else None
        if future is not None and not future.done():
            future.set_result(msg)
        self._arrived.set()

    def _on_frame(self, received: Received) -> None:
        self.frames.append(received)
        self._arrived.set()

    def send_raw(self, data: str | bytes) -> None:
        raise NotImplementedError

    def _start_heartbeat(self) -> None:
        """Ping every second, as the page does: the server drops streams whose client is silent."""
        async def beat():
            while True:
                await asyncio.sleep(HEARTBEAT_SECONDS)
                self.send_raw(json.dumps({"type": "ping"}))

        self._heartbeat = asyncio.create_task(beat())

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _ended(self) -> None:
        """The stream is over (closed by either side, or the connection dropped)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._arrived.set()

    async def request(self, type: str, timeout: float = 10, **fields) -> dict:
        """Send a control message and return the server's reply to it (ack, stats or error)."""
        self._seq += 1
        future = self._replies[self._seq] = asyncio.get_running_loop().create_future()
        self.send_raw(json.dumps({"type": type, "seq": self._seq, **fields}))
        return await asyncio.wait_for(future, timeout)

    async def wait_until(self, predicate, timeout: float = 20) -> None:
        """Wait until predicate() holds, re-checking on each frame and message."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s ({len(self.frames)} frames, "
                                   f"last events {self.events[-3:]})")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    def chunks(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "chunk"]

    def errors(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "error"]


def _thumb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    height, width = size or (frame.height, frame.width)
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


class RtcClient(Client):
    @classmethod
    async def connect(cls, url: str, prompt: str, decode: bool = True, codecs: tuple[str, ...] = (),
                      size: tuple[int, int] | None = THUMB, **start) -> RtcClient:
        """Offer (video recvonly + the control data channel), POST it with the start fields, connect.
        `codecs` ("video/VP8", ...) limits the video codecs offered, as some browsers do."""
        self = cls(url, decode, size)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("control")
        self.channel.on("message", self._on_text)
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        video = self.pc.addTransceiver("video", direction="recvonly")
        if codecs:
            video.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("video").codecs
                                       if c.mimeType in codecs])
        self.pc.on("track", lambda track: setattr(self, "_reader", asyncio.create_task(self._read(track))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"type": "offer", "sdp": self.pc.localDescription.sdp, "prompt": prompt, **start}
        status, reply = await asyncio.to_thread(post_json, url.rstrip("/") + "/offer", body)
        if status != 200:
            await self.pc.close()
            raise Refused(reply)
        self.session, self.token = reply["session"], reply["token"]
        await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        await asyncio.wait_for(opened.wait(), 20)
        await self.wait_until(lambda: self.hello, 20)
        self._start_heartbeat()
        return self

    async def _read(self, track) -> None:
        origin = None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._ended()
                return
            origin = frame.pts if origin is None else origin
            pts = (frame.pts - origin) % 2**32  # RTP timestamps start at a random origin and wrap at 2**32
            self._on_frame(Received(time.monotonic(), pts, _thumb(frame, self.size) if self.decode else None))

    def send_raw(self, data: str | bytes) -> None:
        self.channel.send(data)

    async def close(self) -> None:
        self._ended()
        await self.pc.close()


class WsClient(Client):
    @classmethod
    async def connect(cls, url: str, prompt: str, decode: bool = True, size: tuple[int, int] | None = THUMB,
                      **start) -> WsClient:
        """Open the WebSocket, send start, wait for hello (Refused on an error instead)."""
        self = cls(url, decode, size)
        self._http = aiohttp.ClientSession()
        try:
            self.ws = await self._http.ws_connect(url.rstrip("/") + "/ws", max_msg_size=0)
        except BaseException:
            await self._http.close()
            raise
        self._jpeg = av.CodecContext.create("mjpeg", "r")
        self.send_raw(json.dumps({"type": "start", "seq": 0, "prompt": prompt, **start}))
        self._reader = asyncio.create_task(self._read())
        await self.wait_until(lambda: self.hello or self.errors(), 20)
        if not self.hello:
            await self.close()
            raise Refused(self.errors()[0])
        self._start_heartbeat()
        return self

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._on_text(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    prompt_seq, _, index, pts = FRAME_HEADER.unpack_from(message.data)
                    thumb = None
                    if self.decode:
                        (frame,) = self._jpeg.decode(av.Packet(message.data[FRAME_HEADER.size:]))
                        thumb = _thumb(frame, self.size)
                    self._on_frame(Received(time.monotonic(), int(pts), thumb, prompt_seq, index))
        finally:
            self._ended()
            await self._http.close()  # the connection is over, however it ended (close() may never come)

    def send_raw(self, data: str | bytes) -> None:
        async def send():
            try:
                await (self.ws.send_str(data) if isinstance(data, str) else self.ws.send_bytes(data))
            except ConnectionError:  # the server has gone: the reader sees it too
                pass

        asyncio.ensure_future(send())

    def send_burst(self, messages: list[str]) -> None:
        """Send text messages in one piece on the wire (the socket corked meanwhile), as a flood would."""
        sock = self.ws.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for m in messages:
            self.send_raw(m)

        async def uncork():
            await asyncio.sleep(0.05)  # after the sends above, which run first
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

        asyncio.ensure_future(uncork())

    def abort(self) -> None:
        """Drop the connection without a goodbye, as a crashed client or a lost network would."""
        self.ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        self._ended()
        await self.ws.close()
        await self._http.close()


async def refusals(c: Client, raws: list[str | bytes], timeout: float = 10) -> list[tuple[str, int | None]]:
    """Send each raw message; the (code, seq) of the errors they got, once there are as many as messages."""
    before = len(c.errors())
    for raw in raws:
        c.send_raw(raw)
    await c.wait_until(lambda: len(c.errors()) >= before + len(raws), timeout)
    return [(e["code"], e["seq"]) for e in c.errors()[before:]]


def address(url: str) -> tuple[str, int]:
    """(host, port) of a server's URL."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def http(url: str, raw: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes as an HTTP request (for requests no HTTP library would send); (status, body). IndexError if
    the server sent no response."""
    with socket.create_connection(address(url), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get(url: str, timeout: float = 20) -> tuple[int, str | None, bytes]:
    """GET; (status, Content-Type, body) for error statuses too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def post_json(url: str, body: dict, timeout: float = 30, headers: dict | None = None) -> tuple[int, dict]:
    """POST a JSON body; (status, JSON reply) for error statuses too."""
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frame_rate(frames: list[Received]) -> float:
    """Arrival rate over the frames' span."""
    return (len(frames) - 1) / (frames[-1].t - frames[0].t) if len(frames) > 1 else 0.0


async def measure(url: str, prompt: str, switch: str | None, seconds: float, websocket: bool) -> dict:
    """Stream for `seconds`, switching the prompt halfway; time to first frame, rates and switch latency."""
    t0 = time.monotonic()
    async with await (WsClient if websocket else RtcClient).connect(url, prompt, decode=False) as client:
        await client.wait_until(lambda: client.frames, 60)
        ttff = client.frames[0].t - t0
        await asyncio.sleep(seconds / 2)
        switch_latency = None
        if switch:
            t_switch = time.monotonic()
            before = len(client.chunks())
            ack = await client.request("prompt", prompt=switch)
            assert ack["type"] == "ack", ack
            await client.wait_until(lambda: any(c["prompt"] == switch for c in client.chunks()[before:]), 60)
            first = next(c for c in client.chunks()[before:] if c["prompt"] == switch)
            await client.wait_until(lambda: client.frames[-1].pts >= first["pts"], 60)
            switch_latency = next(f.t for f in client.frames if f.pts >= first["pts"]) - t_switch
        await asyncio.sleep(seconds / 2)
        stats = await client.request("stats")
    return {"transport": "websocket" if websocket else "webrtc", "frames": len(client.frames),
            "ttff_s": round(ttff, 3), "receive_fps": round(frame_rate(client.frames), 2),
            "server_gen_fps": stats["gen_fps"], "switch_latency_s": switch_latency and round(switch_latency, 3),
            "pts_monotonic": all(a.pts < b.pts for a, b in zip(client.frames, client.frames[1:])),
            "pts_step_90k": sorted({b.pts - a.pts for a, b in zip(client.frames, client.frames[1:])})[:5]}


@click.command()
@click.argument("url")
@click.option("--prompt", default="a red fox trotting through snow", show_default=True)
@click.option("--switch", default="an owl gliding over a moonlit lake", show_default=True,
              help="Prompt to switch to halfway ('' for none).")
@click.option("--seconds", default=10.0, show_default=True)
@click.option("--websocket", is_flag=True, help="Use the WebSocket fallback instead of WebRTC.")
def main(url, prompt, switch, seconds, websocket):
    """Connect to a LongSANA server and print what one viewer gets, as JSON."""
    print(json.dumps(asyncio.run(measure(url, prompt, switch or None, seconds, websocket))))


if __name__ == "__main__":
    main()
