"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared folder (``$MECQTK_SHARED`` or ``<repo>/../shared``), else skip."""
    override = os.environ.get("MECQTK_SHARED")
    path = Path(override) if override else REPO_ROOT.parent / "shared"
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path}/data; set MECQTK_SHARED to the shared folder")
    return path
