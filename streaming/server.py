"""The LongSANA streaming server: `longsana serve`.

One asyncio event loop (uvloop) does all the I/O: HTTP and WebSockets through aiohttp, WebRTC through aiortc. Each
stream's generator and encoders run on their own threads (streaming/session.py), so the loop never computes. Routes
(each GET route answers HEAD too):

    GET  /  /app.js  /style.css   the page (web/)
    POST /offer                   {sdp, type: "offer", prompt, seed?, replace?}
                                  -> {sdp, type: "answer", session, token}
    GET  /ws                      the WebSocket fallback: JSON control messages, binary JPEG frames
    GET  /recording/<id>.mp4      what a stream has sent so far, as MP4: while it lives, and for
                                  `recording_keep_seconds` after it ends
    GET  /model                   what the page offers before a stream starts (also in each hello): the model's
                                  name, video size, default and example prompts, vocabulary (guide.py)
    GET  /metrics  /health        Prometheus text; JSON

A stream lives until its client leaves (WebRTC connection closed or failed, WebSocket closed, or no control
message for `client_timeout` seconds: the page sends one every second) or stops it, its generator ends, or the
server stops.
Its slot is taken only once its request is valid, and given back only once its generator has been closed, so
`max_streams` bounds GPU memory. `replace` ends the stream whose secret token (in its hello) it gives.

The server holds up against hostile clients: every client message goes through protocol.parse_message, which
raises nothing but ProtocolError, and a handler that fails anyway answers `error` while the stream goes on; a
request's head and body must arrive within `request_timeout`, at most `max_connections` connections are open at
once (more are answered 503 and closed), at most `max_downloads` recordings are downloaded at once, and an
unexpected error answers 500 with its traceback logged once.

Settings are a ServerConfig, which checks them; `longsana serve --config NAME` starts from a preset,
configs/server/NAME.toml (local: the defaults; lan: the page for the local network), and the options given on the
command line override it.

Any web page can make its visitor's browser POST to, or open a WebSocket on, the server, so requests that come
from a page of another site are refused (`check_origin`) unless `--allow-origin` names it, and so are requests
for a name that is not this machine's (DNS rebinding) unless `--allow-host` names it.

The other parts of longsana.streaming: webrtc.py (WebRTC), session.py (one per viewer: a generator thread, an
encoder thread, a pacer), media.py (each frame encoded once; the recording), protocol.py (the control messages),
metrics.py (/metrics), client.py (a Python client), synthetic.py (a test source with the generator's interface),
gpus.py (several GPUs: a worker process per GPU, `--gpus 0,1`; the server then places each stream on one).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.resources as resources
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import click
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from longsana.config import CONFIG_FILES, DEFAULT_MODEL, read_toml
from longsana.streaming.gpus import GpuPool, GpuWorker, WorkerStartError, check_gpus, devices, parse_gpus
from longsana.streaming.guide import prompt_guide
from longsana.streaming.media import MIN_SIDE, Recording
from longsana.streaming.metrics import CONTENT_TYPE, Metrics
from longsana.streaming.protocol import (FRAME_HEADER, MAX_MESSAGE_BYTES, MAX_OFFER_BYTES, MAX_PROMPT_CHARS,
                                         ProtocolError, error, parse_message, parse_offer)
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
SEND_DRAIN_SECONDS = 1.0  # how long a closing WebSocket waits for its last messages to leave
DOWNLOAD_PIECE_BYTES = 256 * 1024
SHUTDOWN_SECONDS = 5.0  # how long stopping waits for open connections
REFUSAL_LINGER_SECONDS = 1.0
M_ARENA_MAX = -8  # glibc's mallopt() parameter number
log = logging.getLogger(__name__)
CHUNK_SETTINGS = ("chunk_frames", "switch_chunk_frames", "piece_frames")  # StreamSettings the server passes on
MAX_CHUNK_FRAMES = 32  # latent frames: 8 s of video at 16 fps, 3x the 2B model's chunk; more is a typo, not a plan
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}  # fp8: bf16, FP8 GEMMs


class ConfigError(ValueError):
    """A setting out of range; `name` is the ServerConfig field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    max_streams: int = 2
    client_timeout: float = 15.0  # seconds without a control message before a stream is dropped
    request_timeout: float = 10.0  # seconds a client may take to send a request's head, and then its body
    max_connections: int = 64  # open HTTP and WebSocket connections; more are answered 503 and closed
    max_downloads: int = 2  # recordings being downloaded at once
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs for the server side; none needed on a reachable address
    ice_loopback: bool = False  # 127.0.0.1 as the only ICE candidate (loopback-only machines, tests)
    stream_kwargs: dict = field(default_factory=dict)  # pipe.stream's height / width / motion_score, and the
    # StreamSettings of latency (CHUNK_SETTINGS)
    record_max_bytes: int = 512 << 20  # per stream; the MP4 download keeps the first part beyond this
    model_name: str = "unnamed"  # shown by /health and the page
    recording_keep_seconds: float = 300.0  # how long a recording stays downloadable after its stream ends (0: not)
    allowed_origins: tuple[str, ...] = ()  # web origins of other sites whose pages may use the server ("*": any)
    allowed_hosts: tuple[str, ...] = ()  # names besides localhost and IP addresses the server answers to ("*": any)

    def __post_init__(self):
        """ConfigError (a ValueError) for a value the server could not run with."""
        def need(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(name, f"{name} must be {what}, got {getattr(self, name, None)!r}")

        need("max_streams", _is_int(self.max_streams) and self.max_streams >= 1, "an integer >= 1")
        need("client_timeout", _is_seconds(self.client_timeout) and self.client_timeout >= 1,
             "a number of seconds >= 1")
        need("request_timeout", _is_seconds(self.request_timeout), "a finite number of seconds > 0")
        need("max_connections", _is_int(self.max_connections) and self.max_connections >= 1, "an integer >= 1")
        need("max_downloads", _is_int(self.max_downloads) and self.max_downloads >= 1, "an integer >= 1")
        keep = self.recording_keep_seconds
        need("recording_keep_seconds", _is_seconds(keep) or keep == 0 and not isinstance(keep, bool),
             "a finite number of seconds >= 0")
        for side in ("height", "width"):
            n = self.stream_kwargs.get(side)
            if n is not None and not (_is_int(n) and n >= MIN_SIDE and n % 2 == 0):
                raise ConfigError(side, f"{side} must be an even number of pixels >= {MIN_SIDE} (H.264 4:2:0), "
                                        f"got {n!r}")
        for name in CHUNK_SETTINGS:
            n = self.stream_kwargs.get(name)
            if n is not None and not (_is_int(n) and 1 <= n <= MAX_CHUNK_FRAMES):
                raise ConfigError(name, f"{name} must be a number of latent frames from 1 to {MAX_CHUNK_FRAMES}, "
                                        f"got {n!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


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


# -- who may use the server ------------------------------------------------------------------------------------------
def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:  # e.g. a bad IPv6 literal
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    return host == "localhost" or _is_ip(host) and ipaddress.ip_address(host).is_loopback


def _host_allowed(host: str, config: ServerConfig) -> bool:
    """DNS rebinding (an attacker's name re-pointed at this machine) needs a name: an IP address, localhost, or a
    name given with --allow-host (or an allowed origin's) is safe."""
    name = _hostname(host)
    allowed = {*config.allowed_hosts, *(_hostname(urlsplit(o).netloc) for o in config.allowed_origins if o != "*")}
    return "*" in config.allowed_hosts or name is not None and (name == "localhost" or _is_ip(name) or name in allowed)


def check_origin(request, config: ServerConfig) -> None:
    """Raise HTTPForbidden for a request that a page of another site made the browser send. Browsers name the
    page's site in Origin (always on a WebSocket handshake or a POST); it must be this server, i.e. the Host the
    browser asked for, or an allowed origin. The Host must be one of this machine's names (see _host_allowed):
    after DNS rebinding Origin and Host both name the attacker. The same policy holds on every address."""
    host = request.headers.get("Host")  # browsers always send it; a client without one is no browser
    if host is not None and not _host_allowed(host, config):
        raise web.HTTPForbidden(text=f"this server answers to localhost and its IP addresses, not to Host "
                                     f"{host[:100]!r} (start it with --allow-host NAME to serve under a name)")
    origin, allowed = request.headers.get("Origin"), config.allowed_origins
    if origin is not None and "*" not in allowed and origin not in allowed and _netloc(origin) != host:
        raise web.HTTPForbidden(text=f"requests from pages of {origin[:100]!r} are refused: this server's pages are "
                                     f"at {(host or '')[:100]!r} (start it with --allow-origin ORIGIN to allow "
                                     f"another site)")


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return None


# -- connections -------------------------------------------------------------------------------------------------------
class _ClientFaults(logging.Filter):
    """aiohttp logs each malformed request with a traceback; it is the client's fault, not the server's: dropped
    (the client gets its 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


HTTP_LOG = logging.getLogger(__name__ + ".http")
HTTP_LOG.addFilter(_ClientFaults())
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s")


class Refusal(asyncio.Protocol):
    """A connection over max_connections: a fixed 503, then the end of it. The request is read and dropped until
    the client closes (for at most REFUSAL_LINGER_SECONDS): closing with it unread would reset the connection and
    lose the 503."""

    def __init__(self, body: bytes):
        self.body = body

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.write(BUSY_RESPONSE % (len(self.body), self.body))
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


def read_piece(f, size: int) -> bytes:
    return f.read(size)


class WsPeer:
    """One browser over the WebSocket fallback. One task sends everything, in the order it was queued (a chunk
    event before its first frame); `send_frame` returns once the frame has left (back-pressure for video)."""

    transport = "websocket"

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self._outbox: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._sender = asyncio.create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            while True:
                item = await self._outbox.get()
                try:
                    await (self.ws.send_str(item) if isinstance(item, str) else self.ws.send_bytes(item))
                finally:
                    self._outbox.task_done()
        except ConnectionError:
            pass
        finally:  # the connection is gone: nothing queued will leave, nobody may wait for it
            while not self._outbox.empty():
                self._outbox.get_nowait()
                self._outbox.task_done()

    def send(self, message: dict) -> None:
        if not self._sender.done():
            self._outbox.put_nowait(json.dumps(message))

    async def send_frame(self, data: bytes) -> None:
        if not self._sender.done():
            self._outbox.put_nowait(data)
            await self._outbox.join()
        if self._sender.done():
            raise ConnectionResetError("the WebSocket is closed")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self._outbox.join(), SEND_DRAIN_SECONDS)
        except TimeoutError:
            pass
        self._sender.cancel()
        await self.ws.close(code=code, message=reason.encode())


class KeptRecordings:
    """The recordings of ended streams, each downloadable for `seconds` after its stream was freed, then deleted."""

    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop):
        self.seconds, self._loop = seconds, loop
        self._kept: dict[str, Recording] = {}  # session id -> its finished recording
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def free(self, session: Session) -> None:
        """session.wait_freed(), then keep its recording for `seconds` (delete it now if nothing was streamed)."""
        await session.wait_freed()
        if self.seconds > 0 and session.recording.frames:
            self._kept[session.sid] = session.recording
            self._timers[session.sid] = self._loop.call_later(self.seconds, self._delete, session.sid)
        else:
            session.recording.delete()

    def get(self, sid: str) -> Recording | None:
        return self._kept.get(sid)

    def _delete(self, sid: str) -> None:
        del self._timers[sid]
        self._kept.pop(sid).delete()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()


class Server:
    def __init__(self, pipe, config: ServerConfig):
        self.pipe, self.config = pipe, config
        self.metrics = Metrics({"longsana_streams_active": lambda: len(self.sessions),
                                "longsana_streams_limit": lambda: config.max_streams})
        self.sessions: dict[str, Session] = {}
        self.pool = pipe if isinstance(pipe, GpuPool) else None  # several GPUs: each stream goes on one worker
        for gpu in self.pool.supervisors if self.pool else ():  # a GPU's series follow its worker through restarts
            self.metrics.watch("longsana_gpu_streams", lambda g=gpu: self._streams_on(g.worker), gpu=gpu.name)
            self.metrics.watch("longsana_gpu_load", gpu.load, gpu=gpu.name)
            self.metrics.watch("longsana_gpu_up", lambda g=gpu: float(g.problem is None), gpu=gpu.name)
            self.metrics.inc("longsana_gpu_restarts_total", gpu.restarts, gpu=gpu.name)  # the series, from 0
            gpu.on_restart = lambda g: self.metrics.inc("longsana_gpu_restarts_total", gpu=g.name)
        self._tokens: dict[str, str] = {}  # session id -> the secret that replaces it
        self._supervisors: dict[str, asyncio.Task] = {}
        self._downloads = 0
        self.url = None
        self.guide = prompt_guide(config.model_name)  # what the page offers: see /model

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> str:
        """Listen; returns the page's URL. OSError, with the address in its message, if that is not possible."""
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        if self.config.ice_loopback:
            use_loopback_candidates()
        self._tmp = tempfile.TemporaryDirectory(prefix="longsana-streams-")
        self.kept = KeptRecordings(self.config.recording_keep_seconds, self.loop)
        # two threads per stream (producer, encoder), reused: fresh threads would each warm up a new malloc arena
        self._threads = ThreadPoolExecutor(2 * self.config.max_streams, thread_name_prefix="longsana-stream")
        # prompt changes: the generator may run its text encoder in set_prompt, which must not block the loop; a
        # stream answers its messages one at a time, so a thread per stream means no stream waits for another
        self._control_threads = ThreadPoolExecutor(self.config.max_streams, thread_name_prefix="longsana-control")
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[self._guard])
        for path in STATIC:
            app.router.add_get(path, self._static)
        app.router.add_post("/offer", self._offer)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/model", self._model)
        app.router.add_get(r"/recording/{sid:[\w-]+}.mp4", self._recording)
        app.on_response_prepare.append(_one_request)
        # keepalive_timeout runs from the moment a connection opens, so it also bounds how long a request's head
        # may take (aiohttp has no timeout of its own for that); lingering_time bounds how long the unread rest of
        # a refused body is waited for before the connection closes
        timeout = self.config.request_timeout
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, logger=HTTP_LOG,
                                     keepalive_timeout=timeout, lingering_time=timeout,
                                     shutdown_timeout=SHUTDOWN_SECONDS)
        await self._runner.setup()
        host, port = self.config.host, self.config.port
        try:
            self._listener = await self.loop.create_server(self._accept, host, port, reuse_address=True)
        except OSError as e:
            await self._runner.cleanup()
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {reason}") from None
        port = self._listener.sockets[0].getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
        return self.url

    def _accept(self) -> asyncio.Protocol:
        """The protocol of a new connection: aiohttp's, or a Refusal over max_connections."""
        if len(self._runner.server.connections) >= self.config.max_connections:
            self.metrics.inc("longsana_http_requests_total", status="503")
            n = self.config.max_connections
            return Refusal(json.dumps(error("busy", f"busy: {n} connections are open; try again later")).encode())
        return self._runner.server()

    async def stop(self) -> None:
        self._listener.close()
        for session in list(self.sessions.values()):
            session.close("the server is stopping")
        await asyncio.gather(*self._supervisors.values(), return_exceptions=True)
        await self._runner.cleanup()
        self.kept.close()
        self._threads.shutdown()
        self._control_threads.shutdown()
        self._tmp.cleanup()

    # -- streams ------------------------------------------------------------------------------------------------
    def _open(self, start: dict, jpeg: bool) -> Session | str:
        """A started session for a valid `start` (or offer) message, or why none can start now."""
        pipe, refusal = self._place()
        if pipe is None:
            self.metrics.inc("longsana_streams_rejected_total", reason="busy")
            return refusal
        sid = secrets.token_urlsafe(9)
        seed = start.get("seed")
        recording = Recording(Path(self._tmp.name) / f"{sid}.mp4", self.config.record_max_bytes)
        session = Session(sid, pipe, start["prompt"], seed=secrets.randbelow(2**31) if seed is None else seed,
                          stream_kwargs=self.config.stream_kwargs, jpeg=jpeg, recording=recording,
                          metrics=self.metrics, loop=self.loop)
        self.sessions[sid], self._tokens[sid] = session, secrets.token_urlsafe(18)
        self.metrics.inc("longsana_streams_started_total")
        session.start(self._threads)
        return session

    def _place(self) -> tuple[object, str | None]:
        """The pipeline a new stream runs on, or (None, why none can start now): every slot taken, or, on a GPU,
        the streams already running need so much of it that one more would not be real time (the device worker's
        measured load). With several GPUs, the least loaded worker that admits it (GpuPool.place)."""
        n = self.config.max_streams
        if len(self.sessions) >= n:
            return None, f"all {n} streams are in use" if n > 1 else "the only stream is in use"
        if self.pool is not None:
            worker, why = self.pool.place(self._streams_on)
            return worker, None if worker else why
        worker = getattr(self.pipe, "worker", None)
        if worker is not None and self.pipe.device.type == "cuda":
            admitted, why = worker.admits()
            if not admitted:
                return None, f"another stream would not be real time on this GPU ({why})"
        return self.pipe, None

    def _streams_on(self, worker: GpuWorker) -> int:
        """Streams placed on a GPU worker and not yet freed (their slots)."""
        return sum(session.pipe is worker for session in list(self.sessions.values()))

    def _busy(self, refusal: str, seq: int | None = None) -> dict:
        return error("busy", f"busy: {refusal}; try again when one ends", seq)

    def _supervise(self, session: Session, peer) -> Callable[[str | bytes], None]:
        """Watch the session (see _watch) and answer its client's control messages, in order, on a task of its
        own. Returns the function that takes the client's messages: each is checked at once, so that a refusal
        for a full inbox can name its seq."""
        inbox: asyncio.Queue[dict | ProtocolError] = asyncio.Queue(INBOX_SIZE)
        answering = asyncio.create_task(self._answer(session, peer, inbox))
        self._supervisors[session.sid] = asyncio.create_task(self._watch(session, peer, answering))

        def deliver(raw: str | bytes) -> None:
            session.last_message = self.loop.time()
            try:
                msg = parse_message(raw)
            except ProtocolError as e:
                msg = e
            try:
                inbox.put_nowait(msg)
            except asyncio.QueueFull:
                seq = msg.seq if isinstance(msg, ProtocolError) else msg["seq"]
                peer.send(self._refuse(ProtocolError("too_many", f"over {INBOX_SIZE} messages waiting for an "
                                                                 "answer; slow down", seq)))

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
                await self.kept.free(session)
                release_memory()
                del self.sessions[session.sid], self._tokens[session.sid], self._supervisors[session.sid]

    async def _replace(self, token: str | None) -> None:
        """End the stream whose token this is (its client switching transports) and wait until its slot is free.
        Only its client has the token: a session id, which is no secret, ends nothing."""
        sid = next((sid for sid, t in self._tokens.items() if token and secrets.compare_digest(t, token)), None)
        if sid is not None:
            self.sessions[sid].close("replaced by a new connection of its client")
            await asyncio.shield(self._supervisors[sid])

    def _hello(self, session: Session, transport: str, seq: int | None = None, **extra) -> dict:
        return {"type": "hello", "seq": seq, "session": session.sid, "token": self._tokens[session.sid],
                "transport": transport, "model": self.config.model_name, "fps": self.pipe.spec.fps,
                "max_message_bytes": MAX_MESSAGE_BYTES, "max_prompt_chars": MAX_PROMPT_CHARS,
                "recording_keep_seconds": self.config.recording_keep_seconds, **self.guide, **extra}

    def _sent(self, transport: str, size: int | None) -> None:
        self.metrics.inc("longsana_frames_sent_total", transport=transport)
        if size is not None:
            self.metrics.inc("longsana_sent_bytes_total", size, transport=transport)

    # -- control messages ---------------------------------------------------------------------------------------
    def _refuse(self, e: ProtocolError) -> dict:
        self.metrics.inc("longsana_message_errors_total", code=e.code)
        return e.reply()

    async def _answer(self, session: Session, peer, inbox: asyncio.Queue) -> None:
        while True:
            msg = await inbox.get()
            if isinstance(msg, ProtocolError):
                peer.send(self._refuse(msg))
                continue
            self.metrics.inc("longsana_messages_total", type=msg["type"])
            try:
                reply = await self._control(session, msg)
            except ProtocolError as e:
                reply = self._refuse(e)
            except Exception as e:  # a handler's bug, or the generator's: this message fails, the stream goes on
                log.exception("answering a %s message", msg["type"])
                reply = self._refuse(ProtocolError("internal", f"{type(e).__name__}: {e}", msg["seq"]))
            peer.send(reply)

    async def _control(self, session: Session, msg: dict) -> dict:
        kind, seq = msg["type"], msg["seq"]
        ack = {"type": "ack", "seq": seq, "of": kind}
        try:
            if kind == "prompt":
                await session.set_prompt(msg["prompt"], self._control_threads, msg.get("transition"))
            elif kind == "pause":
                session.pause()
            elif kind == "resume":
                session.resume()
            elif kind == "rewind":
                ack["rewound"] = round(session.rewind(msg["seconds"]), 3)
            elif kind == "stats":
                return dict(session.stats(), seq=seq)
            elif kind == "stop":  # the ack goes out before the end event: the supervisor sends that once woken
                session.close("stopped by the client")
            elif kind == "start":
                raise ProtocolError("bad_message", "this stream has already started", seq)
        except ValueError as e:  # refused by the generator
            raise ProtocolError("bad_prompt" if kind == "prompt" else "refused", str(e), seq) from None
        return ack

    # -- HTTP ---------------------------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Around every route: the Origin/Host policy, errors as JSON `error` bodies, a 500 for a bug (logged once,
        with its traceback), and the status counted."""
        try:
            check_origin(request, self.config)
            response = await handler(request)
        except web.HTTPException as e:  # aiohttp's own (404, 405, 413) and check_origin's
            response = web.json_response(error("http", e.text or e.reason), status=e.status)
            if "Allow" in e.headers:
                response.headers["Allow"] = e.headers["Allow"]
        except ConnectionError:  # the client left
            raise
        except Exception:
            log.exception("error answering %s %s", request.method, request.path[:200])
            response = web.json_response(error("internal", "internal server error"), status=500)
        self.metrics.inc("longsana_http_requests_total", status=str(response.status))
        return response

    async def _static(self, request: web.Request) -> web.Response:
        name, content_type = STATIC[request.path]
        return web.Response(body=(WEB / name).read_bytes(), headers={"Content-Type": content_type})

    async def _health(self, request: web.Request) -> web.Response:
        """ok, or (503) failed with the reason when the device can no longer run work (worker.DeviceFailed). With
        several GPUs, each worker's state (ok, restarting or down) and restarts, and degraded (still 200: it
        serves) while some of them cannot take streams."""
        status, reason = self._condition()
        health = {"status": status, "model": self.config.model_name,
                  "streams": len(self.sessions), "max_streams": self.config.max_streams,
                  "uptime_s": round(self.loop.time() - self.started, 1)}
        if reason is not None:
            health["reason"] = reason
        if self.pool is not None:
            health["gpus"] = [{"gpu": g.name, "streams": self._streams_on(g.worker), "load": round(g.load(), 3),
                               "status": g.state, "restarts": g.restarts, "pid": g.worker.process.pid}
                              for g in self.pool.supervisors]
        return web.json_response(health, status=503 if status == "failed" else 200)

    def _condition(self) -> tuple[str, str | None]:
        """ok, degraded or failed, and why."""
        if self.pool is not None:
            return self.pool.health()
        failure = getattr(getattr(self.pipe, "worker", None), "failure", None)
        if failure is None:
            return "ok", None
        return "failed", f"the device failed: {type(failure).__name__}: {failure}"

    async def _model(self, request: web.Request) -> web.Response:
        size = {side: self.config.stream_kwargs.get(side, getattr(self.pipe.spec, side))
                for side in ("width", "height")}
        return web.json_response({"model": self.config.model_name, **size, **self.guide,
                                  "recording_keep_seconds": self.config.recording_keep_seconds})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _body(self, request: web.Request) -> bytes:
        """The request's body, announced by Content-Length (checked before any of it is read) and arriving within
        request_timeout."""
        if request.content_length is None:
            raise web.HTTPLengthRequired(text="send the body with a Content-Length")
        if request.content_length > MAX_OFFER_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_OFFER_BYTES, request.content_length,
                                                text=f"request body of {request.content_length} bytes; the limit "
                                                     f"is {MAX_OFFER_BYTES}")
        try:
            async with asyncio.timeout(self.config.request_timeout):
                return await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the body did not arrive within {self.config.request_timeout:g} s",
                                         headers={"Connection": "close"}) from None

    def _recording_file(self, sid: str) -> tuple[Path, int]:
        """A stream's recording: a live one's complete part, or an ended one's whole file."""
        session = self.sessions.get(sid)
        recording = self.kept.get(sid) or (session.recording if session is not None else None)
        if recording is None:
            keep = self.config.recording_keep_seconds
            raise web.HTTPNotFound(text=f"no recording of stream {sid!r}: a recording can be downloaded while its "
                                        f"stream is live and for {keep:g} s after it ends")
        if not recording.frames:
            raise web.HTTPConflict(text="nothing has been streamed yet")
        return recording.path, recording.size

    async def _recording(self, request: web.Request) -> web.StreamResponse:
        """A stream's recording (see _recording_file), read in pieces (at most max_downloads at once: each holds a
        worker thread and a file)."""
        path, size = self._recording_file(request.match_info["sid"])
        if self._downloads >= self.config.max_downloads:
            return web.json_response(error("busy", f"busy: {self._downloads} downloads are running; try again when "
                                                   "one ends"), status=503)
        self._downloads += 1
        try:
            # once open, the file is readable to its end even if it is deleted meanwhile
            with await asyncio.to_thread(open, path, "rb") as f:
                response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
                response.content_length = size
                await response.prepare(request)
                while request.method != "HEAD" and size > 0:
                    piece = await asyncio.to_thread(read_piece, f, min(DOWNLOAD_PIECE_BYTES, size))
                    if not piece:  # cannot happen: the file only grows
                        raise ConnectionResetError("the recording ended early")
                    await response.write(piece)
                    size -= len(piece)
                await response.write_eof()
            return response
        finally:
            self._downloads -= 1

    # -- WebRTC -------------------------------------------------------------------------------------------------
    async def _offer(self, request: web.Request) -> web.Response:
        try:
            offer = parse_offer(await self._body(request))
        except ProtocolError as e:
            return web.json_response(self._refuse(e), status=400)
        await self._replace(offer.get("replace"))
        peer = RtcPeer(list(self.config.ice_servers))
        track = SessionTrack(lambda size: self._sent("webrtc", size))
        try:  # the offer is answered before a slot is taken: a bad one costs no stream
            answer = await peer.answer(offer["sdp"], track)
        except Exception as e:  # aiortc raises assorted errors on an unusable SDP
            await peer.close()
            return web.json_response(self._refuse(ProtocolError(
                "bad_offer", f"could not answer the offer: {type(e).__name__}: {e}")), status=400)
        # no await from here on until the events are wired: the connection cannot open before the answer is sent
        session = self._open(offer, jpeg=False)
        if isinstance(session, str):
            await peer.close()
            return web.json_response(self._busy(session), status=503)
        track.session, session.emit = session, peer.send  # events are held back until the data channel opens
        pc = peer.pc
        deliver = self._supervise(session, peer)

        @pc.on("datachannel")
        def on_datachannel(channel):
            peer.attach(channel)
            channel.on("message", deliver)

        @pc.on("connectionstatechange")
        def on_connectionstatechange():
            if pc.connectionState in ("failed", "closed"):
                session.close(f"the WebRTC connection {pc.connectionState}")

        peer.send(self._hello(session, "webrtc", codec="H264" if track.passthrough else "VP8"))
        return web.json_response({"type": "answer", "sdp": answer, "session": session.sid,
                                  "token": self._tokens[session.sid]})

    # -- WebSocket ----------------------------------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, compress=False)
        if not ws.can_prepare(request).ok:
            return web.json_response(error("http", "/ws is the WebSocket endpoint: send an Upgrade request"),
                                     status=426)
        await ws.prepare(request)
        peer = WsPeer(ws)
        start = await self._ws_start(ws, peer)
        if start is None:
            await peer.close(1008)
            return ws
        await self._replace(start.get("replace"))
        session = self._open(start, jpeg=True)
        if isinstance(session, str):
            peer.send(self._busy(session, start["seq"]))
            await peer.close(1013, "busy")
            return ws
        session.emit = peer.send
        peer.send(self._hello(session, "websocket", start["seq"], codec="JPEG", frame_header=FRAME_HEADER.format))
        deliver = self._supervise(session, peer)
        supervisor = self._supervisors[session.sid]
        pump = asyncio.create_task(self._pump(session, peer))
        try:
            async for msg in ws:  # ends on a close, a lost connection, or a message over WS_MAX_MESSAGE (1009)
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                deliver(msg.data)
        finally:
            pump.cancel()
            session.close("the WebSocket closed")
            await asyncio.shield(supervisor)
        return ws

    async def _ws_start(self, ws: web.WebSocketResponse, peer: WsPeer) -> dict | None:
        """The client's first message, which must be `start`; None (after an error reply, if the client is still
        there) otherwise."""
        try:
            msg = await ws.receive(self.config.client_timeout)
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return None
            start = parse_message(msg.data)
            if start["type"] != "start":
                raise ProtocolError("bad_message", f"the first message must be start, not {start['type']}",
                                    start["seq"])
            return start
        except TimeoutError:
            refusal = ProtocolError("timeout", f"no start message within {self.config.client_timeout:g} s")
        except ProtocolError as e:
            refusal = e
        peer.send(self._refuse(refusal))
        return None

    async def _pump(self, session: Session, peer: WsPeer) -> None:
        """Send the session's frames as they come due: FRAME_HEADER + JPEG."""
        try:
            while True:
                frame = await session.next_frame()
                header = FRAME_HEADER.pack(frame.prompt_seq, frame.chunk, frame.index, frame.pts)
                await peer.send_frame(header + frame.jpeg)
                self._sent("websocket", len(frame.jpeg))
        except StreamEnded:
            pass
        except ConnectionError:
            session.close("the WebSocket connection was lost")


