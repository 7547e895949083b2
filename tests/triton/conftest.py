"""Fixtures for the Triton tests; the tiny artifact comes from tests/conftest.py (`tiny_artifact`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded(tiny_artifact: Path):
    """The reference: the same artifact run in-process through the embedded API."""
    import runtime

    return runtime.load(tiny_artifact)
