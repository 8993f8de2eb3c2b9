"""The server with several GPU workers (streaming/gpus.py), through a real server and WebSocket clients. Stand-in
workers: processes running the synthetic source (`GpuPool(..., "synthetic")`, as `longsana serve --model synthetic
--gpus 0,1` starts), which need no GPU. Placement on the least loaded worker, admission across the workers, a
worker's crash (SIGKILL) that ends only its own streams, its restart and the bound on restarts, /metrics per GPU,
and the frames' way across, in shared memory: equal to what the worker made, and no block left behind."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from longsana.streaming.client import Refused, WsClient
from longsana.streaming import gpus
from longsana.streaming.gpus import GpuPool
from longsana.streaming.server import ServerConfig, ServerThread
from longsana.streaming.synthetic import SyntheticPipeline

FOX, OWL = "a red fox trotting through snow", "an owl in a pine tree"
SMALL = {"height": 64, "width": 64}
pytestmark = pytest.mark.slow  # each starts two worker processes and streams for a few seconds


@contextmanager
def serving(per_worker: int, max_streams: int = 8):
    """A server over two synthetic workers, each taking at most `per_worker` streams."""
    pool = GpuPool([(0,), (1,)], "synthetic", max_streams=per_worker)
    with pool, ServerThread(pool, ServerConfig(port=0, max_streams=max_streams, stream_kwargs=SMALL)) as server:
        yield pool, server


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def health(server) -> dict:
    return json.loads(get(server.url + "health"))


def gpu_of(server, client: WsClient) -> str:
    """The worker (its GPU's name) the client's stream was placed on."""
    return server.server.sessions[client.session].pipe.name


def streams_per_gpu(server) -> dict[str, int]:
    return {g["gpu"]: g["streams"] for g in health(server)["gpus"]}


def gpu_health(server, name: str) -> dict:
    return next(g for g in health(server)["gpus"] if g["gpu"] == name)


def restarts_metric(server, name: str) -> float:
    return series(get(server.url + "metrics"))[f'longsana_gpu_restarts_total{{gpu="{name}"}}']


async def crash(pool, server, client: WsClient) -> str:
    """SIGKILL the worker the client's stream runs on; once the client has its `end`, that worker's name."""
    name = gpu_of(server, client)
    os.kill(next(w for w in pool.workers if w.name == name).process.pid, signal.SIGKILL)
    await client.wait_until(lambda: any(e["type"] == "end" for e in client.events))
    return name


async def wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def run(main) -> None:
    asyncio.run(asyncio.wait_for(main, 60))


def blocks(pids) -> list[str]:
    """The shared-memory blocks (their names) that the worker processes `pids` have in /dev/shm."""
    stems = tuple(gpus.block_stem(pid) for pid in pids)
    return sorted(name for name in os.listdir(gpus.SHM_DIR) if name.startswith(stems))


def mapped() -> list[str]:
    """The blocks of ours this process (the server) maps, by name."""
    with open("/proc/self/maps") as f:
        paths = [line.split()[5] for line in f if os.path.join(gpus.SHM_DIR, gpus.SHM_PREFIX) in line]
    return sorted(set(map(os.path.basename, paths)))


def test_streams_go_to_the_least_loaded_worker():
    """Four streams on two workers with room for four each: two and two, not four on the first."""
    async def main(server):
        clients = [await WsClient.connect(server.url, FOX, decode=False) for _ in range(4)]
        assert streams_per_gpu(server) == {"0": 2, "1": 2}
        assert sorted(gpu_of(server, c) for c in clients) == ["0", "0", "1", "1"]
        for c in clients:  # each is streaming from its worker
            await c.wait_until(lambda c=c: len(c.frames) >= 8)
        for c in clients:
            await c.close()

    with serving(per_worker=4) as (_, server):
        run(main(server))


def test_admission_counts_every_worker():
    """One stream a worker: a third viewer is busy, with each GPU's reason; once a stream ends, the next viewer
    is placed on the worker that has room again."""
    async def main(server):
        a = await WsClient.connect(server.url, FOX, decode=False)
        b = await WsClient.connect(server.url, OWL, decode=False)
        assert {gpu_of(server, a), gpu_of(server, b)} == {"0", "1"}
        with pytest.raises(Refused) as refused:
            await WsClient.connect(server.url, FOX, decode=False)
        message = refused.value.reply["message"]
        assert refused.value.reply["code"] == "busy" and "GPU 0: 1 of 1 streams" in message, message
        assert "GPU 1: 1 of 1 streams" in message, message
        freed = gpu_of(server, a)
        await a.close()
        await wait_for(lambda: health(server)["streams"] == 1)
        c = await WsClient.connect(server.url, FOX, decode=False)
        assert gpu_of(server, c) == freed
        await c.wait_until(lambda: len(c.frames) >= 8)
        for client in (b, c):
            await client.close()

    with serving(per_worker=1) as (_, server):
        run(main(server))


def test_a_worker_crash_ends_only_its_streams(monkeypatch):
    """SIGKILL one worker: its viewer gets an error and an `end` naming the GPU and how its worker ended, its slot
    frees, /health says degraded (the worker restarting); the other worker's viewer keeps receiving frames, and new
    streams go there. Closing the pool while the worker waits to restart leaves no process behind."""
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 60.0)  # restarting all through the test

    async def main(pool, server):
        a = await WsClient.connect(server.url, FOX, decode=False)
        b = await WsClient.connect(server.url, OWL, decode=False)
        for c in (a, b):
            await c.wait_until(lambda c=c: len(c.frames) >= 8)
        crashed = next(w for w in pool.workers if w.name == gpu_of(server, a))
        os.kill(crashed.process.pid, signal.SIGKILL)
        await a.wait_until(lambda: any(e["type"] == "end" for e in a.events))
        end = next(e for e in a.events if e["type"] == "end")
        assert f"the GPU {crashed.name} worker" in end["reason"] and "killed by SIGKILL" in end["reason"], end
        assert any("killed by SIGKILL" in e["message"] for e in a.errors()), a.events
        await wait_for(lambda: health(server)["streams"] == 1)
        state = health(server)
        assert state["status"] == "degraded" and f"GPU {crashed.name} worker" in state["reason"], state
        assert gpu_health(server, crashed.name)["status"].startswith("restarting (attempt 1): "), state

        before = len(b.frames)  # the other stream goes on
        await asyncio.sleep(1.5)
        assert len(b.frames) >= before + 12, (before, len(b.frames))
        assert not any(e["type"] == "end" for e in b.events)
        c = await WsClient.connect(server.url, FOX, decode=False)  # placed on the worker that lives
        assert gpu_of(server, c) == gpu_of(server, b)
        await c.wait_until(lambda: len(c.frames) >= 8)
        for client in (b, c):
            await client.close()

    with serving(per_worker=2) as (pool, server):
        run(main(pool, server))
    assert multiprocessing.active_children() == []


def test_a_dead_worker_comes_back(monkeypatch):
    """SIGKILL one worker: its viewer ends as above, then a new process takes its place (ok again, restarts 1, a
    new pid, counted in /metrics) and takes streams: with the other worker full, a new viewer goes to it."""
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 0.1)

    async def main(pool, server):
        a = await WsClient.connect(server.url, FOX, decode=False)
        b = await WsClient.connect(server.url, OWL, decode=False)
        await a.wait_until(lambda: len(a.frames) >= 4)
        pid = gpu_health(server, gpu_of(server, a))["pid"]
        crashed = await crash(pool, server, a)
        assert "killed by SIGKILL" in next(e for e in a.events if e["type"] == "end")["reason"]
        await wait_for(lambda: gpu_health(server, crashed)["status"] == "ok")
        back = gpu_health(server, crashed)
        assert back["restarts"] == 1 and back["pid"] != pid, back
        assert health(server)["status"] == "ok"
        assert restarts_metric(server, crashed) == 1 and restarts_metric(server, gpu_of(server, b)) == 0
        c = await WsClient.connect(server.url, FOX, decode=False)  # b fills the other worker: c must go here
        assert gpu_of(server, c) == crashed
        await c.wait_until(lambda: len(c.frames) >= 8)
        assert not any(e["type"] == "end" for e in b.events)
        for client in (b, c):
            await client.close()

    with serving(per_worker=1) as (pool, server):
        run(main(pool, server))


def test_a_worker_that_keeps_dying_stays_down(monkeypatch, tmp_path):
    """Once started, every new worker process exits at once (a sitecustomize that Python runs at startup, through
    PYTHONPATH, which spawned processes inherit): the restarts back off (0.1 s, then 1 s), after MAX_RESTARTS
    the worker stays down, /health says why, and streams go to the other worker."""
    monkeypatch.setattr(gpus, "MAX_RESTARTS", 2)
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 0.1)
    monkeypatch.setattr(gpus, "RESTART_BACKOFF", 10.0)

    async def main(pool, server):
        a = await WsClient.connect(server.url, FOX, decode=False)
        (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
        crashed = await crash(pool, server, a)
        await wait_for(lambda: gpu_health(server, crashed)["status"].startswith("down: "))
        # The waits, judged from when the supervisor began each restart (the client hears of the crash later, on a
        # busy machine after the first wait may have passed): 0.1 s before the first, 1 s before the second.
        first, second = next(s for s in pool.supervisors if s.name == crashed)._recent
        assert second - first >= 0.1 and time.monotonic() - second >= 1.0
        await asyncio.sleep(0.5)  # no further attempt
        down = gpu_health(server, crashed)
        assert down["restarts"] == 2 and restarts_metric(server, crashed) == 2, down
        assert "2 restarts within 600 s" in down["status"] and "exit code 3" in down["status"], down
        state = health(server)
        assert state["status"] == "degraded" and f"GPU {crashed}: down: " in state["reason"], state
        c = await WsClient.connect(server.url, FOX, decode=False)
        assert gpu_of(server, c) != crashed
        await c.close()

    with serving(per_worker=1) as (pool, server):
        run(main(pool, server))


def test_closing_during_a_restart_leaves_no_process(monkeypatch):
    """The pool closes while a new worker process loads its model: that process is stopped too."""
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 0.01)
    with GpuPool([(0,), (1,)], "synthetic") as pool:
        old = pool.workers[0]
        old.process.kill()
        deadline = time.monotonic() + 10
        while pool.workers[0] is old:
            assert time.monotonic() < deadline, "no restart"
            time.sleep(0.01)
        new = pool.workers[0]
        assert pool.supervisors[0].state.startswith("restarting (attempt 1): ")
    assert new.process.exitcode is not None and multiprocessing.active_children() == []


class FakeWorker:
    """A GpuWorker without a process, for the supervisor alone: ready at once, stop() remembered."""

    def __init__(self, on_lost):
        self.on_lost, self.problem, self.stopped = on_lost, None, None

    def wait_ready(self, timeout: float) -> dict:
        return {}

    def stop(self, how: str = "was stopped") -> None:
        self.stopped = how


def test_a_failed_device_is_replaced_at_once(monkeypatch):
    """A worker whose device reports a sticky failure still runs: it is stopped at once (its streams told why, as
    they cannot go on) and a new one takes its place."""
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 0.01)
    started = []
    supervisor = gpus.Supervisor((0,), lambda on_lost: started.append(FakeWorker(on_lost)) or started[-1], 1.0)
    failed = started[0]
    failed.problem = "the device failed: DeviceFailed: CUDA error: an illegal memory access was encountered"
    failed.on_lost(failed)
    deadline = time.monotonic() + 5
    while supervisor.state != "ok":
        assert time.monotonic() < deadline, supervisor.state
        time.sleep(0.01)
    assert failed.stopped == f"was stopped: {failed.problem}"
    assert supervisor.worker is started[1] and supervisor.restarts == 1 and started[1].stopped is None
    supervisor.close()
    assert started[1].stopped == "was stopped"


def test_metrics_per_gpu():
    async def main(pool, server):
        c = await WsClient.connect(server.url, FOX, decode=False)
        await c.wait_until(lambda: len(c.frames) >= 8)
        on, idle = gpu_of(server, c), ({"0", "1"} - {gpu_of(server, c)}).pop()
        metrics = series(get(server.url + "metrics"))
        assert metrics[f'longsana_gpu_streams{{gpu="{on}"}}'] == 1
        assert metrics[f'longsana_gpu_streams{{gpu="{idle}"}}'] == 0
        assert metrics['longsana_gpu_up{gpu="0"}'] == metrics['longsana_gpu_up{gpu="1"}'] == 1
        assert 'longsana_gpu_load{gpu="0"}' in metrics and 'longsana_gpu_load{gpu="1"}' in metrics
        await c.close()
        pool.workers[1].process.kill()
        await wait_for(lambda: series(get(server.url + "metrics"))['longsana_gpu_up{gpu="1"}'] == 0)

    with serving(per_worker=2) as (pool, server):
        run(main(pool, server))


def test_frames_cross_in_shared_memory():
    """A worker's chunks arrive as it made them (the synthetic source, made again here), through one block per
    stream that the server keeps mapped: reused while the chunks fit, replaced by a larger one (and the server's
    mapping moved to it) when one does not (8, then 24 frames), gone and unmapped once the stream closes."""
    sizes, kwargs = (8, 24, 4), {"seed": 3, "height": 48, "width": 80}
    with GpuPool([(0,)], "synthetic") as pool:
        pid = pool.workers[0].process.pid
        remote = pool.workers[0].stream(FOX, chunk_frames=sizes, **kwargs)
        made = SyntheticPipeline(delay=0.0).stream(FOX, chunk_frames=sizes, **kwargs)
        seen = []
        for _, got, want in zip(range(7), remote, made):
            assert np.array_equal(got.frames, want.frames), got.index
            assert (got.index, got.start_frame, got.prompt) == (want.index, want.start_frame, want.prompt)
            seen.append(blocks([pid]))
            assert mapped() == seen[-1]
        assert [len(got) for got in seen] == [1] * 7 and seen[0] != seen[1] and seen[1:] == [seen[1]] * 6, seen
        assert os.path.getsize(os.path.join(gpus.SHM_DIR, seen[1][0])) == 24 * 48 * 80 * 3
        remote.close()
        made.close()
        assert blocks([pid]) == [] and mapped() == []


def test_a_switch_in_a_worker():
    """set_prompt crosses to the worker and back with the request's id and where it lands (the synthetic source's
    switches land at its next chunk: nowhere named), in one call; the next chunk answers it."""
    with GpuPool([(0,)], "synthetic") as pool:
        remote = pool.workers[0].stream(FOX, **SMALL)
        chunks = iter(remote)
        next(chunks)
        request = remote.set_prompt(OWL, at_frame=0)
        assert isinstance(request, int) and remote.landing(request) is None and remote.landing(request + 1) is None
        chunk = next(chunks)
        assert (chunk.prompt, chunk.request) == (OWL, request)
        remote.close()


def test_no_block_left_behind(monkeypatch):
    """Whichever way a stream ends, its block is gone from /dev/shm and the server maps it no more: its viewer
    leaves, its viewer's connection drops, its worker is killed (SIGKILL: the server unlinks what it left) and
    restarted."""
    monkeypatch.setattr(gpus, "RESTART_DELAY_SECONDS", 0.1)

    async def streaming(server, prompt: str, pids: list[int]) -> WsClient:
        c = await WsClient.connect(server.url, prompt, decode=False)
        await c.wait_until(lambda: len(c.frames) >= 4)
        assert len(blocks(pids)) == 1 and mapped() == blocks(pids)  # the test looks where the blocks are
        return c

    async def nothing_left(pids: list[int]) -> None:
        await wait_for(lambda: blocks(pids) == [] and mapped() == [])

    async def main(pool, server):
        pids = [w.process.pid for w in pool.workers]
        await (await streaming(server, FOX, pids)).close()
        await nothing_left(pids)
        (await streaming(server, OWL, pids)).abort()
        await nothing_left(pids)
        c = await streaming(server, FOX, pids)
        crashed = await crash(pool, server, c)
        await wait_for(lambda: gpu_health(server, crashed)["status"] == "ok")
        pids += [w.process.pid for w in pool.workers]
        await nothing_left(pids)

    with serving(per_worker=2) as (pool, server):
        run(main(pool, server))


SERVER_THAT_EXITS = """
import os, signal, time
from longsana.streaming.gpus import GpuPool

with GpuPool([(0,)], "synthetic", start_timeout=60) as pool:
    stream = pool.workers[0].stream("a fox", height=32, width=32)
    next(iter(stream))
    stream.close()
    killed = pool.workers[0]
    next(iter(pool.workers[0].stream("an owl", height=32, width=32)))
    os.kill(killed.process.pid, signal.SIGKILL)
    while pool.workers[0] is killed or pool.supervisors[0].state != "ok":  # restarting
        time.sleep(0.05)
    next(iter(pool.workers[0].stream("a fox", height=32, width=32)))  # open as the pool closes
    print(killed.process.pid, pool.workers[0].process.pid, flush=True)
"""


def test_the_server_exits_with_no_block_and_no_warning():
    """A server process whose streams closed, whose worker was killed mid-stream and restarted, and which exits
    with a stream open: once it has exited, no block of its workers' is left, and the resource tracker (the
    server's, which its workers share) had nothing to unlink or warn about."""
    done = subprocess.run([sys.executable, "-c", SERVER_THAT_EXITS], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])  # this checkout's longsana
    assert done.returncode == 0, done.stderr
    pids = list(map(int, done.stdout.split()))
    assert len(pids) == 2 and blocks(pids) == [], (pids, blocks(pids))
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr


def series(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}
