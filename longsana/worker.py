"""One owner of a device: every stream's device work runs on one worker thread, one job at a time.

Why: a CUDA graph capture allows no other work on the device while it records, and a stream on another thread that
launches, allocates or synchronises during a capture breaks it (and, through the legacy default stream that each
thread launches on, poisons the capture of the others: "operation not permitted when stream is capturing"). With
one thread issuing all of a pipeline's device work, a capture never overlaps anything, and the streams still share
the GPU: a job only launches work (the fast step's kernels run asynchronously, the next chunk's transformer work
queued while this one decodes), so the device stays busy while the worker moves on to the next stream.

A job is one call (`run`) or one chunk of a stream (`iterate`: each `next` of the stream's generator runs as a job,
so the loop's controls, rewind copies, denoise, decode and download all happen on the worker). A chunk may come with
work to run after it is handed out (`Later`: the launch of the next chunk's work, which can hold the launching
thread for a while), as a job of its own that the stream's next chunk waits for. An owner may also register a
poll (`poll`): work that waits for room on the device (the rest of the next chunk's work, launched a step at a time
so that a prompt switch need not wait behind all of it), called between jobs and, while idle, every POLL_SECONDS,
until it says it is done. Jobs are served earliest deadline first; a stream's deadline is when its viewer's buffer
runs dry (given by whoever paces it), else the moment it asked, which serves waiting streams in turn: none can
starve another.

The worker also keeps the load: the fraction of the last `window` seconds in which some stream's work was under
way, from the start of its job until the device has run all it launched (an owner's `device_idle`, asked between
jobs and every POLL_SECONDS while some is running; without one, until the job returns). A job of the fast step
only launches work, which the GPU runs after it returns, so the job's own time is a small part of the device's: two
streams paced to 16 fps on an H100 read 26% so, while they used about 78% of it (benchmarks/RESULTS.md, 2026-12-06).
When the streams are paced to real time, the load is the share of the device they need, so a new stream is
admitted while the load with one more (load x (n + 1) / n) stays under the margin (`admits`).

A failed job raises in the caller's thread and ends only that stream. A failure that leaves the device unusable (a
CUDA error is sticky: every later call fails) is detected by `healthy()` after any failure; the worker then fails
every waiting and later job at once with `DeviceFailed`, and `failure` says why (the server's /health reports it).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

_DONE = object()  # the end of a stream's generator, carried back from the worker
POLL_SECONDS = 0.002  # while polls are registered, the idle worker calls them this often (a step is ~0.1 s at 480p)
EXIT_SECONDS = 5.0  # at exit, how long the interpreter waits for a worker to finish its job and end
_STARTED: weakref.WeakSet = weakref.WeakSet()  # workers whose thread has started


class DeviceFailed(RuntimeError):
    """The device can no longer run work (e.g. a CUDA error that poisons the context)."""


@dataclass
class Later:
    """An item of `iterate`'s generator with work to run on the worker once the item is handed out."""

    item: object
    then: Callable[[], None]


@dataclass(order=True)
class _Job:
    deadline: float
    seq: int
    fn: Callable = field(compare=False)
    owner: object = field(compare=False, default=None)
    done: threading.Event = field(compare=False, default_factory=threading.Event)
    result: object = field(compare=False, default=None)
    error: BaseException | None = field(compare=False, default=None)


def _result(job: _Job):
    """A job's result once it has run, or its error raised here."""
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.result