async def _one_request(request: web.Request, response: web.StreamResponse) -> None:
    """One request per connection (but a WebSocket's): no idle connection counts against max_connections, and
    nothing is cached (the page changes with the server, a recording with its stream)."""
    response.headers["Cache-Control"] = "no-store"
    if not isinstance(response, web.WebSocketResponse):
        response.force_close()


# -- running it ---------------------------------------------------------------------------------------------------
def make_pipeline(model: str, device: str | None = None, dtype: str | None = None, spec: str | None = None,
                  vae_device: str | None = None):
    """The video source for `model`: "synthetic" (streaming/synthetic.py), or a built-in model name or a model
    folder (with `spec`, its named config) for `longsana.stream.Pipeline`. The one place a model is chosen.
    FileNotFoundError, ValueError or KeyError for a model that cannot be loaded."""
    if model == "synthetic":
        return SyntheticPipeline()
    import torch

    from longsana.stream import Pipeline

    return Pipeline.from_pretrained(model, device, dtype and getattr(torch, DTYPES[dtype]), spec=spec,
                                    vae_device=vae_device, fp8=dtype == "fp8")


def model_spec(model: str, spec: str | None):
    """The ModelSpec that `make_pipeline` loads `model` with, read without loading it; None for the synthetic
    source. FileNotFoundError or KeyError, as make_pipeline's, for a model it cannot load."""
    if model == "synthetic":
        return None
    from longsana.stream import resolve_model

    return resolve_model(model, spec)[1]


