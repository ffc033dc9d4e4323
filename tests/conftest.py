"""Shared fixtures for every test. Nothing here skips anything; plain helpers live in tests/support.py."""

from __future__ import annotations

import pytest

from support import free_port


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
