"""The `longsana` command. Each subcommand lives beside the code it drives and is imported only when used,
so `longsana --help` stays fast and a missing optional piece never breaks the others.

Two things are done here, once, for every subcommand:
  - the process settings that native libraries read only when they load (the CUDA allocator's, cuBLAS's
    workspace, the CPU thread policy) are set before the subcommand's module, and with it torch, is imported; a
    user's own setting wins;
  - the errors that library code raises for bad input (ValueError, CheckpointError, OSError: a file that is
    missing, unreadable, unwritable) become one line of error and exit status 1, not a traceback.
"""

from __future__ import annotations

import importlib
import os

import click

# Read when CUDA first allocates: segments that grow in place keep the GPU memory reserved near what is allocated,
# and pinned host memory registered by 8 threads halves the time to allocate a stream's rewind points (2 GB each at
# 480p: 1.15 -> 0.62 s on an H100 host).
CUDA_ALLOC_CONF = "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"

# Read when cuBLAS first runs: no workspace. With one, cuBLAS splits the reduction of GEMMs such as a pass's
# 15,600 x 2240 x 2240 and zeroes the workspace with a memset first; in a CUDA graph the driver's launch waits on
# memset nodes, so the launch of a chunk's graph (1,199 memsets beside 3,600 kernels) held the host about 350 ms of
# its 610 ms on an H100. Without: 105 memsets (probably cuDNN's attention), the launch returns in 0.5 ms and the
# graph runs as fast (606-643 ms against 648 ms; benchmarks/RESULTS.md, 6 Dec).
CUBLAS_WORKSPACE = ":0:0"

# What library code raises for bad input (CheckpointError and UnicodeError are ValueErrors).
INPUT_ERRORS = (ValueError, OSError)


def cpu_threads() -> int:
    """torch's CPU threads: half the CPUs this process may run on, at least one. OpenMP threads that wait for each
    other spin, so when another process takes a core, a pool as wide as the machine stalls at every one of the
    demo's thousands of small ops a second: on a 2-core CPU with one core busy, 2 threads streamed the demo at
    17-22 FPS (2.4 in issue 20), 1 thread at 55-74 (benchmarks/RESULTS.md). OMP_WAIT_POLICY=PASSIVE also cures that
    but halves the speed on an idle machine (every op waits for a sleeping thread to wake). With two hardware threads
    a core, half the CPUs is the one thread per core that torch takes by default; elsewhere it leaves the other half
    to the server's video encoding and to a browser playing the stream."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // 2)


def process_defaults() -> dict[str, str]:
    """Settings read once, when torch (its OpenMP runtime), CUDA's allocator or cuBLAS loads."""
    return {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF, "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE,
            "OMP_NUM_THREADS": str(cpu_threads())}

# name -> "module:click_command"; a new subcommand is one line here.
COMMANDS: dict[str, str] = {
    "bench": "longsana.benchmarks.fps:bench_cmd",
    "bench-cpu": "longsana.benchmarks.cpu_stream:bench_cpu_cmd",
    "convert": "longsana.loading:convert_cmd",
    "generate": "longsana.generate:generate_cmd",
    "serve": "longsana.streaming.server:serve_cmd",
    "train-demo": "longsana.demo.train:train_cmd",
}


def set_process_defaults(environ=os.environ) -> None:
    """Before torch is imported; a user's own setting of any of them wins."""
    for name, value in process_defaults().items():
        environ.setdefault(name, value)


class LazyGroup(click.Group):
    def main(self, *args, **kwargs):
        set_process_defaults()  # before get_command imports a subcommand's module
        return super().main(*args, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # click's main handles a closed stdout itself
            raise
        except INPUT_ERRORS as e:
            raise click.ClickException(str(e)) from e

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="longsana")
def main():
    """LongSANA: stream endless videos from a prompt, in real time."""


if __name__ == "__main__":
    main()
