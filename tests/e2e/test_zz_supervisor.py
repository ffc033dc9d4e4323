"""vLLM dies → loop says so (503 with the reason) and brings it back. Named test_zz_* so it runs last: it
kills the session's shared vLLM, and every other e2e module should have finished with it by then."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_killed_vllm_is_reported_and_restarted(loop_service, openai_client) -> None:  # noqa: ANN001
    pid = int(loop_service.vllm_pid_path.read_text().strip())
    restarts_before = httpx.get(f"{loop_service.url}/health", timeout=10).json()["vllm"]["restarts"]  # other tests restart it too
    os.killpg(pid, signal.SIGKILL)  # a crash: no clean shutdown

    seen_restarting = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = httpx.get(f"{loop_service.url}/health", timeout=10)
        if h.status_code == 503 and h.json()["vllm"]["state"] in ("restarting", "starting"):
            seen_restarting = h.json()
            break
        time.sleep(0.2)
    assert seen_restarting is not None, "the crash never showed in /health"
    assert seen_restarting["status"] == "degraded"
    assert "crashed" in seen_restarting["vllm"]["last_error"] or "starting" in seen_restarting["vllm"]["last_error"]
    r = httpx.post(f"{loop_service.url}/v1/chat/completions", timeout=30,
                   json={"model": loop_service.model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "vLLM" in r.json()["error"]["message"]
    assert r.headers.get("retry-after") == "5"

    deadline = time.monotonic() + float(os.environ.get("LOOP_TEST_START_TIMEOUT_S", "300"))
    while time.monotonic() < deadline:
        h = httpx.get(f"{loop_service.url}/health", timeout=10)
        if h.status_code == 200:
            break
        time.sleep(1)
    assert h.status_code == 200, h.text
    assert h.json()["vllm"]["restarts"] == restarts_before + 1
    assert int(loop_service.vllm_pid_path.read_text().strip()) != pid
    reply = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi again"}])
    assert reply.id.startswith("resp-")
