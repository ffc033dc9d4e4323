"""POST /api/train (admin) starts a training run; GET /api/train/status says what the trainer is doing.

The run itself is `loop.training.Trainer`: this module only checks the request and maps the trainer's
situation to HTTP (no worker → 503 with the reason, a run in progress → 409, an empty batch → 422).
`GET /api/train/status?checksum=true` (admin) also asks the worker for a hash of every live weight — slow on big
models, exact: tests use it to prove a refused update left the weights bit-identical.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from loop.api.deps import AdminDep, StateDep, require_admin, trainer_of
from loop.api.errors import ApiError
from loop.training import TrainRequest
from loop.worker import protocol as p

router = APIRouter(prefix="/api", tags=["training"])


@router.post("/train", status_code=202, dependencies=[AdminDep])
async def start_training(body: TrainRequest, state: StateDep) -> dict[str, int]:
    trainer = trainer_of(state)
    handle = await trainer.run(body)  # a worker error is a loop.errors.Unavailable: 503 worker_unavailable
    return {"run_id": handle.id}


@router.get("/train/status")
async def training_status(state: StateDep, request: Request, checksum: bool = False) -> dict[str, Any]:
    trainer = trainer_of(state)
    out = trainer.describe()
    # the worker's share of the device while vLLM has work, as it resolved it for its device (None: not attached)
    hello = trainer.control.hello
    out["train_share"] = hello.train_share if hello is not None else state.settings.train_share
    guard = trainer.weights.guard  # keep-mode writes wait for the answers they preempt (loop/training/recompute.py)
    out["keep_recompute"] = {"share": guard.share, "recovering": guard.recovering,
                             "last_recompute_s": guard.last_recompute_s, "holding_s": guard.wait_s(time.monotonic())
                             if not guard.recovering else None}
    if checksum:
        require_admin(state, request.headers.get("authorization"), request.headers.get("x-loop-admin-token"))
        async with state.weights_lock:  # a hash of weights half-way through an apply would mean nothing
            reply = await trainer.control.call(p.Ping(checksum=True), timeout=300)
            version = state.weight_version
        if not isinstance(reply, p.Status):
            raise ApiError(f"unexpected worker reply {type(reply).__name__}", status_code=500)
        out["checksum"] = reply.checksum
        out["checksum_version"] = version  # the version these bytes are
        if reply.mirrors:  # with replicas: replica 0's served tensors, then each other replica's (equal when in sync)
            out["replica_checksums"] = list(reply.mirrors)
    return out


