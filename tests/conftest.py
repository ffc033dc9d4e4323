"""Shared fixtures for every test. Nothing here skips anything; plain helpers live in tests/support.py."""

from __future__ import annotations

import pytest

from tests.service import loop_factory, loop_service, openai_client  # noqa: F401 - fixtures shared by e2e and browser tests
from tests.support import free_port


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
