"""POST /api/train (admin) starts a training run; GET /api/train/status says what the trainer is doing.

The run itself is `loop.training.Trainer`: this module only checks the request and maps the trainer's
situation to HTTP (no worker → 503 with the reason, a run in progress → 409, an empty batch → 422).
`GET /api/train/status?checksum=true` (admin) also asks the worker for a hash of every live weight — slow on big
models, exact: tests use it to prove a refused update left the weights bit-identical.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from loop.api.deps import AdminDep, StateDep, require_admin
from loop.api.errors import ApiError, Unavailable, UpstreamTimeout
from loop.control import WorkerError, WorkerTimeout
from loop.training import Trainer, TrainRequest
from loop.worker import protocol as p

router = APIRouter(prefix="/api", tags=["training"])


def trainer_of(state: Any) -> Trainer:
    if state.trainer is None:
        raise Unavailable("training is not running in this loop (started with the worker disabled, or without "
                          "`loop serve` managing vLLM)", code="training_disabled")
    return state.trainer


@router.post("/train", status_code=202, dependencies=[AdminDep])
async def start_training(body: TrainRequest, state: StateDep) -> dict[str, int]:
    trainer = trainer_of(state)
    try:
        run_id = await trainer.run(body)
    except WorkerError as e:
        raise Unavailable(str(e), code="worker_unavailable") from e
    return {"run_id": run_id}


@router.get("/train/status")
async def training_status(state: StateDep, request: Request, checksum: bool = False) -> dict[str, Any]:
    trainer = trainer_of(state)
    out = trainer.describe()
    if checksum:
        require_admin(state, request.headers.get("authorization"), request.headers.get("x-loop-admin-token"))
        try:
            async with state.weights_lock:  # a hash of weights half-way through an apply would mean nothing
                reply = await trainer.control.call(p.Ping(checksum=True), timeout=300)
                version = state.weight_version
        except WorkerTimeout as e:
            raise UpstreamTimeout(str(e)) from e
        except WorkerError as e:
            raise Unavailable(str(e), code="worker_unavailable") from e
        if not isinstance(reply, p.Status):
            raise ApiError(f"unexpected worker reply {type(reply).__name__}", status_code=500)
        out["checksum"] = reply.checksum
        out["checksum_version"] = version  # the version these bytes are
    return out


