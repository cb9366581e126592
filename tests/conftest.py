"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests import what lives with the tools, not the library, by bare name: the model list (zoo) and
# the documentation renderers. Appended, not prepended, so tools/coverage.py cannot shadow the
# coverage package.
sys.path.append(str(REPO_ROOT / "tools"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared folder (``$MECQTK_SHARED`` or ``<repo>/../shared``), else skip."""
    override = os.environ.get("MECQTK_SHARED")
    path = Path(override) if override else REPO_ROOT.parent / "shared"
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path}/data; set MECQTK_SHARED to the shared folder")
    return path


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread: on a busy 2-core machine two OpenMP threads that wait
    on each other make small ops tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
