"""/health's status, `problems` and HTTP code: ok (200); degraded (200: chat is served, the training worker is
down); unavailable (503: vLLM paused outside a weight change, its engine failing its health probe, or vLLM gone).
vLLM is the stand-in from tests/support.py on a real Unix socket, attached with `--vllm-url unix:/…`.

Run: .venv/bin/python -m pytest -q tests/unit/api/test_health.py
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from loop.api.app import create_app
from loop.config import Settings
from tests.support import fake_vllm_command, wait_for_socket


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    sock = tmp_path / "v.sock"
    proc = subprocess.Popen(fake_vllm_command(tmp_path, sock))
    try:
        wait_for_socket(sock, 20)
        app = create_app(Settings(data_dir=tmp_path / "data", vllm_url=f"unix:{sock}"), manage=False)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1") as client:
                yield SimpleNamespace(client=client, state=app.state.loop, sock=sock, proc=proc)
            app.state.loop.worker = app.state.loop.supervisor = None  # the tests' stand-ins have nothing to stop
    finally:
        proc.kill()
        proc.wait()


async def test_all_well_is_ok_with_no_problems(api: SimpleNamespace) -> None:
    h = await api.client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["serving"] is True and body["problems"] == []
    assert body["vllm"]["state"] == "ready" and body["vllm"]["paused"] is False
    assert body["vllm"]["address"] == f"unix:{api.sock}" and body["vllm"]["socket"] == str(api.sock)


async def test_paused_outside_a_weight_change_is_unavailable(api: SimpleNamespace) -> None:
    Path(f"{api.sock}.paused").touch()  # someone else's POST /pause
    h = await api.client.get("/health")
    assert h.status_code == 503
    body = h.json()
    assert body["status"] == "unavailable" and body["serving"] is False and body["vllm"]["state"] == "paused"
    assert [p["code"] for p in body["problems"]] == ["vllm_paused"]
    assert "no weight change is in progress" in body["problems"][0]["message"]


async def test_paused_during_a_weight_change_is_fine(api: SimpleNamespace) -> None:
    Path(f"{api.sock}.paused").touch()
    async with api.state.weights_lock:  # an apply, restore or rollback pauses vLLM on purpose
        h = await api.client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["vllm"]["paused"] is False


async def test_an_engine_failing_its_health_check_is_unavailable_with_vllms_words(api: SimpleNamespace) -> None:
    Path(f"{api.sock}.sick").touch()
    h = await api.client.get("/health")
    assert h.status_code == 503 and h.json()["vllm"]["state"] == "unreachable"
    assert "answered 503" in h.json()["vllm"]["last_error"] and "EngineCore died" in h.json()["vllm"]["last_error"]


async def test_vllm_gone_is_unavailable(api: SimpleNamespace) -> None:
    api.proc.kill()
    api.proc.wait()
    h = await api.client.get("/health")
    assert h.status_code == 503 and h.json()["problems"][0]["code"] == "vllm_unreachable"
    assert str(api.sock) in h.json()["vllm"]["last_error"]


@pytest.mark.parametrize(("worker_state", "more"), [("dead", "being restarted"), ("failed", "not restarted again")])
async def test_a_dead_worker_is_degraded_but_still_serving(api: SimpleNamespace, worker_state: str, more: str) -> None:
    api.state.worker = SimpleNamespace(describe=lambda: {"state": worker_state, "last_error": "no heartbeat for 5 s"})
    h = await api.client.get("/health")
    assert h.status_code == 200  # a load balancer keeps sending chat traffic
    body = h.json()
    assert body["status"] == "degraded" and body["serving"] is True
    assert body["problems"] == [{"part": "worker", "code": f"worker_{worker_state}", "serving": True,
                                 "message": f"the training worker is {worker_state} (no heartbeat for 5 s); it is "
                                            f"{more}: chat is served, training waits"}]


async def test_a_supervised_vllm_failing_its_probe_is_unavailable(api: SimpleNamespace) -> None:
    settings = SimpleNamespace(vllm_restart_limit=3, vllm_restart_window_s=600)
    api.state.supervisor = SimpleNamespace(
        state="ready", unhealthy="vLLM answered 503 to GET /health: EngineCore died", settings=settings,
        address=f"unix:{api.sock}", socket_path=api.sock, restarts=0, recent_restarts=0, model_path="m",
        log_path="l", ready_in_s=20.0)
    h = await api.client.get("/health")
    assert h.status_code == 503 and h.json()["vllm"]["state"] == "unhealthy"
    assert "EngineCore died" in h.json()["vllm"]["last_error"] and "restarts it after 3" in h.json()["vllm"]["last_error"]
    api.state.supervisor.state, api.state.supervisor.describe = "failed", lambda: "vLLM failed (exit code 1) …"
    api.state.supervisor.last_error, api.state.supervisor.elapsed_s = "ValueError: bad", lambda: 1.0
    h = await api.client.get("/health")
    assert h.status_code == 503 and h.json()["problems"][0]["code"] == "vllm_failed"
    assert h.json()["vllm"]["restart_limit"] == 3 and h.json()["vllm"]["restart_window_s"] == 600
