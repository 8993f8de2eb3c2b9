"""The server and the device worker (longsana/worker.py): on a GPU a new stream is admitted only while the streams
already running leave room for it to be real time (busy, with the reason, otherwise), and a device that failed
shows on /health. Stand-ins: a synthetic source that says it is on a GPU, with a worker whose load is set."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import pytest
import torch

from longsana.streaming.client import Refused, WsClient, get
from longsana.streaming.server import ServerConfig, ServerThread
from longsana.streaming.synthetic import SyntheticPipeline
from longsana.worker import DeviceWorker

FOX = "a red fox trotting through snow"


@dataclass
class GpuStandIn(SyntheticPipeline):
    device: torch.device = torch.device("cuda")
    worker: DeviceWorker = field(default_factory=lambda: DeviceWorker("cuda:0", window=10.0))

    def busy_for(self, streams: int, load: float) -> None:
        """As if `streams` paced streams had kept the device busy `load` of the last window."""
        now = time.monotonic()
        for k in range(streams):
            owner = object()
            self.worker._owners[id(owner)] = owner
        self.worker._record(now - self.worker.window * load, now, None)


def health(url: str) -> tuple[int, dict]:
    status, _, body = get(url + "health")
    return status, json.loads(body)


def test_a_stream_is_refused_when_the_gpu_is_full():
    pipe = GpuStandIn()
    with ServerThread(pipe, ServerConfig(port=0, max_streams=4)) as server:
        async def main():
            async with await WsClient.connect(server.url, FOX, decode=False) as c:  # an idle device admits
                await c.wait_until(lambda: len(c.frames) >= 4)
            pipe.busy_for(2, 0.8)  # two streams at 40% each: a third would need 120%
            with pytest.raises(Refused) as refused:
                await WsClient.connect(server.url, FOX, decode=False)
            return refused.value.reply

        reply = asyncio.run(asyncio.wait_for(main(), 60))
    assert reply["code"] == "busy" and "would not be real time on this GPU" in reply["message"]
    assert "2 streams use 80%" in reply["message"]


def test_health_reports_a_failed_device():
    pipe = GpuStandIn()
    with ServerThread(pipe, ServerConfig(port=0)) as server:
        status, body = health(server.url)
        assert status == 200 and body["status"] == "ok"
        pipe.worker.failure = RuntimeError("CUDA error: an illegal memory access was encountered")
        status, body = health(server.url)
    assert status == 503 and body["status"] == "failed" and "illegal memory access" in body["reason"]
