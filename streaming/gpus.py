"""The server on several GPUs (`longsana serve --gpus 0,1`): one worker process per GPU, or per pair of GPUs
(`--gpus 0+1,2+3`: the transformer on the first, the decoder on the second).

Why processes: a crash, an out-of-memory error or a CUDA error that poisons a context takes down the process it
happens in. With a worker process per GPU it ends only that GPU's streams; the server and the other GPUs' streams
go on. (With one GPU, or one pair, the server keeps its pipeline in process, as before: nothing changes.)

    server process                                      worker process (one per GPU, 'spawn')
    Session --RemoteStream--> GpuWorker --Connection--> _Host: pipeline = make_pipeline(...), DeviceWorker
                                          <-- replies (chunks), status every STATUS_SECONDS --

- A `GpuWorker` stands in for a pipeline in the server process: `stream(...)` returns a `RemoteStream` with the
  Stream interface (fps, deadline, set_prompt, landing, rewind, iteration, close). Every call is a message with an
  id on the worker's one Connection, answered by a reply with that id; the worker runs each call on a thread of its
  own, so a stream's `next` (a chunk) never holds up another's switch. Chunks are pulled one `next` at a time, as in
  process, so the generator stays one chunk ahead of the screen. Deadlines cross as time.monotonic() values, one
  clock for every process on Linux.
- A chunk's frames cross in shared memory, not through the Connection: the worker writes them into its stream's
  block (/dev/shm/longsana-<worker pid>-<stream id>-<n>; one per stream, replaced by a larger one when a chunk does
  not fit) and sends the block's name, shape and dtype in the chunk's place of its frames; the server copies them
  out into an array of its own (one memcpy) before it yields the chunk, so nothing else in the server changes. A
  40-frame 480x832 chunk (48 MB) takes a median 8 ms from the server's `next` to its array on the 2-core CPU machine
  (5 ms of the server's CPU), where pickled through the Connection it took 127-178 ms (74-76 ms of CPU)
  (`python -m longsana.benchmarks.frames [--keep]`). A block is unlinked when its stream closes or when the worker
  exits; a worker that is killed cannot, and the server unlinks its blocks once the process has ended
  (`unlink_blocks`).
- The worker reports its device's load and admission (`DeviceWorker.load` / `admits`) and any device failure every
  STATUS_SECONDS, so placing a stream never waits for a worker.
- `GpuPool` places a new stream on the least loaded worker that admits it: the one with the fewest streams (counted
  by the server at placement, so streams opened together spread at once), the measured load breaking ties. A
  worker admits while it has fewer than `max_streams` streams, its device would stay real time with one more, and
  it is alive; the server refuses a stream (busy, naming each GPU's reason) only when no worker admits it.
- A worker that dies (killed, out of memory, a crash) ends every stream on it: their pending and later calls raise
  `WorkerDied`, whose message names the GPU and how its process ended, so each session's failure path tells its
  viewer and frees the slot. The others are untouched; /health says `degraded` (503 `failed` only when no worker
  can take a stream).
- A `Supervisor` per GPU group keeps its worker running: when the worker dies, or its device reports a sticky
  failure (a poisoned CUDA context: its streams cannot go on, so the process is stopped at once), a thread of the
  supervisor's starts a fresh process after a backoff and waits for it to load its model, while the other workers
  serve on; no stream is placed on it until it is ready. At most MAX_RESTARTS restarts within
  RESTART_WINDOW_SECONDS: a worker that keeps dying then stays down, and /health says why.
- The synthetic source (`--model synthetic`) needs no GPU, so `--model synthetic --gpus 0,1` starts two synthetic
  workers on any machine, without looking for CUDA: the tests' stand-in workers, and a way to try the pool.

This module imports no torch at the top: the worker sets CUDA_VISIBLE_DEVICES to its GPUs before torch loads.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import itertools
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.shared_memory import SharedMemory
from typing import NamedTuple

import numpy as np

STATUS_SECONDS = 0.5  # how often a worker reports its load, admission and health
START_SECONDS = 600.0  # how long a worker may take to load its model and warm up
STOP_SECONDS = 5.0  # how long a stopped worker may take to exit before it is killed
# Restarting a worker that died. An OOM kill or a crash is usually a one-off, so the first restart comes at once
# (after 1 s, which lets the driver free the dead process's memory); each further restart within the window waits
# RESTART_BACKOFF times longer (1, 5, 25 s), time for a GPU in trouble to recover. A worker that dies at once every
# time (a broken GPU, a model that no longer loads) would otherwise loop for ever, loading a model each time: after
# MAX_RESTARTS within RESTART_WINDOW_SECONDS (10 minutes: several model loads) it stays down until the server is
# restarted by hand, and /health says why.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 600.0
RESTART_DELAY_SECONDS = 1.0
RESTART_BACKOFF = 5.0
MAX_GROUP = 2  # GPUs one worker spans: the transformer's and the decoder's
SHM_PREFIX = "longsana-"  # how our shared-memory blocks' names start, then the worker's pid (block_stem)
SHM_DIR = "/dev/shm"  # where Linux lists POSIX shared memory
# The server maps a worker's blocks without tracking them (Python 3.13+: track=False), as they are the worker's to
# unlink. Before 3.13 attaching always registers the block with the resource tracker; that is harmless here: a
# spawned worker's tracker is the server's, whose register is a set, so the worker's own unlink unregisters it.
UNTRACKED = {"track": False} if sys.version_info >= (3, 13) else {}


class WorkerDied(RuntimeError):
    """The worker process running a stream is gone; the message says which GPU and how it ended."""


class WorkerStartError(RuntimeError):
    """A worker could not load its pipeline; the message is the worker's error."""


