"""The `longsana` command. Each subcommand lives beside the code it drives and is imported only when used,
so `longsana --help` stays fast and a missing optional piece never breaks the others."""

from __future__ import annotations

import importlib
import os

import click

# Read when CUDA first allocates, so set before any command runs (a user's own setting wins): segments that grow in
# place keep the GPU memory reserved near what is allocated, and pinned host memory registered by 8 threads halves
# the time to allocate a stream's rewind points (2 GB each at 480p: 1.15 -> 0.62 s on an H100 host).
CUDA_ALLOC_CONF = "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"

# name -> "module:click_command"; a new subcommand is one line here.
COMMANDS: dict[str, str] = {
    "bench": "longsana.benchmarks.fps:bench_cmd",
    "convert": "longsana.loading:convert_cmd",
    "generate": "longsana.generate:generate_cmd",
    "serve": "longsana.streaming.server:serve_cmd",
    "train-demo": "longsana.demo.train:train_cmd",
}


class LazyGroup(click.Group):
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
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


if __name__ == "__main__":
    main()
