"""Suite-wide settings."""

import os

import pytest
import torch

from longsana.cli import CUBLAS_WORKSPACE

# The GPU tests' GEMMs as the command runs them (cli.py): read when cuBLAS first runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's tensors are tiny: a second CPU thread only adds synchronization, and the second core is better
    left to the servers, browsers and subprocesses some tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
