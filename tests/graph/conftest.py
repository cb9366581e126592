"""Graph tests run torch on one thread (fixture in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _graph_tests_on_one_thread(one_torch_thread):
    yield
