"""Open WebUI end to end: the real `open-webui` package (its own virtualenv: `bash tests/openwebui/install.sh`),
started offline by this test with loop's `/v1` as its OpenAI connection, chats through loop the way its web UI does,
its user gives a thumb up with a comment, `loop openwebui sync` pulls it, and loop's API shows the rating on the
exact response loop logged for that answer, filed under `openwebui:<the user's email>`.

The virtualenv is LOOP_OPENWEBUI_VENV (default /tmp/loop-openwebui-venv). Without it the test fails in CI (CI=true)
and is skipped on a developer machine, like the PostgreSQL leg of the unit tests.
Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_openwebui_e2e.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service import Service
from tests.support import free_port, wait_for

# its fixture may wait up to an hour for the Open WebUI install that .ci/run starts beside the tests
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3900)]

VENV = Path(os.environ.get("LOOP_OPENWEBUI_VENV", "/tmp/loop-openwebui-venv"))
START_TIMEOUT_S = 300.0
USER = {"name": "Ada Rater", "email": "ada@example.com", "password": "a-long-test-password-1"}


@dataclass
class OpenWebUI:
    url: str
    log_path: Path
    proc: subprocess.Popen


def _wait_for_the_install() -> None:
    """.ci/run installs Open WebUI while the tests run and names a file its exit status lands in."""
    done = os.environ.get("LOOP_OPENWEBUI_INSTALL_DONE")
    if not done:
        return
    deadline = time.monotonic() + 3600
    while not Path(done).exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the Open WebUI install did not finish within an hour ({done} never appeared)")
        time.sleep(5)
    rc = Path(done).read_text().strip()
    if rc != "0":
        pytest.fail(f"the Open WebUI install failed (exit {rc}): see /tmp/loop-openwebui-install.log")


def _open_webui_bin() -> Path:
    _wait_for_the_install()
    exe = VENV / "bin" / "open-webui"
    if not exe.exists():
        why = f"open-webui is not installed in {VENV}: run `bash tests/openwebui/install.sh`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return exe


@pytest.fixture
def open_webui(loop_service: Service, tmp_path: Path) -> Iterator[OpenWebUI]:
    exe = _open_webui_bin()
    port = free_port()
    data = tmp_path / "open-webui"
    data.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_"))},
        "DATA_DIR": str(data),
        # offline: no model downloads, no update checks, no pip installs of plugin requirements
        "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "OPENAI_API_BASE_URL": f"{loop_service.url}/v1", "OPENAI_API_KEY": "unused-by-loop",
        "ENABLE_OLLAMA_API": "false",
        "ENABLE_API_KEYS": "true",  # the admin key `loop openwebui sync` uses
        "WEBUI_SECRET_KEY": uuid.uuid4().hex,
        # only the user's own completion reaches loop (no title/tags/follow-up requests through the same model)
        "ENABLE_TITLE_GENERATION": "false", "ENABLE_TAGS_GENERATION": "false",
        "ENABLE_FOLLOW_UP_GENERATION": "false", "ENABLE_AUTOCOMPLETE_GENERATION": "false",
    }
    log_path = tmp_path / "open-webui.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=data,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(f"{url}/health", START_TIMEOUT_S, proc=proc)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"open-webui did not start: {exc}\n{_tail(log_path)}") from exc
        yield OpenWebUI(url=url, log_path=log_path, proc=proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def test_an_open_webui_thumb_lands_on_the_exact_response(loop_service: Service, open_webui: OpenWebUI) -> None:
    ui = httpx.Client(base_url=open_webui.url, timeout=300)
    # The first account is Open WebUI's admin; its session token drives the UI's calls, its API key the sync.
    signup = ui.post("/api/v1/auths/signup", json=USER)
    assert signup.status_code == 200, signup.text
    assert signup.json()["role"] == "admin"
    ui.headers["Authorization"] = f"Bearer {signup.json()['token']}"
    key = ui.post("/api/v1/auths/api_key")
    assert key.status_code == 200, key.text
    models = ui.get("/api/models")
    assert models.status_code == 200, models.text
    assert loop_service.model in [m["id"] for m in models.json()["data"]], models.text

    # A new chat as the UI starts one: the completion names its user message and the assistant message to be, and
    # sends no `messages` (Open WebUI builds the conversation from its own database, as for its web UI).
    marker = uuid.uuid4().hex[:8]
    question = f"Say hello to {marker}."
    user_id, answer_id = str(uuid.uuid4()), str(uuid.uuid4())
    user_message = {"id": user_id, "parentId": None, "childrenIds": [], "role": "user", "content": question,
                    "timestamp": int(time.time()), "models": [loop_service.model]}
    done = ui.post("/api/chat/completions", json={
        "stream": False, "model": loop_service.model,
        "params": {"max_tokens": 12, "temperature": 0}, "features": {}, "id": answer_id, "parent_id": None,
        "user_message": user_message, "background_tasks": {}})
    assert done.status_code == 200, done.text
    body = done.json()
    answer = body["choices"][0]["message"]["content"]
    chat_id = body.get("chat_id") or _chat_of(ui, answer_id)
    stored = _saved_answer(ui, chat_id, answer_id)
    assert stored["content"].strip() == answer.strip() and stored["parentId"] == user_id

    # A follow-up turn in the same chat, streamed as the UI streams; Open WebUI adds the earlier turns itself.
    follow_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    follow_up = f"Now count to three, {marker}."
    with ui.stream("POST", "/api/chat/completions", json={
            "stream": True, "model": loop_service.model, "chat_id": chat_id, "id": second_id,
            "parent_id": answer_id, "params": {"max_tokens": 12, "temperature": 0}, "features": {},
            "user_message": {**user_message, "id": follow_id, "parentId": answer_id, "content": follow_up},
            "background_tasks": {}}) as streamed:
        assert streamed.status_code == 200, streamed.read()
        streamed.read()
    second = _saved_answer(ui, chat_id, second_id)
    assert second["parentId"] == follow_id

    # The responses loop logged for them.
    api = httpx.Client(base_url=loop_service.url, timeout=120,
                       headers={"Authorization": f"Bearer {loop_service.admin_token}"})
    # Oldest first; matched by order, not by text (a model may give both turns the same answer). A streamed answer
    # may be logged just after its last chunk, so wait for both.
    logged = _logged(api, marker, 2)
    assert [r["completion"].strip() for r in logged] == [answer.strip(), second["content"].strip()], logged
    assert [r["prompt_preview"] for r in logged] == [question, follow_up], logged
    response_id, second_response_id = logged[0]["id"], logged[1]["id"]

    # The thumbs, as the UI's feedback handler posts them.
    feedback_ids: list[str] = []
    for message_id, index, data in ((answer_id, 2, {"rating": 1, "comment": f"friendly {marker}",
                                                    "reason": "Followed instructions perfectly",
                                                    "details": {"rating": 8}}),
                                    (second_id, 4, {"rating": -1})):
        feedback = ui.post("/api/v1/evaluations/feedback", json={
            "type": "rating", "data": {**data, "model_id": loop_service.model},
            "meta": {"arena": False, "model_id": loop_service.model, "message_id": message_id,
                     "message_index": index, "chat_id": chat_id, "base_models": {loop_service.model: None}},
            "snapshot": {"chat": ui.get(f"/api/v1/chats/{chat_id}").json()}})
        assert feedback.status_code == 200, feedback.text
        feedback_ids.append(feedback.json()["id"])

    sync = subprocess.run([sys.executable, "-m", "loop.cli", "openwebui", "sync", "--url", open_webui.url,
                           "--data-dir", str(loop_service.data_dir), "--json"],
                          env={**os.environ, "LOOP_OPENWEBUI_API_KEY": key.json()["api_key"]},
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert '"created": 2' in sync.stdout, sync.stdout

    rater = f"openwebui:{USER['email']}"
    ratings = api.get("/api/ratings", params={"rater": rater}).json()["items"]
    assert sorted((r["response_id"], r["thumb"], r["score"], r["comment"]) for r in ratings) == \
        sorted([(response_id, "up", 8, f"friendly {marker}"), (second_response_id, "down", None, None)]), ratings
    assert "Followed instructions perfectly" in next(r for r in ratings if r["thumb"] == "up")["tags"]

    again = subprocess.run([sys.executable, "-m", "loop.cli", "openwebui", "sync", "--url", open_webui.url,
                            "--data-dir", str(loop_service.data_dir), "--json"],
                           env={**os.environ, "LOOP_OPENWEBUI_API_KEY": key.json()["api_key"]},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and '"replayed": 2' in again.stdout, again.stdout + again.stderr
    assert api.get("/api/ratings", params={"rater": rater}).json()["total"] == 2

    # The user deletes the thumbs-down in Open WebUI: the next sync withdraws that rating, the other stands.
    assert ui.delete(f"/api/v1/evaluations/feedback/{feedback_ids[1]}").status_code == 200
    third = subprocess.run([sys.executable, "-m", "loop.cli", "openwebui", "sync", "--url", open_webui.url,
                            "--data-dir", str(loop_service.data_dir), "--json"],
                           env={**os.environ, "LOOP_OPENWEBUI_API_KEY": key.json()["api_key"]},
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr
    assert json.loads(third.stdout)["withdrawn"] == [feedback_ids[1]], third.stdout
    current = {r["response_id"]: r for r in api.get("/api/ratings", params={"rater": rater,
                                                                             "current_only": True}).json()["items"]}
    assert current[second_response_id]["withdrawn"] and current[response_id]["thumb"] == "up", current


def _saved_answer(ui: httpx.Client, chat_id: str, message_id: str, timeout_s: float = 60) -> dict:
    """The assistant message once Open WebUI has stored it whole (a streamed answer is saved as it ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        message = ui.get(f"/api/v1/chats/{chat_id}").json()["chat"]["history"]["messages"].get(message_id) or {}
        if message.get("done") and message.get("content"):
            return message
        assert time.monotonic() < deadline, f"Open WebUI did not store answer {message_id}: {message}"
        time.sleep(0.5)


def _logged(api: httpx.Client, marker: str, n: int, timeout_s: float = 60) -> list[dict]:
    """The `n` responses loop logged with `marker` in them, oldest first, once all `n` are there."""
    deadline = time.monotonic() + timeout_s
    while True:
        items = api.get("/api/responses", params={"q": marker, "sort": "created_at"}).json()["items"]
        if len(items) >= n:
            return items
        assert time.monotonic() < deadline, f"loop logged {len(items)} of {n} responses with {marker}: {items}"
        time.sleep(0.5)


def _chat_of(ui: httpx.Client, message_id: str) -> str:
    """The chat Open WebUI created for the first completion (the newest chat holding that message)."""
    for c in ui.get("/api/v1/chats/").json():
        full = ui.get(f"/api/v1/chats/{c['id']}").json()
        if message_id in full["chat"]["history"]["messages"]:
            return c["id"]
    raise AssertionError(f"no Open WebUI chat holds message {message_id}")
