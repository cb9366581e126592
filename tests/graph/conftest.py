"""Graph tests run torch on one thread: on a shared 2-core machine, two OpenMP threads that
wait on each other make small ops tens of times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
