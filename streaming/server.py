"""The LongSANA streaming server: `longsana serve`.

One asyncio event loop (uvloop) does all the I/O: HTTP, WebSockets and WebRTC. Each stream's generator and
encoders run on their own threads (streaming/session.py), so the loop never computes. Routes:

    GET  /  /app.js  /style.css   the page (web/)
    POST /offer                   {sdp, type: "offer", prompt, seed?, replace?} -> {sdp, type: "answer", session}
    GET  /ws                      the WebSocket fallback: JSON control messages, binary JPEG frames
    GET  /recording/<id>.mp4      what a live stream has sent so far, as MP4
    GET  /metrics  /health        Prometheus text; JSON

A stream lives until its client leaves (WebRTC connection closed or failed, WebSocket closed, or no control
message for `client_timeout` seconds: the page sends one every second), its generator ends, or the server stops.
Its slot is given back only once its generator has been closed, so `max_streams` bounds GPU memory.

Settings are a ServerConfig; `longsana serve --config NAME` starts from a preset, configs/server/NAME.toml (local:
the defaults; lan: the page for the local network), and the options given on the command line override it.

Any web page can make its visitor's browser POST to, or open a WebSocket on, 127.0.0.1, so requests that come from
a page of another site are refused (`check_origin`) unless `--allow-origin` names it.

The other parts of longsana.streaming: webrtc.py (WebRTC), httpd.py (HTTP and the WebSocket fallback), session.py
(one per viewer: a generator thread, an encoder thread, a pacer), media.py (each frame encoded once), protocol.py
(the control messages), metrics.py (/metrics), client.py (a Python client), synthetic.py (a test source with the
generator's interface).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.resources as resources
import ipaddress
import json
import logging
import re
import secrets
import signal
import sys
import tempfile
import threading
import webbrowser
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import click

from longsana.config import CONFIG_FILES, DEFAULT_MODEL, read_toml
from longsana.streaming.httpd import MAX_HEAD_BYTES, HTTPError, Request, WebSocket, read_request, send_response
from longsana.streaming.media import Recording
from longsana.streaming.metrics import Metrics
from longsana.streaming.protocol import (FRAME_HEADER, MAX_MESSAGE_BYTES, MAX_PROMPT_CHARS, ProtocolError,
                                         check_prompt, error, field as message_field, parse_message, rewind_seconds)
from longsana.streaming.session import Session, StreamEnded
from longsana.streaming.synthetic import SyntheticPipeline
from longsana.streaming.webrtc import RtcPeer, SessionTrack, use_loopback_candidates

WEB = resources.files("longsana.web")  # the page: package data in a wheel, web/ in a checkout
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
INBOX_SIZE = 32  # control messages of one client waiting for an answer
WS_MAX_MESSAGE = 1 << 20  # a WebSocket message over this closes the connection (1009); over 16 KB gets an error
M_ARENA_MAX = -8  # glibc's mallopt() parameter number
log = logging.getLogger(__name__)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    max_streams: int = 2
    client_timeout: float = 15.0  # seconds without a control message before a stream is dropped
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for the server side; none needed on a reachable address
    ice_loopback: bool = False  # 127.0.0.1 as the only ICE candidate (loopback-only machines, tests)
    stream_kwargs: dict = field(default_factory=dict)  # height / width / motion_score for pipe.stream
    record_max_bytes: int = 512 << 20  # per stream; the MP4 download keeps the first part beyond this
    model_name: str = "unnamed"  # shown by /health and the page
    allowed_origins: tuple[str, ...] = ()  # web origins of other sites whose pages may use the server ("*": any)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (which has mallopt and malloc_trim), else None."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    return libc if hasattr(libc, "malloc_trim") else None


LIBC = _glibc()


def release_memory() -> None:
    """After a stream: collect the reference cycles it leaves (peer connection, callbacks), which can hold native
    and GPU memory, then have glibc return the freed heap to the system rather than keep it."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas. glibc gives threads that contend for malloc arenas of their own and keeps freed
    memory in them, so with each stream's threads passing multi-megabyte frames the server's RSS climbs over its
    first 10-20 streams before it levels off (+17 MB here); with two arenas it stays flat (measured with
    tests/test_server_soak.py)."""
    if LIBC is not None:
        LIBC.mallopt(M_ARENA_MAX, arenas)


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:  # e.g. a bad IPv6 literal
        return None


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_origin(request: Request, config: ServerConfig) -> None:
    """Raise HTTPError 403 for a request that a page of another site made the browser send. Browsers name the
    page's site in Origin (always on a WebSocket handshake or a POST); it must be this server, i.e. the Host the
    browser asked for, or an allowed origin. Served on a loopback address, the Host must also be a loopback name:
    after DNS rebinding (the attacker's name re-pointed at 127.0.0.1) Origin and Host both name the attacker."""
    allowed = config.allowed_origins
    if "*" in allowed:
        return
    host = request.headers.get("host")  # browsers always send it; a client without one is no browser
    if host is not None and _is_loopback(config.host) and _hostname(host) not in LOOPBACK_NAMES and host not in {
            urlsplit(o).netloc for o in allowed}:
        raise HTTPError(403, f"this server answers to localhost / 127.0.0.1, not to Host {host[:100]!r} (start it "
                             f"with --allow-origin to serve under another name)")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host and origin not in allowed:
        raise HTTPError(403, f"requests from pages of {origin[:100]!r} are refused: this server's pages are at "
                             f"{(host or '')[:100]!r} (start it with --allow-origin ORIGIN to allow another site)")


class WsPeer:
    """One browser over the WebSocket fallback."""

    transport = "websocket"

    def __init__(self, ws: WebSocket):
        self.ws = ws

    def send(self, message: dict) -> None:
        self.ws.send_text(json.dumps(message))

    async def close(self) -> None:
        await self.ws.close()


class Server:
    def __init__(self, pipe, config: ServerConfig):
        self.pipe, self.config = pipe, config
        self.metrics = Metrics()
        self.sessions: dict[str, Session] = {}
        self._supervisors: dict[str, asyncio.Task] = {}
        self.url = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen; returns the page's URL."""
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        if self.config.ice_loopback:
            use_loopback_candidates()
        self._tmp = tempfile.TemporaryDirectory(prefix="longsana-streams-")
        # two threads per stream (producer, encoder), reused: fresh threads would each warm up a new malloc arena
        self._threads = ThreadPoolExecutor(2 * self.config.max_streams, thread_name_prefix="longsana-stream")
        # prompt changes: the generator may run its text encoder in set_prompt, which must not block the loop
        self._control_thread = ThreadPoolExecutor(1, thread_name_prefix="longsana-control")
        self._server = await asyncio.start_server(self._on_connection, self.config.host, self.config.port,
                                                  limit=MAX_HEAD_BYTES)
        port = self._server.sockets[0].getsockname()[1]
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        self.url = f"http://{host}:{port}/"
        return self.url

    async def stop(self) -> None:
        self._server.close()
        for session in list(self.sessions.values()):
            session.close("the server is stopping")
        await asyncio.gather(*self._supervisors.values(), return_exceptions=True)
        self._threads.shutdown()
        self._control_thread.shutdown()
        self._tmp.cleanup()

    # -- streams ------------------------------------------------------------------------------------------------
    def _open(self, prompt: str, seed: int, jpeg: bool) -> Session | None:
        """A started session, or None when all `max_streams` slots are taken."""
        if len(self.sessions) >= self.config.max_streams:
            self.metrics.inc("longsana_streams_rejected_total", reason="busy")
            return None
        sid = secrets.token_urlsafe(9)
        recording = Recording(Path(self._tmp.name) / f"{sid}.h264", self.config.record_max_bytes)
        session = Session(sid, self.pipe, prompt, seed=seed, stream_kwargs=self.config.stream_kwargs, jpeg=jpeg,
                          recording=recording, metrics=self.metrics, loop=self.loop)
        self.sessions[sid] = session
        self.metrics.inc("longsana_streams_started_total")
        session.start(self._threads)
        return session

    def _busy(self, seq: int | None = None) -> dict:
        n = self.config.max_streams
        taken = f"all {n} streams are in use" if n > 1 else "the only stream is in use"
        return error("busy", f"busy: {taken}; try again when one ends", seq)

    def _supervise(self, session: Session, peer) -> Callable[[str | bytes], None]:
        """Watch the session (see _watch) and answer its client's control messages, in order, on a task of its
        own. Returns the function that takes the client's messages."""
        inbox: asyncio.Queue[str | bytes] = asyncio.Queue(INBOX_SIZE)
        answering = asyncio.create_task(self._answer(session, peer, inbox))
        self._supervisors[session.sid] = asyncio.create_task(self._watch(session, peer, answering))

        def deliver(raw: str | bytes) -> None:
            session.last_message = self.loop.time()
            try:
                inbox.put_nowait(raw)
            except asyncio.QueueFull:
                self.metrics.inc("longsana_message_errors_total", code="too_many")
                peer.send(error("too_many", f"over {INBOX_SIZE} messages waiting for an answer; slow down"))

        return deliver

    async def _watch(self, session: Session, peer, answering: asyncio.Task) -> None:
        """Until the session ends: drop it when its client goes quiet. Then free the stream, then its slot."""
        timeout = self.config.client_timeout
        try:
            while not session.closing:
                idle = self.loop.time() - session.last_message
                if idle >= timeout:
                    session.close(f"no message from the client for {timeout:g} s")
                    break
                try:
                    await asyncio.wait_for(session.closed.wait(), timeout - idle)
                except TimeoutError:
                    pass
        finally:
            session.close("the server is stopping")  # no-op unless cancelled
            answering.cancel()
            peer.send({"type": "end", "reason": session.end_reason})
            try:
                await peer.close()
            finally:
                await session.wait_freed()
                release_memory()
                del self.sessions[session.sid]
                del self._supervisors[session.sid]

    async def _replace(self, sid: str | None) -> None:
        """End the stream `sid` (a client switching transports) and wait until its slot is free."""
        task = self._supervisors.get(sid) if sid else None
        if task is not None:
            self.sessions[sid].close("replaced by a new connection of its client")
            await asyncio.shield(task)

    def _start_fields(self, msg: dict) -> tuple[str, int, str | None]:
        seq = msg.get("seq")
        try:
            prompt = check_prompt(message_field(msg, "prompt", str))
        except ValueError as e:
            raise ProtocolError("bad_prompt", str(e), seq) from None
        seed = message_field(msg, "seed", int, default=None)
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif not 0 <= seed < 2**32:
            raise ProtocolError("bad_message", f"seed must be in [0, 2**32), got {seed}", seq)
        return prompt, seed, message_field(msg, "replace", str, default=None)

    def _hello(self, session: Session, transport: str, seq: int | None = None, **extra) -> dict:
        return {"type": "hello", "seq": seq, "session": session.sid, "transport": transport,
                "model": self.config.model_name, "fps": self.pipe.spec.fps, "max_message_bytes": MAX_MESSAGE_BYTES,
                "max_prompt_chars": MAX_PROMPT_CHARS, **extra}

    def _sent(self, transport: str, size: int | None) -> None:
        self.metrics.inc("longsana_frames_sent_total", transport=transport)
        if size is not None:
            self.metrics.inc("longsana_sent_bytes_total", size, transport=transport)

    # -- control messages ---------------------------------------------------------------------------------------
    async def _answer(self, session: Session, peer, inbox: asyncio.Queue) -> None:
        while True:
            raw = await inbox.get()
            try:
                msg = parse_message(raw)
                self.metrics.inc("longsana_messages_total", type=msg["type"])
                reply = await self._control(session, msg)
            except ProtocolError as e:
                self.metrics.inc("longsana_message_errors_total", code=e.code)
                reply = e.reply()
            peer.send(reply)

    async def _control(self, session: Session, msg: dict) -> dict:
        kind, seq = msg["type"], msg.get("seq")
        ack = {"type": "ack", "seq": seq, "of": kind}
        try:
            if kind == "prompt":
                await session.set_prompt(check_prompt(message_field(msg, "prompt", str)), self._control_thread)
            elif kind == "pause":
                session.pause()
            elif kind == "resume":
                session.resume()
            elif kind == "rewind":
                ack["rewound"] = round(session.rewind(rewind_seconds(msg)), 3)
            elif kind == "stats":
                return dict(session.stats(), seq=seq)
            elif kind == "start":
                raise ProtocolError("bad_message", "this stream has already started", seq)
        except ValueError as e:  # refused by check_prompt or by the generator
            raise ProtocolError("bad_prompt" if kind == "prompt" else "refused", str(e), seq) from None
        return ack

    # -- HTTP ---------------------------------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = None
        try:
            try:
                request = await read_request(reader)
                if request is None:
                    return
                check_origin(request, self.config)
                if request.path == "/ws" and request.is_websocket:
                    self.metrics.inc("longsana_http_requests_total", status="101")
                    await self._websocket(request, reader, writer)
                    return
                status, body, content_type = await self._route(request)
            except HTTPError as e:
                status, body, content_type = e.status, error("http", e.message), None
            self.metrics.inc("longsana_http_requests_total", status=str(status))
            await send_response(writer, status, body, content_type)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug: log it, close this connection, keep serving
            log.exception("error handling a connection")
        finally:
            if isinstance(body, Path):  # a temporary file (the MP4 download)
                body.unlink(missing_ok=True)
            writer.close()

    async def _route(self, request: Request) -> tuple[int, bytes | dict | Path, str | None]:
        path, method = request.path, request.method
        allowed = "POST" if path == "/offer" else "GET"
        if method != allowed and (path in STATIC or path in ("/offer", "/ws", "/health", "/metrics")):
            raise HTTPError(405, f"{path} takes {allowed}, not {method}")
        if path in STATIC:
            name, content_type = STATIC[path]
            return 200, (WEB / name).read_bytes(), content_type
        if path == "/offer":
            return await self._offer(request)
        if path == "/ws":
            raise HTTPError(426, "/ws is the WebSocket endpoint: send an Upgrade request")
        if path == "/health":
            return 200, {"status": "ok", "model": self.config.model_name, "streams": len(self.sessions),
                         "max_streams": self.config.max_streams,
                         "uptime_s": round(self.loop.time() - self.started, 1)}, None
        if path == "/metrics":
            gauges = {"longsana_streams_active": len(self.sessions),
                      "longsana_streams_limit": self.config.max_streams}
            return 200, self.metrics.render(gauges).encode(), "text/plain; version=0.0.4; charset=utf-8"
        if m := re.fullmatch(r"/recording/([\w-]+)\.mp4", path):
            return 200, await self._recording(m.group(1)), "video/mp4"
        raise HTTPError(404, f"no such page: {path[:200]}")

    async def _recording(self, sid: str) -> Path:
        session = self.sessions.get(sid)
        if session is None:
            raise HTTPError(404, f"no live stream {sid!r}: a recording lasts as long as its stream")
        mp4 = Path(self._tmp.name) / f"{sid}-{secrets.token_hex(4)}.mp4"
        try:
            await asyncio.to_thread(session.recording.to_mp4, mp4, session.fps)
        except ValueError as e:
            mp4.unlink(missing_ok=True)
            raise HTTPError(409, str(e)) from None
        return mp4

    # -- WebRTC -------------------------------------------------------------------------------------------------
    async def _offer(self, request: Request) -> tuple[int, dict, None]:
        msg = request.json()
        try:
            sdp = message_field(msg, "sdp", str)
            if msg.get("type") != "offer":
                raise ProtocolError("bad_message", f'type must be "offer", got {msg.get("type")!r}')
            prompt, seed, replace = self._start_fields(msg)
        except ProtocolError as e:
            self.metrics.inc("longsana_message_errors_total", code=e.code)
            return 400, e.reply(), None
        await self._replace(replace)
        session = self._open(prompt, seed, jpeg=False)
        if session is None:
            return 503, self._busy(), None
        peer = RtcPeer(list(self.config.ice_servers))
        session.emit = peer.send  # held back until the data channel opens
        pc = peer.pc
        track = SessionTrack(session, lambda size: self._sent("webrtc", size))

        @pc.on("datachannel")
        def on_datachannel(channel):
            peer.attach(channel)
            channel.on("message", deliver)

        @pc.on("connectionstatechange")
        def on_connectionstatechange():
            if pc.connectionState in ("failed", "closed"):
                session.close(f"the WebRTC connection {pc.connectionState}")

        deliver = self._supervise(session, peer)
        try:
            answer = await peer.answer(sdp, track)
        except Exception as e:  # aiortc raises assorted errors on an unusable SDP
            session.close("bad offer")
            self.metrics.inc("longsana_message_errors_total", code="bad_offer")
            return 400, error("bad_offer", f"could not answer the offer: {type(e).__name__}: {e}"), None
        peer.send(self._hello(session, "webrtc", codec="H264" if track.passthrough else "VP8"))
        return 200, {"type": "answer", "sdp": answer, "session": session.sid}, None

    # -- WebSocket ----------------------------------------------------------------------------------------------
    async def _websocket(self, request: Request, reader, writer) -> None:
        ws = WebSocket(reader, writer, WS_MAX_MESSAGE)
        if not await ws.accept(request.head):
            return
        peer = WsPeer(ws)
        start = await self._ws_start(ws, peer)
        if start is None:
            await ws.close(1008)
            return
        seq, (prompt, seed, replace) = start
        await self._replace(replace)
        session = self._open(prompt, seed, jpeg=True)
        if session is None:
            peer.send(self._busy(seq))
            await ws.close(1013, "busy")
            return
        session.emit = peer.send
        peer.send(self._hello(session, "websocket", seq, codec="JPEG", frame_header=FRAME_HEADER.format))
        deliver = self._supervise(session, peer)
        supervisor = self._supervisors[session.sid]
        pump = asyncio.create_task(self._pump(session, ws))
        try:
            while (raw := await ws.recv()) is not None:
                deliver(raw)
        finally:
            pump.cancel()
            session.close("the WebSocket closed")
            await asyncio.shield(supervisor)

    async def _ws_start(self, ws: WebSocket, peer: WsPeer) -> tuple[int | None, tuple] | None:
        """The seq and fields of the client's first message, which must be `start`; None (after an error reply,
        if the client is still there) otherwise."""
        try:
            raw = await asyncio.wait_for(ws.recv(), self.config.client_timeout)
            if raw is None:
                return None
            msg = parse_message(raw)
            if msg["type"] != "start":
                raise ProtocolError("bad_message", f"the first message must be start, not {msg['type']}",
                                    msg.get("seq"))
            return msg.get("seq"), self._start_fields(msg)
        except TimeoutError:
            refusal = ProtocolError("timeout", f"no start message within {self.config.client_timeout:g} s")
        except ProtocolError as e:
            refusal = e
        self.metrics.inc("longsana_message_errors_total", code=refusal.code)
        peer.send(refusal.reply())
        return None

    async def _pump(self, session: Session, ws: WebSocket) -> None:
        """Send the session's frames as they come due: FRAME_HEADER + JPEG."""
        try:
            while True:
                frame = await session.next_frame()
                header = FRAME_HEADER.pack(frame.prompt_seq, frame.chunk, frame.index, frame.pts)
                await ws.send_binary(header + frame.jpeg)
                self._sent("websocket", len(frame.jpeg))
        except StreamEnded:
            pass
        except ConnectionError:
            session.close("the WebSocket connection was lost")


# -- running it ---------------------------------------------------------------------------------------------------
def make_pipeline(model: str, device: str | None = None, dtype: str | None = None, spec: str | None = None):
    """The video source for `model`: "synthetic" (streaming/synthetic.py), or a built-in model name or a model
    folder (with `spec`, its named config) for `longsana.stream.Pipeline`. The one place a model is chosen.
    FileNotFoundError, ValueError or KeyError for a model that cannot be loaded."""
    if model == "synthetic":
        return SyntheticPipeline()
    import torch

    from longsana.stream import Pipeline

    return Pipeline.from_pretrained(model, device, dtype and getattr(torch, DTYPES[dtype]), spec=spec)


class ServerThread:
    """The server on its own event loop in a background thread (for embedding it, and for tests):
    `with ServerThread(pipe, config) as server: server.url`."""

    def __init__(self, pipe, config: ServerConfig):
        self.server = Server(pipe, config)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longsana-server", daemon=True)

    def _run(self) -> None:
        _run_loop(self._serve())

    async def _serve(self) -> None:
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server did not start within 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def _run_loop(main) -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve_forever(pipe, config: ServerConfig, open_browser: bool) -> None:
    server = Server(pipe, config)
    url = await server.start()
    print(f"LongSANA ({config.model_name}) streaming at {url}  (Ctrl+C stops)", flush=True)
    if open_browser:
        webbrowser.open(url)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


# -- the command: option defaults are ServerConfig's; a preset (--config) replaces them, the command line wins ------
PRESETS = CONFIG_FILES / "server"


def read_preset(name_or_path: str) -> dict:
    """A server preset: configs/server/<name>.toml, or a .toml file by path. Its keys are `longsana serve`'s option
    names (with _ for -). FileNotFoundError if there is no such preset, ValueError if it is not valid TOML."""
    path = Path(name_or_path) if name_or_path.endswith(".toml") else PRESETS / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(f.name.removesuffix(".toml") for f in PRESETS.iterdir() if f.name.endswith(".toml"))
        raise FileNotFoundError(f"no server preset {name_or_path!r}: the presets are {', '.join(known)} "
                                "(configs/server/), or give a path to a .toml file")
    return read_toml(path)


def _use_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--config: the preset's values become the defaults of the other options (click's default_map), so an option
    given on the command line overrides them."""
    if value is None:
        return
    try:
        preset = read_preset(value)
    except (FileNotFoundError, ValueError) as e:
        raise click.BadParameter(str(e)) from None
    names = {p.name for p in ctx.command.params if p.expose_value}
    if unknown := sorted(set(preset) - names):
        raise click.BadParameter(f"{value}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    ctx.default_map = {**(ctx.default_map or {}), **preset}


@click.command("serve")
@click.option("--config", callback=_use_preset, is_eager=True, expose_value=False,
              help="Server preset: a name from configs/server/ (local, lan, ...) or a .toml file of option values; "
                   "options on the command line override it.")
@click.option("--host", default=ServerConfig.host, show_default=True, help="Address to listen on.")
@click.option("--port", default=ServerConfig.port, show_default=True, type=click.IntRange(0, 65535),
              help="0: any free port.")
@click.option("--model", default=None, help=f'Model name or folder; "synthetic" for the test source. '
              f'Default: the built-in "{DEFAULT_MODEL}" model.')
@click.option("--spec", default=None, help="Named config of a model folder (e.g. longsana-2b-480p).")
@click.option("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None, help="Default: bf16 on GPU, fp32 on CPU.")
@click.option("--max-streams", default=ServerConfig.max_streams, show_default=True, type=click.IntRange(1),
              help="Concurrent viewers.")
@click.option("--height", type=click.IntRange(16), default=None, help="Video height (default: the model's).")
@click.option("--width", type=click.IntRange(16), default=None, help="Video width (default: the model's).")
@click.option("--stun", multiple=True, default=ServerConfig.ice_servers,
              help="STUN/TURN URL for the server's ICE (repeatable).")
@click.option("--ice-loopback", is_flag=True, default=ServerConfig.ice_loopback,
              help="Only 127.0.0.1 as ICE candidate (loopback-only machines).")
@click.option("--client-timeout", default=ServerConfig.client_timeout, show_default=True, type=click.FloatRange(1),
              help="Seconds without a control message before a stream is dropped.")
@click.option("--allow-origin", multiple=True, default=ServerConfig.allowed_origins,
              help="Web origin of another site whose pages may use this server, e.g. https://example.com "
                   "(repeatable; \"*\": any).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
def serve_cmd(host, port, model, spec, device, dtype, max_streams, height, width, stun, ice_loopback, client_timeout,
              allow_origin, open_browser):
    """Stream videos to browsers: open the printed URL, type a prompt, press Enter."""
    limit_malloc_arenas()
    model = model or DEFAULT_MODEL
    try:
        pipe = make_pipeline(model, device, dtype, spec)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    stream_kwargs = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    config = ServerConfig(host=host, port=port, max_streams=max_streams, client_timeout=client_timeout,
                          ice_servers=tuple(stun), ice_loopback=ice_loopback, stream_kwargs=stream_kwargs,
                          model_name=model, allowed_origins=tuple(allow_origin))
    _run_loop(_serve_forever(pipe, config, open_browser))
