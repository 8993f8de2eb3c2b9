"""Server metrics through prometheus_client, in a registry of each server's own (tests run several servers in one
process). The series are the ones dashboards and the tests read; counters are updated from the event loop and from
the stream threads (prometheus_client is thread-safe). The process gauges (resident memory, open files, threads,
Python's heap) are what the soak test watches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, Summary
from prometheus_client.exposition import generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # generate_latest's format, which every Prometheus reads
prometheus_client.disable_created_metrics()  # no *_created series: the same series as before prometheus_client

# name -> (type, help, label names). process_resident_memory_bytes and process_open_fds come from ProcessCollector.
SPECS = {
    "longsana_streams_active": ("gauge", "Streams holding a generator, including ones shutting down.", ()),
    "longsana_streams_limit": ("gauge", "Configured maximum of concurrent streams.", ()),
    "longsana_streams_started_total": ("counter", "Streams started.", ()),
    "longsana_streams_rejected_total": ("counter", "Stream requests refused, by reason.", ("reason",)),
    "longsana_stream_failures_total": ("counter", "Streams ended by an exception, by stage.", ("stage",)),
    "longsana_chunks_generated_total": ("counter", "Chunks produced by the generator.", ()),
    "longsana_frames_generated_total": ("counter", "Video frames produced by the generator.", ()),
    "longsana_generation_seconds_total": ("counter", "Wall time the generator spent producing chunks.", ()),
    "longsana_frames_sent_total": ("counter", "Video frames sent to viewers, by transport.", ("transport",)),
    "longsana_sent_bytes_total": ("counter", "Encoded video bytes sent to viewers, by transport.", ("transport",)),
    "longsana_messages_total": ("counter", "Control messages received, by type.", ("type",)),
    "longsana_message_errors_total": ("counter", "Control messages refused, by error code.", ("code",)),
    "longsana_http_requests_total": ("counter", "HTTP requests, by status.", ("status",)),
    "longsana_time_to_first_frame_seconds": ("summary", "From stream request to its first frame being sent.", ()),
    "longsana_prompt_switch_seconds": ("summary", "From a prompt change to the first frame sent that uses it.", ()),
    # with several GPUs (streaming/gpus.py), a series per worker: gpu="0", or "0+1" for a worker spanning two
    "longsana_gpu_streams": ("gauge", "Streams placed on each GPU worker and not yet freed.", ("gpu",)),
    "longsana_gpu_load": ("gauge", "Share of the last 10 s each GPU worker's device spent in work.", ("gpu",)),
    "longsana_gpu_up": ("gauge", "1 while a GPU worker runs and its device works, else 0.", ("gpu",)),
    "longsana_gpu_restarts_total": ("counter", "GPU worker processes started to replace a lost one.", ("gpu",)),
    "process_threads": ("gauge", "Threads of the server process.", ()),
    "python_allocated_blocks": ("gauge", "Blocks held by the Python allocator: grows when Python objects leak.", ()),
}
KINDS = {"counter": Counter, "gauge": Gauge, "summary": Summary}


def process_threads() -> int:
    """OS threads, native codec threads included (0 where /proc is missing)."""
    if not os.path.exists("/proc/self/status"):
        return 0
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 0)


class Metrics:
    def __init__(self, gauges: dict[str, Callable[[], float]] | None = None):
        """`gauges`: the current values of the gauges the server owns (streams active, the limit)."""
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._series = {name: KINDS[kind](name, text, labels, registry=self.registry)
                        for name, (kind, text, labels) in SPECS.items()}
        callbacks = {"process_threads": process_threads, "python_allocated_blocks": sys.getallocatedblocks,
                     **(gauges or {})}
        for name, f in callbacks.items():
            self._series[name].set_function(f)

    def _child(self, name: str, labels: dict[str, str]):
        series = self._series[name]
        return series.labels(**labels) if labels else series

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, labels).inc(value)

    def watch(self, name: str, f: Callable[[], float], **labels: str) -> None:
        """The gauge `name` (with these labels) reads f() whenever the metrics are read."""
        self._child(name, labels).set_function(f)

    def observe(self, name: str, seconds: float) -> None:
        self._series[name].observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """A series' current value (0 if it has none yet), for tests and checks."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        """The exposition text (format 0.0.4)."""
        return generate_latest(self.registry)
