"""The device worker (worker.py) with stand-in jobs: one job at a time (so a capture never overlaps other work),
fairness, earliest deadline first, admission by load, and failures: a failing stream ends alone, a failed device
ends everything at once and says why. The real streams through it: tests/test_stream.py (and, on a GPU,
tests/test_engine.py's concurrent streams)."""

from __future__ import annotations

import threading
import time

import pytest

from longsana import worker as worker_mod
from longsana.worker import DeviceFailed, DeviceWorker, Later, covered


class Overlap:
    """Counts jobs running at once; `most` is the largest count seen."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def job(self, seconds: float):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1


def chunks(overlap: Overlap, seconds: float, n: int | None = None):
    """A stand-in stream: each chunk is `seconds` of device work."""
    i = 0
    while n is None or i < n:
        overlap.job(seconds)
        yield i
        i += 1


def consume(worker, owner, it, out: list, stop: threading.Event, pause: float = 0.0):
    for item in worker.iterate(it, owner=owner):
        out.append(item)
        if stop.is_set():
            return
        time.sleep(pause)


def test_one_job_at_a_time_and_no_stream_starves():
    worker, overlap, stop = DeviceWorker(), Overlap(), threading.Event()
    got = {k: [] for k in range(3)}
    threads = [threading.Thread(target=consume, args=(worker, k, chunks(overlap, 0.005), got[k], stop))
               for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    stop.set()
    for t in threads:
        t.join()
    counts = sorted(len(v) for v in got.values())
    assert overlap.most == 1  # never two jobs at once, though three threads ask all the time
    assert counts[0] >= 10 and counts[-1] - counts[0] <= 2, counts  # served in turn
    assert all(v == list(range(len(v))) for v in got.values())  # each stream's chunks in order


def test_earliest_deadline_first():
    worker, order, release = DeviceWorker(), [], threading.Event()
    blocker = threading.Thread(target=worker.run, args=(release.wait,))
    blocker.start()
    time.sleep(0.05)  # the worker is busy: the next jobs queue up
    threads = [threading.Thread(target=worker.run, args=(order.append, d), kwargs=dict(deadline=d))
               for d in (3.0, 1.0, 2.0)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    release.set()
    for t in [blocker, *threads]:
        t.join()
    assert order == [1.0, 2.0, 3.0]


def test_a_job_that_submits_a_job_runs_it_in_place():
    worker = DeviceWorker()
    assert worker.run(lambda: worker.run(lambda: 7) + 1) == 8


def test_later_work_runs_once_its_item_is_out_and_before_the_next_item():
    """An item that comes as Later(item, then) is handed out before `then` runs (here `then` waits until the consumer
    holds the item: had the item waited for it, the wait would time out), and the next item is made after `then`."""
    worker, log, held = DeviceWorker(), [], threading.Event()

    def then(i):
        log.append(("then", i, held.wait(timeout=5)))
        held.clear()

    def items():
        for i in range(3):
            log.append(("made", i))
            yield Later(i, lambda i=i: then(i))

    for i in worker.iterate(items()):
        log.append(("got", i))
        held.set()
    assert log == [e for i in range(3) for e in [("made", i), ("got", i), ("then", i, True)]]


def test_later_work_that_fails_raises_at_the_next_item():
    worker = DeviceWorker()

    def items():
        yield Later(0, lambda: 1 / 0)
        yield 1

    it = worker.iterate(items())
    assert next(it) == 0
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_polls_run_on_the_worker_between_jobs_until_they_are_done():
    """A poll (a stream's work waiting for room on the device) is called on the worker thread while it is idle and
    after jobs, never during one, until it returns False; one that raises is dropped, and the worker goes on."""
    worker, calls, overlap = DeviceWorker(), [], Overlap()

    def launch_more() -> bool:
        overlap.job(0.0)
        calls.append(threading.current_thread().name)
        return len(calls) < 5

    worker.poll(launch_more, owner="stream")
    for _ in range(3):
        worker.run(overlap.job, 0.01)
    deadline = time.monotonic() + 5
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(calls) == 5 and set(calls) == {"device-worker"} and overlap.most == 1
    worker.poll(lambda: 1 / 0, owner="stream")
    assert worker.run(lambda: 7) == 7 and worker.failure is None
    time.sleep(0.05)
    assert not worker._polls


def test_admission_by_load():
    assert DeviceWorker().admits() == (True, "idle")
    now = time.monotonic()

    def busy(streams: int) -> DeviceWorker:
        """A worker whose streams were each busy 0.4 s of every second over the window, one after the other."""
        worker = DeviceWorker(window=10.0)
        for k in range(streams):
            owner = object()
            worker._owners[id(owner)] = owner
            for s in range(10):
                worker._record(now - 10 + s + 0.5 * k, now - 10 + s + 0.5 * k + 0.4, owner)
        return worker

    two = busy(2)
    assert two.load(now) == pytest.approx(0.8)
    ok, why = two.admits(margin=0.9)
    assert not ok and "2 streams use 80%" in why and "120%" in why
    ok, why = busy(1).admits(margin=0.9)
    assert ok, why  # one stream at 40%: two would need about 80%


def test_paced_streams_show_their_load():
    """Streams paced by their consumers (40 ms of work, then a 60 ms pause): the measured load says so."""
    worker, overlap, stop = DeviceWorker(window=1.0), Overlap(), threading.Event()
    out = []
    t = threading.Thread(target=consume, args=(worker, "a", chunks(overlap, 0.04), out, stop, 0.06))
    t.start()
    time.sleep(1.5)
    load = worker.load()
    stop.set()
    t.join()
    assert 0.2 < load < 0.6, load


def test_spans_covered_count_overlaps_once_inside_the_window():
    assert covered([], 0.0, 10.0) == 0.0
    assert covered([(1.0, 3.0), (2.0, 4.0), (3.5, 3.8), (6.0, 7.0)], 0.0, 10.0) == pytest.approx(4.0)
    assert covered([(-5.0, 1.0), (9.0, 12.0)], 0.0, 10.0) == pytest.approx(2.0)  # clipped to [t0, t1]


class Launcher:
    """A stand-in stream whose jobs only launch device work, as the fast step's do on a GPU: it runs `seconds` after
    the job returns (`device_idle` says when it has)."""

    def __init__(self, seconds: float):
        self.seconds, self.until = seconds, 0.0

    def launch(self) -> None:
        self.until = time.monotonic() + self.seconds

    def device_idle(self) -> bool:
        return time.monotonic() >= self.until


def test_the_load_counts_a_streams_work_until_the_device_has_run_it():
    """Jobs that return at once but leave 0.3 s of device work each: the load counts the work, not the jobs' own
    microseconds, and two streams' work at the same time once. (Counted by the jobs' time, two paced streams on an
    H100 read 26% while they used about 78% of it, and a third was admitted.)"""
    worker = DeviceWorker(window=1.0)
    a, b = Launcher(0.3), Launcher(0.3)
    worker.run(a.launch, owner=a)
    worker.run(b.launch, owner=b)
    assert worker.load() > 0  # under way now
    time.sleep(0.6)
    assert worker.load() == pytest.approx(0.3, abs=0.08)
    assert not worker._running  # each span closed once its work ran


def test_a_failing_stream_ends_alone():
    worker, overlap, stop = DeviceWorker(), Overlap(), threading.Event()

    def failing():
        yield 0
        raise ValueError("step failed")

    good, bad, errors = [], [], []

    def run_bad():
        try:
            for item in worker.iterate(failing(), owner="bad"):
                bad.append(item)
        except ValueError as e:
            errors.append(e)

    t_good = threading.Thread(target=consume, args=(worker, "good", chunks(overlap, 0.002), good, stop))
    t_bad = threading.Thread(target=run_bad)
    t_good.start()
    t_bad.start()
    t_bad.join()
    n = len(good)
    time.sleep(0.1)
    stop.set()
    t_good.join()
    assert bad == [0] and [str(e) for e in errors] == ["step failed"]
    assert len(good) > n and worker.failure is None


def test_a_failed_device_ends_every_stream_and_says_why():
    alive = {"ok": True}
    worker = DeviceWorker("cuda:0", healthy=lambda: alive["ok"])
    release = threading.Event()
    results = []

    def waiting_job():
        try:
            worker.run(lambda: "never")
        except DeviceFailed as e:
            results.append(e)

    def poison():
        release.wait()
        alive["ok"] = False
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    t_poison = threading.Thread(target=lambda: pytest.raises(RuntimeError, worker.run, poison))
    t_poison.start()
    time.sleep(0.05)
    waiters = [threading.Thread(target=waiting_job) for _ in range(2)]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    release.set()
    for t in [t_poison, *waiters]:
        t.join(5)
    assert len(results) == 2 and all("illegal memory access" in str(e) for e in results)
    assert "illegal memory access" in str(worker.failure)
    with pytest.raises(DeviceFailed, match="cuda:0"):
        worker.run(lambda: 1)
    assert worker.admits()[0] is False


def test_a_worker_ends_its_thread_at_exit():
    """The exit hook (`_end_workers`, which ends every started worker) lets a worker end its thread while the
    interpreter still runs, even one that a poll keeps waking: a daemon thread that frees a tensor (what it last held
    of a closed stream) once finalization has begun aborts the process."""
    w = DeviceWorker()
    w.poll(lambda: True)
    assert w.run(lambda: 7) == 7
    assert w in worker_mod._STARTED and w._thread.is_alive()
    w._end()
    assert not w._thread.is_alive()

