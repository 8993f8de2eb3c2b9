"""A minimal HTTP/1.1 front on asyncio streams, and WebSockets on the same port through websockets' sans-I/O protocol.

The `websockets` server only accepts GET requests without a body, and WebRTC signaling is a POST of the offer, so
the server reads requests itself: one request per connection (`Connection: close`), bodies by Content-Length
only. A GET with `Upgrade: websocket` is handed, raw bytes and all, to `websockets.server.ServerProtocol`, which
does the handshake and the framing; `WebSocket` only moves bytes between it and the socket.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # an SDP offer is a few KB
FILE_PIECE_BYTES = 256 * 1024


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    head: bytes  # the raw request line and headers, for the WebSocket handshake
    body: bytes = b""

    @property
    def is_websocket(self) -> bool:
        return self.method == "GET" and self.headers.get("upgrade", "").lower() == "websocket"

    def json(self) -> dict:
        try:
            obj = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return obj


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request, or None if the client closed the connection before sending one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise HTTPError(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise HTTPError(431, f"request head over {MAX_HEAD_BYTES} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise HTTPError(400, f"bad request line {lines[0][:100]!r}") from None
    if not version.startswith("HTTP/1."):
        raise HTTPError(505, f"unsupported protocol {version[:20]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPError(400, f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    request = Request(method, unquote(url.path), dict(parse_qsl(url.query)), headers, head)
    if "transfer-encoding" in headers:
        raise HTTPError(411, "send the body with a Content-Length")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise HTTPError(400, f"bad Content-Length {length[:20]!r}")
    if int(length) > MAX_BODY_BYTES:
        raise HTTPError(413, f"request body of {length} bytes; the limit is {MAX_BODY_BYTES}")
    request.body = await reader.readexactly(int(length))
    return request


async def send_response(writer: asyncio.StreamWriter, status: int, body: bytes | str | dict | Path,
                        content_type: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Write one response: a dict body is sent as JSON, a Path as the file's content, in pieces."""
    if isinstance(body, dict):
        body, content_type = json.dumps(body).encode(), content_type or "application/json"
    elif isinstance(body, str):
        body = body.encode()
    length = body.stat().st_size if isinstance(body, Path) else len(body)
    headers = {"Content-Type": content_type or "text/plain; charset=utf-8", "Content-Length": str(length),
               "Cache-Control": "no-store", "Connection": "close", **(headers or {})}
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"] + [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if isinstance(body, Path):
        with body.open("rb") as f:
            while piece := f.read(FILE_PIECE_BYTES):
                writer.write(piece)
                await writer.drain()
    else:
        writer.write(body)
    await writer.drain()


class WebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_size: int):
        self._reader, self._writer = reader, writer
        self._proto = ServerProtocol(max_size=max_size)
        self._messages: deque[bytes] = deque()
        self._parts: list[bytes] = []

    @property
    def open(self) -> bool:
        return self._proto.state is State.OPEN

    async def accept(self, head: bytes) -> bool:
        """Complete the handshake of an upgrade request whose head was already read; False if it was refused."""
        self._proto.receive_data(head)
        requests = self._proto.events_received()
        if requests:  # empty if websockets could not parse the head; it then queued the end of the connection
            self._proto.send_response(self._proto.accept(requests[0]))
        await self._flush()
        return self.open

    async def recv(self) -> bytes | None:
        """The next message (text or binary, as bytes); None once the connection is closed."""
        while not self._messages:
            if self._proto.state is State.CLOSED:
                return None
            try:
                data = await self._reader.read(65536)
            except ConnectionError:
                data = b""
            if data:
                self._proto.receive_data(data)
            else:
                self._proto.receive_eof()
            self._collect()
            try:
                await self._flush()  # pongs and close replies the protocol queued
            except ConnectionError:
                return None
            if not data and not self._messages:
                return None
        return self._messages.popleft()

    def _collect(self) -> None:
        for frame in self._proto.events_received():
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                self._parts = [frame.data]
            elif frame.opcode is Opcode.CONT:
                self._parts.append(frame.data)
            else:  # control frames: the protocol answers pings and closes itself
                continue
            if frame.fin:
                self._messages.append(b"".join(self._parts))
                self._parts = []

    def _write(self) -> None:
        if self._writer.transport.is_closing():  # the peer is gone: nothing more can be sent
            self._proto.data_to_send()
            return
        for data in self._proto.data_to_send():
            if data:
                self._writer.write(data)
            elif self._writer.can_write_eof():  # b"" means: half-close the connection
                self._writer.write_eof()

    async def _flush(self) -> None:
        self._write()
        await self._writer.drain()

    def send_text(self, text: str) -> None:
        """Queue a text message (control messages are small: no back-pressure needed)."""
        if self.open:
            self._proto.send_text(text.encode())
            self._write()

    async def send_binary(self, data: bytes) -> None:
        """Send a binary message, waiting while the socket's buffer is full (back-pressure for video)."""
        if not self.open:
            raise ConnectionResetError("the WebSocket is closed")
        self._proto.send_binary(data)
        await self._flush()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.open:
            self._proto.send_close(code, reason)
            try:
                await asyncio.wait_for(self._flush(), 1.0)
            except (ConnectionError, TimeoutError):
                pass
        self._writer.close()