def covered(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Seconds of [t0, t1] inside at least one of the spans (start, end): overlapping spans count once."""
    total, reach = 0.0, t0
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, t1)
        if end > start:
            total, reach = total + end - start, end
    return total


def _idle(device_idle: Callable[[], bool]) -> bool:
    """An owner's device_idle(); one that fails (its stream torn down) has nothing left running."""
    try:
        return bool(device_idle())
    except Exception:  # noqa: BLE001
        return True


def cuda_healthy(device: torch.device) -> Callable[[], bool]:
    """A health check for a device: a CUDA context that failed (sticky error) fails to synchronise."""
    def healthy() -> bool:
        if device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(device)
            return True
        except Exception:  # noqa: BLE001 (any failure here means the device is gone)
            return False
    return healthy


class DeviceWorker:
    def __init__(self, name: str = "device", healthy: Callable[[], bool] = lambda: True, window: float = 10.0):
        self.name, self.healthy, self.window = name, healthy, window
        self.failure: BaseException | None = None
        self._jobs: list[_Job] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._busy: deque[tuple[float, float]] = deque()  # (start, end): recent jobs, device work run
        self._running: dict[int, tuple[float, Callable[[], bool]]] = {}  # by owner id: (start, device_idle) of work
        # launched by its jobs and not yet run on the device
        self._owners: dict[int, object] = {}  # streams iterating now (by id)
        self._polls: dict[int, Callable[[], bool]] = {}  # by owner id: called between jobs until they return False
        self._thread: threading.Thread | None = None
        self._exiting = False

    # -- submitting work (any thread) ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, deadline: float | None = None, owner: object = None):
        """fn(*args) on the worker thread; returns its result or raises its exception here."""
        if threading.current_thread() is self._thread:  # a job that submits a job: run it in place
            return fn(*args)
        return _result(self.submit(fn, *args, deadline=deadline, owner=owner))

    def submit(self, fn: Callable, *args, deadline: float | None = None, owner: object = None) -> _Job:
        """Queue fn(*args) and return at once; the job's `done` is set when it has run (its result or error)."""
        job = _Job(time.monotonic() if deadline is None else deadline, next(self._seq), lambda: fn(*args), owner)
        with self._cv:
            if self.failure is not None:
                raise DeviceFailed(f"{self.name}: {self.failure}") from self.failure
            heapq.heappush(self._jobs, job)
            self._start()
            self._cv.notify()
        return job

    def poll(self, fn: Callable[[], bool], owner: object = None) -> None:
        """Call fn() on the worker thread after each job and, while idle, every POLL_SECONDS, until it returns False
        or raises: the owner's work that waits for room on the device. One per owner: a new one replaces it."""
        with self._cv:
            self._polls[id(owner)] = fn
            self._start()
            self._cv.notify()

    def iterate(self, chunks: Iterator, owner: object = None, deadline: Callable[[], float | None] | None = None):
        """Yield `chunks`' items, each produced by a job on the worker; `deadline()` gives each job's deadline. An
        item that comes as `Later(item, then)` is yielded at once, and `then()` runs as a job of its own, which the
        next item waits for (and raises for)."""
        self._owners[id(owner)] = owner
        then = None
        try:
            while True:
                if then is not None:
                    _result(then)
                when = deadline() if deadline else None  # (asked now: the wait above may have been long)
                item = self.run(next, chunks, _DONE, deadline=when, owner=owner)
                if item is _DONE:
                    return
                then = None
                if isinstance(item, Later):
                    item, then = item.item, self.submit(item.then, deadline=when, owner=owner)
                yield item
        finally:
            self._owners.pop(id(owner), None)

    # -- load and admission ---------------------------------------------------------------------------------------
    def load(self, now: float | None = None) -> float:
        """The fraction of the last `window` seconds in which some stream's work was under way (see the top)."""
        now = time.monotonic() if now is None else now
        with self._cv:
            spans = [*self._busy, *((start, now) for start, _ in self._running.values())]
        return covered(spans, now - self.window, now) / self.window

    def admits(self, margin: float = 0.9) -> tuple[bool, str]:
        """Whether one more paced stream fits: (yes/no, the reason in words)."""
        if self.failure is not None:
            return False, f"the device failed: {self.failure}"
        n, load = len(self._owners), self.load()
        if n == 0:
            return True, "idle"
        projected = load * (n + 1) / n
        if projected > margin:
            return False, (f"{n} stream{' uses' if n == 1 else 's use'} {load:.0%} of the device; one more would need "
                           f"about {projected:.0%} (limit {margin:.0%})")
        return True, f"{load:.0%} in use, about {projected:.0%} with one more"

    # -- the worker thread ----------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"{self.name}-worker", daemon=True)
            self._thread.start()
            _STARTED.add(self)

    def _end(self) -> None:
        """At exit: let the job under way finish, then end the thread while the interpreter still runs. A daemon
        thread that frees a tensor once finalization has begun aborts the process ("terminate called without an
        active exception"), and this one frees what it last held of a stream when it next wakes."""
        with self._cv:
            self._exiting = True
            self._cv.notify()
        self._thread.join(EXIT_SECONDS)

    def _loop(self) -> None:
        while True:
            self._see_run()
            with self._cv:
                while not self._jobs and not self._polls and not self._running and not self._exiting:
                    self._cv.wait()
                if self._exiting:
                    return
                if not self._jobs:
                    self._cv.wait(POLL_SECONDS)
                job = heapq.heappop(self._jobs) if self._jobs else None
                polls = list(self._polls.items())
            if job is not None:
                self._run(job)
            for key, fn in polls:
                self._poll(key, fn)
            job = polls = fn = None  # keep nothing of an owner while idle: a closed stream's memory is freed now

    def _run(self, job: _Job) -> None:
        start = time.monotonic()
        try:
            job.result = job.fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller, which raises it)
            job.error = e
            if not self.healthy():
                self._fail(e)
        self._record(start, time.monotonic(), job.owner)
        job.done.set()

    def _poll(self, key: int, fn: Callable[[], bool]) -> None:
        try:
            more = fn()
        except Exception as e:  # noqa: BLE001 (the owner's next job meets the same failure and reports it)
            more = False
            if not self.healthy():
                self._fail(e)
        if not more:
            with self._cv:
                if self._polls.get(key) is fn:
                    del self._polls[key]

    def _record(self, start: float, end: float, owner: object) -> None:
        """A job ran from start to end; its owner's work is under way until the device has run it (`device_idle`)."""
        idle = getattr(owner, "device_idle", None)
        running = idle is not None and not _idle(idle)
        with self._cv:
            if running:  # (its span starts at the first of its jobs since its work last ran out)
                self._running[id(owner)] = (self._running.get(id(owner), (start,))[0], idle)
            else:
                self._spans(start, end)

    def _see_run(self) -> None:
        """Close the spans of the owners whose device work has all run (the worker thread, like `_record`)."""
        done = [(key, start) for key, (start, idle) in list(self._running.items()) if _idle(idle)]
        if done:
            now = time.monotonic()
            with self._cv:
                for key, start in done:
                    del self._running[key]
                    self._spans(start, now)

    def _spans(self, start: float, end: float) -> None:
        """Keep a span of work under way, and those that end in the last window (under the lock; ends come in
        order)."""
        self._busy.append((start, end))
        while self._busy and self._busy[0][1] < end - self.window:
            self._busy.popleft()

    def _fail(self, error: BaseException) -> None:
        """The device is gone: fail every waiting job now, and every later one at submission."""
        with self._cv:
            self.failure = error
            jobs, self._jobs = self._jobs, []
            self._polls.clear()
        for job in jobs:
            job.error = DeviceFailed(f"{self.name}: {error}")
            job.done.set()


@atexit.register
def _end_workers() -> None:
    for worker in list(_STARTED):
        worker._end()
