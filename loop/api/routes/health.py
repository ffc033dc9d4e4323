"""`GET /health` (is everything up, and if not, why) and `GET /metrics` (Prometheus text).

/health answers within seconds with a top-level `status` and a `problems` list ({part, code, message}), so a load
balancer and a person read the same thing:
- "ok" (200): vLLM serves, the database answers, the worker (if any) is up.
- "degraded" (200): chat is served, but something else is wrong (the training worker is dead or failed): a load
  balancer should keep sending chat traffic; training waits.
- "unavailable" (503): chat cannot be served: vLLM is starting, restarting, failed (then `loop serve` exits),
  unhealthy (its engine fails its health probe), held or paused outside a weight change, or the database is down.
`vllm.state` says which; `vllm.last_error` says why. Tests: tests/unit/api/test_health.py, tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response as HTTPResponse

from loop.api.deps import StateDep
from loop.state import LoopState
from loop.vllm.client import VLLMError, VLLMUnreachable
from loop.vllm.process import UNHEALTHY_AFTER, last_meaningful_line

router = APIRouter(tags=["health"])

PAUSE_RECHECK_S = 0.2
PROBE_TIMEOUT_S = 3.0


def _ping_db(state: LoopState) -> str:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any driver error means "down", with its text
        return f"error: {exc}"


async def paused_outside_a_change(state: LoopState) -> bool | None:
    """True when vLLM is paused while no weight change (apply, restore, rollback) holds `weights_lock`; None
    when vLLM cannot say (no dev routes). Seen twice, a moment apart, so that a whole apply happening during one
    question is not taken for a stuck pause."""
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(PAUSE_RECHECK_S)
        if state.weights_lock.locked():
            return False
        try:
            paused = await state.vllm.is_paused(timeout=PROBE_TIMEOUT_S)
        except (VLLMError, VLLMUnreachable, httpx.HTTPError):
            return None
        if not paused or state.weights_lock.locked():
            return False
    return True


async def vllm_status(state: LoopState) -> dict[str, Any]:
    sup = state.supervisor
    if sup is not None:
        s = sup.settings
        info: dict[str, Any] = {"state": sup.state, "managed": True, "address": sup.address,
                                "socket": str(sup.socket_path), "restarts": sup.restarts,
                                "recent_restarts": sup.recent_restarts, "restart_limit": s.vllm_restart_limit,
                                "restart_window_s": s.vllm_restart_window_s, "last_error": None,
                                "model_path": sup.model_path, "log_path": str(sup.log_path)}
        if sup.state != "ready":
            info["last_error"] = sup.describe()
            if sup.last_error:
                info["last_log_line"] = last_meaningful_line(sup.last_error)
            info["elapsed_s"] = round(sup.elapsed_s(), 1)
            return info
        info["ready_in_s"] = None if sup.ready_in_s is None else round(sup.ready_in_s, 1)
        if sup.unhealthy:
            info["state"] = "unhealthy"
            info["last_error"] = (f"vLLM's engine fails its health probe ({sup.unhealthy}); loop restarts it after "
                                  f"{UNHEALTHY_AFTER} failures in a row")
            return info
    else:
        problem = await state.vllm.health_problem(timeout=PROBE_TIMEOUT_S)
        info = {"state": "ready" if problem is None else "unreachable", "managed": False,
                "address": state.vllm.address, "socket": state.vllm.socket_path, "restarts": 0,
                "last_error": None if problem is None else f"{problem} (--vllm-url)"}
        if problem is not None:
            return info
    held = getattr(state.trainer, "held_paused", None)
    if held:  # paused on weights nobody knows (an apply the worker did not finish): not serving
        return {**info, "state": "held", "reason": held, "last_error": held}
    paused = await paused_outside_a_change(state)
    info["paused"] = paused
    if paused:
        info["state"] = "paused"
        info["last_error"] = ("vLLM is paused but no weight change is in progress: every chat waits; something "
                              "other than loop paused it (POST /resume on vLLM's socket resumes it)")
    return info


def _worker_status(state: LoopState) -> dict[str, Any] | None:
    if state.worker is None:
        return None
    try:
        return state.worker.describe()
    except Exception as exc:  # noqa: BLE001 - health must answer even when a part misbehaves
        return {"state": "error", "last_error": repr(exc)}


def problems_of(vllm: dict[str, Any], database: str, worker: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What is wrong, one entry per part; `serving` False for the ones that stop chat."""
    problems = []
    if vllm["state"] != "ready":
        problems.append({"part": "vllm", "code": f"vllm_{vllm['state']}", "serving": False,
                         "message": vllm.get("last_error") or f"vLLM is {vllm['state']}"})
    if database != "ok":
        problems.append({"part": "database", "code": "database_down", "serving": False, "message": database})
    if worker is not None and worker.get("state") in ("dead", "failed", "error", "refused"):
        why = worker.get("last_error") or "no reason given"
        more = "; it is being restarted" if worker["state"] == "dead" else "; it is not restarted again"
        problems.append({"part": "worker", "code": f"worker_{worker['state']}", "serving": True,
                         "message": f"the training worker is {worker['state']} ({why}){more}: chat is served, "
                                    "training waits"})
    return problems


@router.get("/health", summary="status ok/degraded (200) or unavailable (503: chat cannot be served), and why")
async def health(request: Request, state: StateDep) -> JSONResponse:
    vllm = await vllm_status(state)
    database = await run_in_threadpool(_ping_db, state)
    worker = _worker_status(state)
    problems = problems_of(vllm, database, worker)
    replicas = state.replicas.describe() if state.replicas is not None else None
    if replicas is not None:  # chat is served while any replica is routable; each one that is not is a problem
        routable = [r for r in replicas if r.get("routable")]
        for p in problems:
            if p["part"] == "vllm" and routable:
                p["serving"] = True
        problems += [{"part": "replica", "code": "replica_not_served", "serving": bool(routable), "replica": r["index"],
                      "message": f"replica {r['index']} is not served: {r.get('why') or r['vllm']}"}
                     for r in replicas if not r.get("routable")]
    serving = all(p["serving"] for p in problems)
    status = "ok" if not problems else "degraded" if serving else "unavailable"
    metrics = request.app.state.metrics
    metrics.set_vllm(vllm["state"] == "ready", vllm.get("restarts", 0))
    metrics.set_weight_version(state.weight_version)
    body = {"status": status, "serving": serving, "problems": problems, "api": "ok", "vllm": vllm,
            "database": database, "worker": worker, "weight_version": state.weight_version, "replicas": replicas,
            "uptime_s": round(time.time() - state.started_at, 1)}
    return JSONResponse(body, status_code=200 if serving else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request, state: StateDep) -> HTTPResponse:
    m = request.app.state.metrics
    m.set_weight_version(state.weight_version)
    if state.supervisor is not None:
        m.set_vllm(state.supervisor.state == "ready", state.supervisor.restarts)
    payload, content_type = m.render()
    return HTTPResponse(payload, media_type=content_type)
