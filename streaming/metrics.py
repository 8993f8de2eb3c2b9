"""Server metrics in the Prometheus text exposition format (0.0.4), written by hand: a dozen counters, gauges and
sum/count summaries do not need a client library. Counters are updated from the event loop and from the stream
threads, hence the lock. The process gauges (resident memory, open files, threads, Python's heap) are what the soak
test watches.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import defaultdict

# name -> (type, help). Summaries are exported as <name>_sum and <name>_count.
SPECS = {
    "longsana_streams_active": ("gauge", "Streams holding a generator, including ones shutting down."),
    "longsana_streams_limit": ("gauge", "Configured maximum of concurrent streams."),
    "longsana_streams_started_total": ("counter", "Streams started."),
    "longsana_streams_rejected_total": ("counter", "Stream requests refused, by reason."),
    "longsana_stream_failures_total": ("counter", "Streams ended by an exception, by stage."),
    "longsana_chunks_generated_total": ("counter", "Chunks produced by the generator."),
    "longsana_frames_generated_total": ("counter", "Video frames produced by the generator."),
    "longsana_generation_seconds_total": ("counter", "Wall time the generator spent producing chunks."),
    "longsana_frames_sent_total": ("counter", "Video frames sent to viewers, by transport."),
    "longsana_sent_bytes_total": ("counter", "Encoded video bytes sent to viewers, by transport."),
    "longsana_messages_total": ("counter", "Control messages received, by type."),
    "longsana_message_errors_total": ("counter", "Control messages refused, by error code."),
    "longsana_http_requests_total": ("counter", "HTTP requests, by status."),
    "longsana_time_to_first_frame_seconds": ("summary", "From stream request to its first frame being sent."),
    "longsana_prompt_switch_seconds": ("summary", "From a prompt change to the first frame sent that uses it."),
    "process_resident_memory_bytes": ("gauge", "Resident memory of the server process."),
    "process_open_fds": ("gauge", "Open file descriptors of the server process."),
    "process_threads": ("gauge", "Threads of the server process."),
    "python_allocated_blocks": ("gauge", "Blocks held by the Python allocator: grows when Python objects leak."),
}


class Metrics:
    def __init__(self):
        self._values: dict[tuple[str, tuple], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[name, tuple(sorted(labels.items()))] += value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._values[name + "_sum", ()] += seconds
            self._values[name + "_count", ()] += 1

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; `gauges` are the current values of the gauges the server owns."""
        with self._lock:
            values = dict(self._values)
        values.update({(name, ()): v for name, v in {**gauges, **process_gauges()}.items()})
        out = []
        for name, (kind, text) in SPECS.items():
            series = [name + "_sum", name + "_count"] if kind == "summary" else [name]
            rows = [(s, labels, v) for (s, labels), v in sorted(values.items()) if s in series]
            if kind == "summary" and not rows:
                rows = [(s, (), 0.0) for s in series]
            if not rows:
                continue
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for s, labels, v in rows:
                label_text = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
                out.append(f"{s}{{{label_text}}} {_number(v)}" if labels else f"{s} {_number(v)}")
        return "\n".join(out) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(float(v))


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def process_gauges() -> dict[str, float]:
    """Python's allocated blocks; RSS, open fds and OS threads (native codec threads included) from /proc."""
    gauges = {"python_allocated_blocks": sys.getallocatedblocks()}
    if os.path.exists("/proc/self/status"):  # Linux
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        gauges.update(process_resident_memory_bytes=int(status["VmRSS"].split()[0]) * 1024,
                      process_open_fds=len(os.listdir("/proc/self/fd")), process_threads=int(status["Threads"]))
    return gauges