# -- --gpus ------------------------------------------------------------------------------------------------------------
def parse_gpus(text: str) -> list[tuple[int, ...]]:
    """`0,1` -> [(0,), (1,)]: a worker per GPU; `0+1,2+3` -> [(0, 1), (2, 3)]: a worker per pair. ValueError, in
    one line, for anything else."""
    groups, seen = [], set()
    for item in text.split(","):
        parts = item.strip().split("+")
        if not all(p.strip() for p in parts):
            raise ValueError(f"{text!r} has an empty entry: give GPU indices, e.g. 0,1 or 0+1,2+3")
        if bad := next((p for p in parts if not (p.strip().isascii() and p.strip().isdigit())), None):
            raise ValueError(f"{bad.strip()!r} is not a GPU index: give GPU indices, e.g. 0,1 or 0+1,2+3")
        group = tuple(int(p) for p in parts)
        if len(group) > MAX_GROUP:
            raise ValueError(f"{item.strip()!r}: a worker spans at most {MAX_GROUP} GPUs (the transformer's, "
                             "then the decoder's)")
        for gpu in group:
            if gpu in seen:
                raise ValueError(f"GPU {gpu} is listed twice in {text!r}: a GPU serves one worker")
            seen.add(gpu)
        groups.append(group)
    return groups


def gpu_name(group: tuple[int, ...]) -> str:
    """The worker's name in messages and in /metrics' gpu label: "0", or "0+1" for a pair."""
    return "+".join(map(str, group))


def check_gpus(groups: list[tuple[int, ...]]) -> None:
    """ValueError, in one line, if a GPU named is not one of this machine's (CUDA's numbering)."""
    import torch

    count = torch.cuda.device_count()
    missing = sorted({g for group in groups for g in group if g >= count})
    if missing:
        have = f"it has {count} ({', '.join(map(str, range(count)))})" if count else "it has none"
        raise ValueError(f"no CUDA GPU {missing[0]} on this machine: {have}")


def devices(group: tuple[int, ...]) -> tuple[str, str | None]:
    """The pipeline's device and its decoder's (None: the same) for a group of GPUs."""
    return f"cuda:{group[0]}", f"cuda:{group[1]}" if len(group) > 1 else None