def check_stream_kwargs(spec, stream_kwargs: dict) -> None:
    """ValueError if the model (its ModelSpec; None: the synthetic source) cannot make video of the configured size
    (the server's own limit, even sides for H.264, is ServerConfig's), or the synthetic source is given chunk
    settings, which it does not have, so that a bad --height/--width or --chunk-frames fails at startup, before the
    model loads, not when a stream starts."""
    if spec is None and (given := [n for n in CHUNK_SETTINGS if n in stream_kwargs]):
        raise ConfigError(given[0], f"the synthetic source has no {given[0]}: it stands in for a model")
    if spec is None or not {"height", "width"} & stream_kwargs.keys():
        return  # the synthetic source makes any size; the model's own size is one it can make
    from longsana.stream import check_size

    check_size(stream_kwargs.get("height", spec.height), stream_kwargs.get("width", spec.width))


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


def open_page(url: str) -> str:
    """Open `url` in the user's browser; what happened, to print."""
    if webbrowser.open(url):
        return f"Opened {url} in your browser."
    return f"No browser found here: open {url} in a browser."


async def _serve_forever(pipe, config: ServerConfig, open_browser: bool) -> None:
    server = Server(pipe, config)
    url = await server.start()
    print(f"LongSANA ({config.model_name}) streaming at {url}  (Ctrl+C stops)", flush=True)
    if open_browser:
        print(open_page(url), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


# -- the command: option defaults are ServerConfig's; a preset (--config) replaces them, the command line wins ------
PRESETS = CONFIG_FILES / "server"
OPTION_NAMES = {"allowed_hosts": "allow-host", "allowed_origins": "allow-origin", "ice_servers": "stun"}


def read_preset(name_or_path: str) -> dict:
    """A server preset: configs/server/<name>.toml, or a .toml file by path. Its keys are `longsana serve`'s option
    names (with _ for -). FileNotFoundError if there is no such preset, ValueError if it is not valid TOML."""
    path = Path(name_or_path) if name_or_path.endswith(".toml") else PRESETS / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(f.name.removesuffix(".toml") for f in PRESETS.iterdir() if f.name.endswith(".toml"))
        raise FileNotFoundError(f"no server preset {name_or_path!r}: the presets are {', '.join(known)} "
                                "(configs/server/), or give a path to a .toml file")
    return read_toml(path)


def _use_gpus(ctx: click.Context, param: click.Parameter, value: str | None) -> list[tuple[int, ...]] | None:
    """--gpus 0,1 or 0+1,2+3: the GPU groups, one worker each; one line of error for anything else."""
    try:
        return None if value is None else parse_gpus(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


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
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Default: bf16 on GPU, fp32 on CPU. fp8: the transformer blocks' matrix products in FP8, the rest "
                   "bf16 (Ada/Hopper GPUs).")
@click.option("--max-streams", default=ServerConfig.max_streams, show_default=True, help="Concurrent viewers.")
@click.option("--height", type=int, default=None, help="Video height (default: the model's).")
@click.option("--width", type=int, default=None, help="Video width (default: the model's).")
@click.option("--chunk-frames", type=int, default=None,
              help="Latent frames per chunk (default: the model's, 10 for LongSANA 2B): shorter chunks are made "
                   "sooner, at some cost in frames per second.")
@click.option("--switch-chunk-frames", type=int, default=None,
              help="Latent frames of the chunk a prompt switch starts (default: the model's, 3 for LongSANA 2B; 0: "
                   "--chunk-frames): shorter puts the new prompt on screen sooner.")
@click.option("--piece-frames", type=int, default=None,
              help="Decode and send each chunk this many latent frames at a time (default: the model's, 1 for "
                   "LongSANA 2B; 0: whole chunks), keeping the decoder near the screen, so that a switch never decodes "
                   "frames twice (a GPU; see docs/architecture.md).")
@click.option("--stun", multiple=True, default=ServerConfig.ice_servers,
              help="STUN/TURN URL for the server's ICE (repeatable).")
@click.option("--ice-loopback", is_flag=True, default=ServerConfig.ice_loopback,
              help="Only 127.0.0.1 as ICE candidate (loopback-only machines).")
@click.option("--client-timeout", default=ServerConfig.client_timeout, show_default=True,
              help="Seconds without a control message before a stream is dropped.")
@click.option("--request-timeout", default=ServerConfig.request_timeout, show_default=True,
              help="Seconds a client may take to send a request's head, and then its body.")
@click.option("--max-connections", default=ServerConfig.max_connections, show_default=True,
              help="Open connections at once; more are answered 503.")
@click.option("--max-downloads", default=ServerConfig.max_downloads, show_default=True,
              help="Recordings downloaded at once.")
@click.option("--recording-keep-seconds", type=float, default=ServerConfig.recording_keep_seconds, show_default=True,
              help="How long a stream's recording stays downloadable after the stream ends (0: not at all).")
@click.option("--allow-origin", multiple=True, default=ServerConfig.allowed_origins,
              help="Web origin of another site whose pages may use this server, e.g. https://example.com "
                   "(repeatable; \"*\": any).")
@click.option("--allow-host", multiple=True, default=ServerConfig.allowed_hosts,
              help="A name of this machine that browsers may use to reach it, besides localhost and its IP "
                   "addresses, e.g. studio.lan (repeatable; \"*\": any, which leaves DNS rebinding open).")
@click.option("--gpus", callback=_use_gpus, default=None,
              help="GPUs to serve from, a worker process each, every stream placed on the least loaded: 0,1; or "
                   "0+1,2+3 for workers that span two GPUs (the transformer on the first, the decoder on the "
                   "second). --max-streams is then per worker. One GPU (or pair) runs in this process.")
@click.option("--warm-up/--no-warm-up", default=True, show_default=True,
              help="Before serving, make a short stream and drop it, so that the first viewer's stream does not wait "
                   "for the engine's compilation (a minute or two on a GPU; nothing to do on a CPU).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
def serve_cmd(host, port, model, spec, device, dtype, max_streams, height, width, chunk_frames, switch_chunk_frames,
              piece_frames, stun, ice_loopback, client_timeout, request_timeout, max_connections, max_downloads,
              recording_keep_seconds, allow_origin, allow_host, gpus, warm_up, open_browser):
    """Stream videos to browsers: open the printed URL, type a prompt, press Enter."""
    given = dict(height=height, width=width, chunk_frames=chunk_frames, switch_chunk_frames=switch_chunk_frames,
                 piece_frames=piece_frames)
    stream_kwargs = {k: v for k, v in given.items() if v is not None}
    model = model or DEFAULT_MODEL
    try:
        config = ServerConfig(host=host, port=port, max_streams=max_streams, client_timeout=client_timeout,
                              request_timeout=request_timeout, max_connections=max_connections,
                              max_downloads=max_downloads, recording_keep_seconds=recording_keep_seconds,
                              ice_servers=tuple(stun), ice_loopback=ice_loopback,
                              stream_kwargs=stream_kwargs, model_name=model, allowed_origins=tuple(allow_origin),
                              allowed_hosts=tuple(allow_host))
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint=f"--{OPTION_NAMES.get(e.name, e.name.replace('_', '-'))}")
    try:
        check_stream_kwargs(model_spec(model, spec), stream_kwargs)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint=f"--{e.name.replace('_', '-')}") from None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--height / --width") from None
    except (FileNotFoundError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    limit_malloc_arenas()
    pipe = _open_pipeline(model, device, dtype, spec, gpus, max_streams, stream_kwargs if warm_up else None)
    if isinstance(pipe, GpuPool):  # --max-streams is per worker; the server's limit is theirs together
        config = replace(config, max_streams=max_streams * len(pipe.workers))
    if not is_loopback(host):
        click.echo(f"warning: listening on {host}, so other machines can reach this server, and there is no login: "
                   f"anyone who reaches port {port} can start streams. Browsers must use this machine's IP address, "
                   f"or a name given with --allow-host.", err=True)
    try:
        _run_loop(_serve_forever(pipe, config, open_browser))
    except OSError as e:  # Server.start's: the address is in use, or not this machine's
        raise click.ClickException(e.strerror or str(e)) from None
    finally:
        if isinstance(pipe, GpuPool):
            pipe.close()


def _open_pipeline(model: str, device: str | None, dtype: str | None, spec: str | None,
                   gpus: list[tuple[int, ...]] | None, max_streams: int, warm_up: dict | None):
    """The video source: in this process (no --gpus, or one GPU or pair), else a GpuPool of worker processes;
    warmed up for streams of `warm_up` (stream kwargs; None: not), each worker as it loads. One line of error for a
    model that cannot load or a GPU this machine lacks."""
    if gpus and device:
        raise click.BadParameter("--gpus names the devices: leave out --device", param_hint="--gpus")
    try:
        if gpus and model != "synthetic":  # the synthetic source needs no GPU: its workers run anywhere
            check_gpus(gpus)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gpus") from None
    try:
        if gpus and len(gpus) > 1:
            return GpuPool(gpus, model, dtype, spec, max_streams=max_streams, warm_up=warm_up)
        device, vae_device = devices(gpus[0]) if gpus else (device, None)
        pipe = make_pipeline(model, device, dtype, spec, vae_device=vae_device)
    except (FileNotFoundError, ValueError, KeyError, WorkerStartError) as e:
        raise click.ClickException(str(e)) from None
    if warm_up is not None:
        pipe.warm_up(**warm_up)
    return pipe
