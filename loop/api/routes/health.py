"""`GET /health` (is everything up, and if not, why) and `GET /metrics` (Prometheus text).

/health answers 200 with status "ok" when vLLM is ready and the database answers, else 503 with status
"degraded" and the reason in `vllm.last_error` / `database`, so a load balancer and a person read the same thing.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response as HTTPResponse

from loop.api.deps import StateDep
from loop.api.state import LoopState
from loop.vllm.process import last_meaningful_line

router = APIRouter(tags=["health"])


def _ping_db(state: LoopState) -> str:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any driver error means "down", with its text
        return f"error: {exc}"


async def vllm_status(state: LoopState) -> dict[str, Any]:
    sup = state.supervisor
    if sup is not None:
        info: dict[str, Any] = {"state": sup.state, "url": sup.url, "restarts": sup.restarts,
                                "last_error": None, "managed": True, "model_path": sup.model_path,
                                "log_path": str(sup.log_path)}
        if sup.state != "ready":
            info["last_error"] = sup.describe()
            if sup.last_error:
                info["last_log_line"] = last_meaningful_line(sup.last_error)
            info["elapsed_s"] = round(sup.elapsed_s(), 1)
        else:
            info["ready_in_s"] = None if sup.ready_in_s is None else round(sup.ready_in_s, 1)
        return info
    up = await state.vllm.health(timeout=5.0)
    return {"state": "ready" if up else "unreachable", "url": state.vllm.base_url, "restarts": 0,
            "last_error": None if up else f"vLLM at {state.vllm.base_url} does not answer /health (--vllm-url)",
            "managed": False}


@router.get("/health", summary="API, vLLM and database status (503 when vLLM or the database is down)")
async def health(request: Request, state: StateDep) -> JSONResponse:
    vllm = await vllm_status(state)
    database = await run_in_threadpool(_ping_db, state)
    worker = None
    if state.worker is not None:
        try:
            worker = state.worker.describe()
        except Exception as exc:  # noqa: BLE001 - health must answer even when a part misbehaves
            worker = {"state": "error", "last_error": repr(exc)}
    held = getattr(state.trainer, "held_paused", None)
    if held:  # paused on weights nobody knows (an apply the worker did not finish): not serving
        vllm = {**vllm, "state": "held", "reason": held}
    ok = vllm["state"] == "ready" and database == "ok"
    metrics = request.app.state.metrics
    metrics.set_vllm(vllm["state"] == "ready", vllm.get("restarts", 0))
    metrics.set_weight_version(state.weight_version)
    body = {"status": "ok" if ok else "degraded", "api": "ok", "vllm": vllm, "database": database,
            "worker": worker, "weight_version": state.weight_version,
            "uptime_s": round(time.time() - state.started_at, 1)}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request, state: StateDep) -> HTTPResponse:
    m = request.app.state.metrics
    m.set_weight_version(state.weight_version)
    if state.supervisor is not None:
        m.set_vllm(state.supervisor.state == "ready", state.supervisor.restarts)
    payload, content_type = m.render()
    return HTTPResponse(payload, media_type=content_type)