def _visible(group: tuple[int, ...]) -> str:
    """CUDA_VISIBLE_DEVICES for a worker: its GPUs, in CUDA's numbering in this process (which a
    CUDA_VISIBLE_DEVICES of the user's own may already narrow)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    return ",".join(outer.split(",")[g] if outer else str(g) for g in group)


# -- the worker process ------------------------------------------------------------------------------------------------
def _serve(conn, model: str, group: tuple[int, ...], dtype: str | None, spec: str | None,
           warm_up: dict | None) -> None:
    """The worker process: load the pipeline and warm it up for streams of `warm_up` (stream kwargs; None: not),
    say it is ready (or why not), then answer calls until the server goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the server stops us
    if model != "synthetic":
        os.environ["CUDA_VISIBLE_DEVICES"] = _visible(group)  # before torch loads: this worker sees its GPUs only
    from longsana.streaming.server import make_pipeline

    device, vae_device = devices(tuple(range(len(group))))  # numbered as this worker sees them: its GPUs only
    try:
        pipe = make_pipeline(model, device, dtype, spec, vae_device=vae_device)
        if warm_up is not None:
            pipe.warm_up(say=lambda line: print(f"GPU worker {gpu_name(group)}: {line}", flush=True), **warm_up)
    except Exception as e:  # noqa: BLE001 (any loading error goes to the server, which reports it)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    _Host(pipe, conn).serve()


class _Host:
    """The worker's side: the pipeline, its open streams, and the calls on them."""

    def __init__(self, pipe, conn):
        self.pipe, self.conn = pipe, conn
        self._send_lock = threading.Lock()  # a Connection takes one message at a time
        self._streams: dict[int, tuple[object, object, _FrameBlock]] = {}  # id -> stream, its iterator, its block
        self._deadlines: dict[int, float | None] = {}  # stream id -> the deadline of its next chunk

    def send(self, message) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except OSError:  # the server is gone: the main thread sees the end of the pipe and exits
            pass

    def serve(self) -> None:
        self.send(("ready", {"spec": self.pipe.spec, "status": self._status()}))
        threading.Thread(target=self._report, name="status", daemon=True).start()
        while True:
            try:
                call_id, method, sid, args = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: so is our reason to run
                for _, _, block in list(self._streams.values()):
                    block.close()  # os._exit runs no finalizer: unlink the blocks here
                os._exit(0)
            threading.Thread(target=self._answer, args=(call_id, method, sid, args), daemon=True).start()

    def _answer(self, call_id: int, method: str, sid: int, args: tuple) -> None:
        try:
            reply = ("reply", call_id, True, getattr(self, "_" + method)(sid, *args))
        except Exception as e:  # noqa: BLE001 (raised again in the server, in the caller's thread)
            reply = ("reply", call_id, False, _portable(e))
        self.send(reply)

    def _stream(self, sid: int, prompt: str, seed: int, kwargs: dict) -> float:
        stream = self.pipe.stream(prompt, seed=seed, **kwargs)
        stream.deadline = lambda: self._deadlines.get(sid)
        self._streams[sid] = stream, iter(stream), _FrameBlock(sid)
        return stream.fps

    def _next(self, sid: int, deadline: float | None):
        """The stream's next chunk, its frames in the stream's block (the Chunk carries their SharedFrames); None at
        its end."""
        self._deadlines[sid] = deadline
        _, chunks, block = self._open(sid)
        chunk = next(chunks, None)
        return None if chunk is None else dataclasses.replace(chunk, frames=block.put(chunk.frames))

    def _set_prompt(self, sid: int, prompt: str, at_frame: int | None, transition_frames: int | None,
                    not_before: int | None) -> tuple:
        """(the request's id, where it lands): the session asks for both, so they come in one reply."""
        stream = self._open(sid)[0]
        request = stream.set_prompt(prompt, at_frame=at_frame, transition_frames=transition_frames,
                                    not_before=not_before)
        return request, stream.landing(request)

    def _rewind(self, sid: int, seconds: float, at_frame: int | None) -> float:
        return self._open(sid)[0].rewind(seconds, at_frame=at_frame)

    def _close(self, sid: int) -> None:
        stream, _, block = self._open(sid)
        del self._streams[sid]
        self._deadlines.pop(sid, None)
        block.close()
        stream.close()

    def _open(self, sid: int) -> tuple:
        """The stream, its iterator and its block; ValueError (a refusal, as for a closed stream in process) once it
        is closed."""
        if sid not in self._streams:
            raise ValueError("the stream has ended")
        return self._streams[sid]

    def _report(self) -> None:
        while True:
            self.send(("status", self._status()))
            time.sleep(STATUS_SECONDS)

    def _status(self) -> dict:
        """The device's load, whether it admits one more stream, and its failure if it has one. The synthetic
        source has no device worker: idle, always admits."""
        worker = getattr(self.pipe, "worker", None)
        if worker is None:
            return {"load": 0.0, "admits": (True, "idle"), "failure": None}
        admits = worker.admits() if self.pipe.device.type == "cuda" else (True, "not a GPU")
        failure = worker.failure and f"the device failed: {type(worker.failure).__name__}: {worker.failure}"
        return {"load": worker.load(), "admits": admits, "failure": failure}


