"""Helpers for the browser tests: one page on the service (`UI`), screenshots, error, CSP-violation and dialog
capture.

Kept out of conftest.py so test modules can import them (`from browser_ui import UI, open_ui`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}


@dataclass
class UI:
    """One browser page on the service, with what went wrong in it."""

    page: Page
    base: str
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def go(self, route: str) -> Page:
        self.page.goto(f"{self.base}/{route}")
        self.page.wait_for_selector("main h1")
        return self.page

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")  # else the sticky header lands mid-image
        self.page.screenshot(path=str(path), full_page=True)
        return path


def open_ui(browser: Browser, base: str, **context_args: Any) -> tuple[UI, BrowserContext]:
    """A fresh context + page; JS errors and dialogs (alert/confirm) are recorded on the returned UI."""
    context = browser.new_context(accept_downloads=True, **({"viewport": DESKTOP} | context_args))
    context.set_default_timeout(60_000)
    page = context.new_page()
    ui = UI(page=page, base=base)
    page.on("pageerror", lambda exc: ui.page_errors.append(str(exc)))
    # A Content-Security-Policy violation throws nothing: the browser only reports it on the console.
    page.on("console", lambda msg: ui.page_errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)

    def on_dialog(dialog: Any) -> None:
        ui.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return ui, context
