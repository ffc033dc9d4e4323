"""The FastAPI app factory.

`create_app(settings)` wires the database (migrated at start-up), the vLLM client, and — when `manage=True`, as
under `loop serve` — the supervised processes: vLLM (unless `--vllm-url` attaches to one), the training worker
and the scheduler. The API listens at once; while vLLM is still loading, `/v1/*` answers 503 with progress and
`/health` says what is starting. The parts themselves, their order and their shutdown (queued ratings and
stream stores drained first) are the composition root's: loop/state.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from loop.api.errors import BodySizeLimit, RequestContext, install_error_handlers
from loop.api.security import BrowserGuard
from loop.config import Settings
from loop.state import LoopState

WEB_DIR = Path(__file__).resolve().parents[2] / "web"

FatalCallback = Callable[[str], None]


def create_app(settings: Settings, *, manage: bool = True, on_fatal: FatalCallback | None = None,
               on_refused: FatalCallback | None = None) -> FastAPI:
    """Build the app. `manage=False` skips starting vLLM/worker/scheduler (unit tests, attach-only tools).
    `on_fatal(reason)` is called when the managed vLLM cannot be brought back (`loop serve` then shuts down and
    exits non-zero, so a process manager restarts the whole service); `on_refused(reason)` when the training
    worker cannot train the served model in place (`loop serve` stops and says why)."""
    from loop.api.deps import require_caller
    from loop.api.routes import ROUTERS, health
    from loop.metrics import Metrics, RequestMetrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        state = LoopState.open(settings)
        app.state.loop = state
        await state.start(manage=manage, on_fatal=on_fatal, on_refused=on_refused)
        try:
            yield
        finally:
            await state.stop()

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
    gate = [Depends(require_caller)] if settings.tokens_required else []
    for router in ROUTERS:  # health and metrics stay open: probes carry no token
        app.include_router(router, dependencies=[] if router is health.router else gate)
    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
