"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's tensors are tiny: a second CPU thread only adds synchronization, and the second core is better
    left to the servers, browsers and subprocesses some tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
