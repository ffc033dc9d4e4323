"""The FastAPI app factory.

`create_app(settings)` wires the database (migrated at start-up), the vLLM client, and — when `manage=True`, as
under `loop serve` — the supervised processes: vLLM (unless `--vllm-url` attaches to one), the training worker
and the scheduler. The API listens at once; while vLLM is still loading, `/v1/*` answers 503 with progress and
`/health` says what is starting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from loop.api.errors import BodySizeLimit, RequestContext, install_error_handlers
from loop.api.security import BrowserGuard
from loop.state import LoopState
from loop.config import Settings
from loop.db.session import make_engine, make_sessionmaker, migrate

log = logging.getLogger("loop.api")

WEB_DIR = Path(__file__).resolve().parents[2] / "web"

FatalCallback = Callable[[str], None]


def create_app(settings: Settings, *, manage: bool = True, on_fatal: FatalCallback | None = None) -> FastAPI:
    """Build the app. `manage=False` skips starting vLLM/worker/scheduler (unit tests, attach-only tools).
    `on_fatal(reason)` is called when the managed vLLM cannot be brought back (`loop serve` then shuts down and
    exits non-zero, so a process manager restarts the whole service)."""
    from loop.api.routes import ROUTERS
    from loop.metrics import Metrics, RequestMetrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        state = await _start(settings, manage=manage, on_fatal=on_fatal)
        app.state.loop = state
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(title="loop", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible proxy that logs every response, collects feedback and "
                              "trains vLLM's weights in place.")
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    # outermost: a refused request never reaches the app, and every answer (413s too) carries the headers
    app.add_middleware(BrowserGuard, **BrowserGuard.options(settings))
    app.add_middleware(RequestContext)  # around everything: every answer has X-Request-Id, any crash a 500 body
    for router in ROUTERS:
        app.include_router(router)
    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


async def _start(settings: Settings, *, manage: bool, on_fatal: FatalCallback | None = None) -> LoopState:
    from loop.vllm.client import VLLMClient

    settings.ensure_dirs()
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    state = LoopState(settings=settings, engine=engine, sessions=make_sessionmaker(engine),
                      admin_token=settings.resolved_admin_token(),
                      vllm=VLLMClient(settings.vllm_address, timeout=settings.request_timeout_s,
                                                api_key=settings.vllm_api_key))
    state.load_weight_version()
    if manage:
        if settings.worker_enabled:  # the training worker: it waits for vLLM's weight-handle file by itself
            from loop.control import WorkerControl
            from loop.training import Trainer

            state.worker = WorkerControl(settings)
            state.trainer = Trainer(state)
        if settings.vllm_url is None:
            from loop.vllm.process import VLLMSupervisor

            state.supervisor = VLLMSupervisor(settings, on_failed=on_fatal)
            if state.trainer is not None:
                state.trainer.prepare_supervisor(state.supervisor)  # newest checkpoint; record restarts
            await state.supervisor.start()
        if state.worker is not None:
            await state.worker.start()
        from loop.scheduler import Scheduler  # (H7) turns feedback into runs; idle without a trainer

        state.scheduler = Scheduler(state)
        await state.scheduler.start()
    return state


async def _stop(state: LoopState) -> None:
    for part in (state.scheduler, state.trainer, state.worker, state.supervisor):
        if part is not None:
            try:
                await part.stop()
            except Exception:  # noqa: BLE001 - shutting down: log and go on with the rest
                log.exception("stopping %s failed", type(part).__name__)
    await state.vllm.aclose()
    state.engine.dispose()