def _portable(e: Exception) -> Exception:
    """`e` if it survives pickling (a ValueError for a refused prompt stays one), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


# -- frames in shared memory -------------------------------------------------------------------------------------------
class SharedFrames(NamedTuple):
    """Where a chunk's frames are: what crosses the Connection in the Chunk's place of its frames."""
    name: str  # the block's
    shape: tuple[int, ...]
    dtype: str


def block_stem(pid: int) -> str:
    """The start of the names of worker process `pid`'s blocks."""
    return f"{SHM_PREFIX}{pid}-"


class _FrameBlock:
    """A stream's shared memory, on the worker's side: the frames of its latest chunk. One block serves the stream
    from chunk to chunk: the server asks for chunk c+1 only once it has received chunk c, and copies chunk c's
    frames out before it yields the chunk, and the worker writes only while answering a `next`, so nothing reads a
    block while it is written. A chunk that does not fit gets a larger block under a new name (the server maps the
    new one); the old one is unlinked. Unlinked when the stream closes, or when the worker exits."""

    def __init__(self, sid: int):
        self._stem = f"{block_stem(os.getpid())}{sid}-"
        self._numbers = itertools.count()
        self._block: SharedMemory | None = None
        self._lock = threading.Lock()  # a close (another thread) waits for a write under way
        self._closed = False

    def put(self, frames: np.ndarray) -> SharedFrames:
        """Write `frames` into the block; where they are, for the server."""
        with self._lock:
            if self._closed:
                raise ValueError("the stream has ended")
            if self._block is None or self._block.size < frames.nbytes:
                self._unlink()
                name = f"{self._stem}{next(self._numbers)}"
                self._block = SharedMemory(name, create=True, size=max(frames.nbytes, 1))  # size 0 is refused
            np.ndarray(frames.shape, frames.dtype, self._block.buf)[...] = frames
            return SharedFrames(self._block.name, frames.shape, frames.dtype.str)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._unlink()

    def _unlink(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None


class _FrameReader:
    """A stream's shared memory, on the server's side: the worker's block, mapped once and kept mapped from chunk to
    chunk, mapped again when its name changes (the block grew)."""

    def __init__(self):
        self._block: SharedMemory | None = None
        self._lock = threading.Lock()  # a close (RemoteStream.close, maybe another thread) waits for a copy

    def read(self, where: SharedFrames) -> np.ndarray:
        """A copy of the frames, in memory of this process's own: the worker writes the next chunk over them."""
        with self._lock:
            if self._block is None or self._block.name != where.name:
                self._close()
                self._block = SharedMemory(where.name, **UNTRACKED)
            return np.ndarray(where.shape, where.dtype, self._block.buf).copy()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block = None


def unlink_blocks(pid: int) -> None:
    """Unlink the blocks worker process `pid`, which has ended, left behind. A killed worker cannot, and its
    resource tracker would not do it in time: a spawned process shares the server's tracker, which unlinks what is
    left only once every process using it has exited, when the server exits. Mapped with tracking, so that the
    unlink also drops the worker's registration (the tracker would warn about it at exit)."""
    names = os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else []
    for name in (n for n in names if n.startswith(block_stem(pid))):
        try:
            block = SharedMemory(name)
            block.close()
            block.unlink()
        except FileNotFoundError:  # unlinked meanwhile: stop() and the reply reader may both clean up
            pass


# -- the server's side -------------------------------------------------------------------------------------------------
class GpuWorker:
    """One worker process, seen from the server: a pipeline whose streams run there (`stream`), its last reported
    status (`load`, `admits`), and `failure` once it has died. `on_lost(worker)` is called once, on the reply
    reader's thread, when a ready worker can no longer run streams: its process died, or its device failed; not
    when it is stopped."""

    def __init__(self, group: tuple[int, ...], model: str, dtype: str | None, spec: str | None, context,
                 on_lost=lambda worker: None, warm_up: dict | None = None):
        self.group, self.name = group, gpu_name(group)
        self.failure: str | None = None  # why the process is gone
        self._status = {"load": 0.0, "admits": (False, "starting"), "failure": None}
        self._lock = threading.Lock()  # guards _calls and failure
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._stopping: str | None = None  # how the process ended, when the server stopped it
        self._on_lost, self._lost = on_lost, False
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, model, group, dtype, spec, warm_up),
                                       name=f"longsana-gpu{self.name}")
        self.process.start()
        child.close()

    def wait_ready(self, timeout: float = START_SECONDS) -> dict:
        """What the worker says once its pipeline is loaded; WorkerStartError if it could not load it."""
        try:
            if not self._conn.poll(timeout):
                raise WorkerStartError(f"GPU worker {self.name} did not load its model within {timeout:g} s")
            kind, info = self._conn.recv()
        except (EOFError, OSError):  # the process ended (OSError: stopped, its pipe closed, while we waited)
            raise WorkerStartError(f"GPU worker {self.name} {self._ended()} while loading its model") from None
        if kind == "failed":
            raise WorkerStartError(f"GPU worker {self.name}: {info}")
        self._status = info["status"]
        threading.Thread(target=self._read, name=f"gpu{self.name}-replies", daemon=True).start()
        return info

    # -- the pipeline's interface --------------------------------------------------------------------------------------
    def stream(self, prompt: str, seed: int = 0, **kwargs) -> RemoteStream:
        sid = next(self._ids)
        fps = self.call("stream", sid, prompt, seed, kwargs)
        return RemoteStream(self, sid, fps)

    def call(self, method: str, sid: int, *args):
        """The worker's answer to method(sid, *args): its result, or its exception raised here."""
        future = Future()
        with self._lock:
            if self.failure is not None:
                raise WorkerDied(self.failure)
            call_id = next(self._ids)
            self._calls[call_id] = future
            try:
                self._conn.send((call_id, method, sid, args))
            except OSError:  # the process is gone: the reader fails the call
                pass
        return future.result()

    # -- status --------------------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.failure is None and self._status["failure"] is None

    @property
    def problem(self) -> str | None:
        """Why this worker cannot run streams (None: it can)."""
        return self.failure or self._status["failure"]

    def load(self) -> float:
        return self._status["load"] if self.failure is None else 0.0

    def admits(self, streams: int, max_streams: int) -> tuple[bool, str]:
        """Whether one more stream fits beside `streams` (yes/no, the reason in words)."""
        if self.problem is not None:
            return False, self.problem
        if streams >= max_streams:
            return False, f"{streams} of {max_streams} streams in use"
        return self._status["admits"]

    # -- the reply reader ----------------------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "status":
                    self._status = message[1]
                    if self._status["failure"] is not None:  # sticky: the device runs nothing more
                        self._report_lost()
                    continue
                _, call_id, ok, value = message
                with self._lock:
                    future = self._calls.pop(call_id)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except (EOFError, OSError):
            pass
        self._died()

    def _died(self) -> None:
        """The process is gone: fail every waiting call and every later one."""
        how = self._ended()
        with self._lock:
            self.failure = f"the GPU {self.name} worker (pid {self.process.pid}) {how}"
            calls, self._calls = self._calls, {}
        if self._stopping is None and self.process.exitcode is not None:  # else stop() does, once it has ended
            unlink_blocks(self.process.pid)  # after `failure`: a stream that finds its block gone reads why
        for future in calls.values():
            future.set_exception(WorkerDied(self.failure))
        if self._stopping is None:
            self._report_lost()

    def _report_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self._on_lost(self)

    def _ended(self) -> str:
        """How the process ended, for messages: as stop() said, or by its exit code, once it has one."""
        if self._stopping is not None:
            return self._stopping  # stop() waits for the process: a second wait here could take its exit code
        self.process.join(STOP_SECONDS)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            return f"died: killed by {signal.Signals(-code).name} (exit code {code})"
        return f"died: exit code {code}"

    def stop(self, how: str = "was stopped") -> None:
        """End the process (its streams end with it, told that it `how`) and wait for it."""
        self._stopping = how
        self.process.terminate()
        self.process.join(STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        unlink_blocks(self.process.pid)
        self._conn.close()


class RemoteStream:
    """A stream running in a worker process, with the Stream interface the session uses."""

    def __init__(self, worker: GpuWorker, sid: int, fps: float):
        self.fps, self.deadline = fps, None  # deadline: set by the session, sent with each `next`
        self._worker, self._sid, self._closed = worker, sid, False
        self._frames = _FrameReader()
        self._landing: tuple[int, int | None] | None = None  # (request, where it lands): the last set_prompt's

    def __iter__(self):
        """Chunks as in process: each one's frames copied out of the worker's block before it is yielded, so the
        worker may write the next chunk's over them once it is asked for it."""
        try:
            while (chunk := self._worker.call("next", self._sid, self.deadline and self.deadline())) is not None:
                yield dataclasses.replace(chunk, frames=self._read(chunk.frames))
        finally:
            self._frames.close()

    def _read(self, where: SharedFrames):
        try:
            return self._frames.read(where)
        except FileNotFoundError:  # unlinked: its worker died after sending it (alive, it would be a bug: raised)
            if self._worker.failure is None:
                raise
            raise WorkerDied(self._worker.failure) from None

    def set_prompt(self, prompt: str, at_frame: int | None = None, transition_frames: int | None = None,
                   not_before: int | None = None) -> int:
        self._landing = self._worker.call("set_prompt", self._sid, prompt, at_frame, transition_frames, not_before)
        return self._landing[0]

    def landing(self, request: int) -> int | None:
        """Known for the last request set_prompt made (the session asks right after it)."""
        return self._landing[1] if self._landing is not None and self._landing[0] == request else None

    def rewind(self, seconds: float, at_frame: int | None = None) -> float:
        return self._worker.call("rewind", self._sid, seconds, at_frame)

    def close(self) -> None:
        """Free the stream in its worker (nothing to do if the worker is gone: its memory went with it, and its
        blocks were unlinked) and unmap its block."""
        self._frames.close()
        if not self._closed:
            self._closed = True
            try:
                self._worker.call("close", self._sid)
            except WorkerDied:
                pass


class Supervisor:
    """Keeps one GPU group's worker running. When the worker is lost (GpuWorker's on_lost) a thread of its own
    replaces it: it stops the old process (a failed device's still runs), waits out a backoff, starts a new one and
    waits for it to load its model; at most MAX_RESTARTS times within RESTART_WINDOW_SECONDS, then the worker stays
    down. `worker`: the current process (while restarting, the one starting); `state`: ok, restarting or down."""

    def __init__(self, group: tuple[int, ...], start, start_timeout: float):
        """`start(on_lost)`: a new GpuWorker for the group, its process started."""
        self.name, self.restarts = gpu_name(group), 0  # restarts: processes started to replace a lost one
        self.on_restart = lambda supervisor: None  # the server counts restarts in /metrics
        self._start, self._start_timeout = start, start_timeout
        self._lock = threading.Lock()  # guards worker, _state and stopping processes (close is another thread)
        self._state: str | None = None  # None: the worker's own state; else restarting or down, and why
        self._recent: collections.deque[float] = collections.deque()  # when the restarts in the window began
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.worker: GpuWorker = start(self._lost)

    @property
    def problem(self) -> str | None:
        """Why no stream can be placed on this worker now (None: one can)."""
        return self._state or self.worker.problem

    @property
    def state(self) -> str:
        """For /health: ok, `restarting (attempt k): why`, or `down: why`."""
        return self.problem or "ok"

    def load(self) -> float:
        return 0.0 if self.problem else self.worker.load()

    def admits(self, streams: int, max_streams: int) -> tuple[bool, str]:
        problem = self.problem
        return (False, problem) if problem else self.worker.admits(streams, max_streams)

    def _lost(self, worker: GpuWorker) -> None:
        """The worker died or its device failed (called on its reply reader): replace it, on a thread."""
        with self._lock:
            if self._closing.is_set() or worker is not self.worker or self._state is not None:
                return  # closing; or a restart is under way, which checks its new worker once it is ready
            self._state = f"restarting: {worker.problem}"
            self._thread = threading.Thread(target=self._restart, args=(worker.problem,),
                                            name=f"gpu{self.name}-restart", daemon=True)
            self._thread.start()

    def _restart(self, cause: str) -> None:
        """Replace the lost worker until a new one is ready, the bound is reached, or the pool closes."""
        while True:
            with self._lock:
                self.worker.stop(f"was stopped: {cause}")  # ends a failed device's process; closes a dead one's pipe
            delay = self._backoff(cause)
            if delay is None or self._closing.wait(delay):
                return
            if (cause := self._relaunch()) is None:
                return

    def _backoff(self, cause: str) -> float | None:
        """The wait before the next restart, the state saying which attempt it is; None, the state saying why, once
        MAX_RESTARTS restarts within RESTART_WINDOW_SECONDS have not kept the worker up."""
        now = time.monotonic()
        while self._recent and now - self._recent[0] > RESTART_WINDOW_SECONDS:
            self._recent.popleft()
        if len(self._recent) >= MAX_RESTARTS:
            self._state = (f"down: {len(self._recent)} restarts within {RESTART_WINDOW_SECONDS:g} s did not keep it "
                           f"up (restart the server once it is fixed); the last ended: {cause}")
            return None
        self._recent.append(now)
        self._state = f"restarting (attempt {len(self._recent)}): {cause}"
        return RESTART_DELAY_SECONDS * RESTART_BACKOFF ** (len(self._recent) - 1)

    def _relaunch(self) -> str | None:
        """Start a new worker and wait for it: None once it is ready (or the pool is closing), else why not."""
        with self._lock:  # close() stops whichever process is `worker`: none is left behind
            if self._closing.is_set():
                return None
            self.worker = worker = self._start(self._lost)
            self.restarts += 1
        self.on_restart(self)
        try:
            worker.wait_ready(self._start_timeout)
        except WorkerStartError as e:
            return str(e)
        with self._lock:  # a loss since it was ready is seen here: _lost ignored it, a restart being under way
            if worker.problem is None:
                self._state = None
            return worker.problem

    def close(self) -> None:
        """Stop the worker and any restart under way (a process starting is stopped, its wait ends)."""
        with self._lock:
            self._closing.set()
            self.worker.stop()
        if self._thread is not None:
            self._thread.join()


class GpuPool:
    """A worker process per GPU group, all loading at once, each kept running by a Supervisor; the server places
    each stream on one of them. `spec` is the model's (the workers all load the same one). Close it (`close`, or
    `with`) to stop the workers."""

    def __init__(self, groups: list[tuple[int, ...]], model: str, dtype: str | None = None, spec: str | None = None,
                 max_streams: int = 2, start_timeout: float = START_SECONDS, warm_up: dict | None = None):
        self.model, self.max_streams = model, max_streams  # max_streams: per worker
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        # (a worker warms up as it loads: one that is restarted does too)
        self.supervisors = [Supervisor(group, functools.partial(GpuWorker, group, model, dtype, spec, context,
                                                                warm_up=warm_up), start_timeout) for group in groups]
        atexit.register(self.close)  # before multiprocessing's own exit handler, which would wait for them
        try:
            ready = [w.wait_ready(start_timeout) for w in self.workers]  # they load at once: wait for them all
            self.spec = ready[0]["spec"]
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> list[GpuWorker]:
        """Each group's current worker process."""
        return [s.worker for s in self.supervisors]

    def place(self, streams_on) -> tuple[GpuWorker | None, str]:
        """The worker for a new stream and why; (None, every worker's reason) if none admits it.
        `streams_on(worker)`: the streams the server has placed on it and not yet freed."""
        admitting, reasons = [], []
        for s in self.supervisors:
            ok, why = s.admits(streams_on(s.worker), self.max_streams)
            if ok:
                admitting.append(s.worker)
            else:
                reasons.append(f"GPU {s.name}: {why}")
        if not admitting:
            return None, f"no GPU has room ({'; '.join(reasons)})"
        best = min(admitting, key=lambda w: (streams_on(w), w.load()))
        return best, f"placed on GPU {best.name}"

    def health(self) -> tuple[str, str | None]:
        """ok; degraded (some workers down or restarting) or failed (none can take a stream), with the reasons."""
        down = [s for s in self.supervisors if s.problem is not None]
        if not down:
            return "ok", None
        reason = "; ".join(f"GPU {s.name}: {s.problem}" for s in down)
        return "failed" if len(down) == len(self.supervisors) else "degraded", reason

    def close(self) -> None:
        atexit.unregister(self.close)
        for supervisor in self.supervisors:
            supervisor.close()

    def __enter__(self) -> GpuPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
