"""Answers render as markdown, safely: structure becomes elements, markup written by the model stays text.

One answer is forced with vLLM's structured outputs (a `choice` of exactly one string) so the page has known
markdown to render: a heading, a list with bold and inline code, a fenced code block holding a <script> and an
<img onerror> probe, a javascript: link and an https link. History's detail view and Compare must show the
structure as elements (web/js/markdown.js: marked, then DOMPurify), the probes as the characters they are, no
<script>/<img> element, no javascript: href, and the https link opening in a new tab with rel="noopener". History's
list preview stays plain text. The `ui` fixture fails a test on any alert() dialog, script error or CSP violation.

Run: `.venv/bin/python -m pytest -p no:cacheprovider -m browser tests/browser/test_markdown_ui.py -q`
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.browser_ui import UI

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

SCRIPT_PROBE = "<script>alert(1)</script>"
IMG_PROBE = "<img src=x onerror=alert(1)>"
LONG_LINE = "echo " + " ".join(["stepping-stone"] * 16)  # far wider than a phone
ANSWER = ("# Steps\n\n"
          "- first **bold** item\n"
          "- then `inline code`\n\n"
          f"```html\n{SCRIPT_PROBE}\n{IMG_PROBE}\n{LONG_LINE}\n```\n\n"
          "[a](javascript:alert(1)) and [b](https://example.com)")
SAFE_LINK = {"text": "b", "href": "https://example.com", "target": "_blank", "rel": "noopener noreferrer nofollow"}
# The javascript: link keeps its text and loses its href (so it is not a link at all).
DEAD_LINK = {"text": "a", "href": None, "target": None, "rel": None}
LINKS_JS = """(body) => [...body.querySelectorAll("a")].map((a) => ({text: a.textContent,
  href: a.getAttribute("href"), target: a.getAttribute("target"), rel: a.getAttribute("rel")}))"""


@pytest.fixture(scope="module")
def answer_id(api: httpx.Client, ui_service: Any) -> str:
    """A logged response whose completion is exactly ANSWER."""
    r = api.post("/v1/chat/completions", json={
        "model": ui_service.model, "messages": [{"role": "user", "content": "Write the steps as markdown."}],
        "max_tokens": 300, "temperature": 0, "structured_outputs": {"choice": [ANSWER]}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == ANSWER
    return choice["loop_response_id"]


def _assert_rendered_safely(page: Page, body: Locator, heading: str) -> None:
    """`body` is one rendered answer; `heading` is the element the answer's `#` must have become."""
    expect(body.locator(heading)).to_have_text("Steps")
    assert body.locator("h1").count() == 0, "an answer must not add an <h1> to the page outline"
    expect(body.locator("ul > li")).to_have_count(2)
    expect(body.locator("li strong")).to_have_text("bold")
    expect(body.locator("li code")).to_have_text("inline code")
    code = body.locator("pre > code")
    expect(code).to_have_count(1)
    expect(code).to_contain_text(SCRIPT_PROBE)
    expect(code).to_contain_text(IMG_PROBE)
    assert page.locator("main script, main img, main [onerror]").count() == 0
    assert body.locator("[style], [class], [onclick]").count() == 0, "answer markup carries no style or class"
    assert page.locator('main a[href^="javascript" i]').count() == 0
    assert body.evaluate(LINKS_JS) == [DEAD_LINK, SAFE_LINK]


def test_history_detail_renders_the_answer_as_markdown_and_probes_as_text(ui: UI, answer_id: str) -> None:
    page = ui.go(f"#/history/{answer_id}")
    body = page.locator(".detail .msg.assistant .msg-body")
    _assert_rendered_safely(page, body, "h3")  # under the detail view's "Answer" <h2>
    ui.shot("markdown")

    # On a phone a long code line scrolls inside its block: neither the block nor the answer grows past the screen.
    page.set_viewport_size({"width": 375, "height": 812})
    pre = body.locator("pre")
    expect(pre).to_contain_text(LONG_LINE)
    assert pre.evaluate("(el) => el.scrollWidth > el.clientWidth"), "the code line should scroll, not wrap"
    for what, box in (("code block", pre), ("answer", body)):
        right = box.evaluate("(el) => el.getBoundingClientRect().right")
        assert right <= 375, f"the {what} reaches {right}px on a 375px screen"

    # The list's preview is a clipped plain-text line: the markdown shows as written, nothing is an element.
    page.goto(f"{ui.base}/#/history?q=Steps")
    preview = page.locator(f'.resp-item[data-response-id="{answer_id}"] .resp-completion')
    expect(preview).to_contain_text("# Steps")
    assert preview.locator("*").count() == 0


def test_compare_renders_both_candidates_as_markdown(ui: UI, answer_id: str) -> None:
    page = ui.go(f"#/compare?a={answer_id}&b={answer_id}")
    cards = page.locator(".candidate .msg-body")
    expect(cards).to_have_count(2)
    for i in range(2):
        _assert_rendered_safely(page, cards.nth(i), "h2")  # directly under the view's <h1>
    ui.shot("markdown-compare")
