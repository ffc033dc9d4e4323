"""Runs/scheduler routes (loop/api/routes/runs.py) and the CLI (loop/cli/runs.py) over real HTTP: a uvicorn server
with those routers, the scheduler with a fake trainer and a scripted guard, a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.unit.scheduler_support import ScriptedGuard, State, add_comparisons, state  # noqa: F401 - fixture
from tests.support import ServedApp

from loop.api.errors import install_error_handlers
from loop.cli import main as cli_main
from loop.db import models
from loop.raters import Accounts
from loop.scheduler.scheduler import Scheduler

TOKEN = "k" * 32


class Server(ServedApp):
    """The runs and versions routers on a bare app, remembering the event loop the scheduler's coroutines run in."""

    def __init__(self, st: State) -> None:
        from contextlib import asynccontextmanager

        from loop.api.routes import runs, versions

        @asynccontextmanager
        async def lifespan(_: FastAPI):  # noqa: ANN202
            self.loop = asyncio.get_running_loop()
            yield

        app = FastAPI(lifespan=lifespan)
        install_error_handlers(app)
        app.include_router(runs.router)
        app.include_router(versions.router)
        st.admin_token = TOKEN  # type: ignore[attr-defined]
        st.weights_lock = asyncio.Lock()  # type: ignore[attr-defined]
        st.accounts = Accounts(st.sessions)  # type: ignore[attr-defined]
        app.state.loop = st
        super().__init__(app)


@pytest.fixture
def server(state: State) -> Iterator[Server]:  # noqa: F811
    state.scheduler = None  # type: ignore[attr-defined]
    with Server(state) as srv:
        yield srv


def run_in_server_loop(srv: Server, coro: Any) -> Any:
    """Run a coroutine on the server's own event loop (where the scheduler lives) and wait for it."""
    loop = srv.loop
    return asyncio.run_coroutine_threadsafe(coro, loop).result(60)


def test_scheduler_routes_and_run_history(server: Server, state: State, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # no scheduler yet → 503 with a reason
    r = httpx.get(f"{server.url}/api/scheduler")
    assert r.status_code == 503 and "scheduler is not running" in r.json()["error"]["message"]
    state.scheduler = Scheduler(state, guard=ScriptedGuard([(0.8, 10.0), (0.3, 10.0)]))  # type: ignore[attr-defined,arg-type]
    add_comparisons(state, 2)
    status = httpx.get(f"{server.url}/api/scheduler").json()
    assert status["untrained"] == {"pairs": 2, "examples": 0} and status["paused"] is False
    assert status["thresholds"]["min_pairs"] == 3
    # admin needed; wrong token refused; bad values refused with the field named
    assert httpx.post(f"{server.url}/api/scheduler/pause").status_code == 401
    assert httpx.post(f"{server.url}/api/scheduler/pause", headers={"authorization": "Bearer " + "x" * 32}
                      ).status_code == 403
    auth = {"authorization": f"Bearer {TOKEN}"}
    bad = httpx.post(f"{server.url}/api/scheduler/config", json={"min_pairs": 0}, headers=auth)
    assert bad.status_code == 422 and "min_pairs" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server.url}/api/scheduler/config", json={"bogus": 1}, headers=auth)
    assert bad.status_code == 422 and "bogus" in bad.json()["error"]["message"]
    assert httpx.post(f"{server.url}/api/scheduler/pause", headers=auth).json()["paused"] is True
    assert httpx.post(f"{server.url}/api/scheduler/run", headers=auth).status_code == 409
    assert httpx.post(f"{server.url}/api/scheduler/resume", headers=auth).json()["paused"] is False
    cfg = httpx.post(f"{server.url}/api/scheduler/config", json={"min_pairs": 2}, headers=auth).json()
    assert cfg["thresholds"]["min_pairs"] == 2 and cfg["next_trigger_estimate"] == "now"

    # one guarded run that regresses: rolled back, and the history says so
    run_id = run_in_server_loop(server, state.scheduler.tick())  # type: ignore[attr-defined]
    assert run_id is not None
    listing = httpx.get(f"{server.url}/api/runs").json()
    assert listing["total"] == 1 and listing["items"][0]["status"] == "rolled_back"
    assert httpx.get(f"{server.url}/api/runs", params={"status": "succeeded"}).json()["total"] == 0
    bad = httpx.get(f"{server.url}/api/runs", params={"status": "weird"})
    assert bad.status_code == 422 and "status must be one of" in bad.json()["error"]["message"]
    one = httpx.get(f"{server.url}/api/runs/{run_id}").json()
    assert one["rolled_back"] and "accuracy fell" in one["rollback_reason"]
    assert one["eval_before"]["accuracy"] == 0.8 and one["eval_after"]["accuracy"] == 0.3
    assert one["version_after_info"]["status"] == "rolled_back" and len(one["consumed"]["comparison_ids"]) == 2
    assert one["trigger"] == "scheduler" and "threshold" in one["batch"]["scheduler"]["trigger"]
    missing = httpx.get(f"{server.url}/api/runs/999")
    assert missing.status_code == 404 and "999" in missing.json()["error"]["message"]

    # the CLI, over the same HTTP
    common = ["--url", server.url, "--token", TOKEN]
    assert cli_main(["runs", *common]) == 0
    out = capsys.readouterr().out
    assert "rolled_back" in out and "1 of 1 runs" in out
    with state.sessions() as s:  # a screen's figures as a scheduled run records them (loop/training/runs.py)
        row = s.get(models.TrainingRun, run_id)
        row.metrics = {**(row.metrics or {}), "screen": {
            "p_value": 0.004, "alpha": 0.01, "n": 12, "quarantined": 0, "note": "", "direction": "both",
            "n_anchors": 9, "p_by_direction": {"learned": 0.09, "anchors": 0.001, "both": 0.004}}}
        s.commit()
    assert cli_main(["runs", "show", str(run_id), *common]) == 0
    out = capsys.readouterr().out
    assert "ROLLED BACK: held-out preference accuracy fell" in out
    assert "screen: p 0.0040 (level 0.01) over 12 items" in out
    assert "screen direction: both (9 anchor pairs); p by direction: learned 0.0900, anchors 0.0010, both 0.0040" in out
    assert cli_main(["versions", *common]) == 0
    out = capsys.readouterr().out
    assert "rollback" in out and "rolled_back" in out
    assert cli_main(["scheduler", "pause", *common]) == 0 and "(paused)" in capsys.readouterr().out
    assert cli_main(["scheduler", "status", "--url", server.url]) == 0
    assert cli_main(["scheduler", "config", "--min-pairs", "5", *common]) == 0
    assert '"min_pairs": 5' in capsys.readouterr().out
    # admin without a token: a clear message and exit code 2
    assert cli_main(["scheduler", "resume", "--url", server.url, "--data-dir", "/nonexistent"]) == 2
    assert "needs the admin token" in capsys.readouterr().err
    assert cli_main(["rollback", "0", "--yes", *common]) == 0
    assert "restored version 0: live version is now 3" in capsys.readouterr().out


def test_versions_carry_the_loss_of_the_run_that_made_them(server: Server, state: State) -> None:  # noqa: F811
    from loop.db.models import TrainingRun, WeightVersion

    with state.sessions() as s:
        good = TrainingRun(status="succeeded", metrics={"loss": 0.4321, "eval_after": {"accuracy": 0.75}},
                           history=[{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.4321}])
        blown = TrainingRun(status="refused", metrics={"loss": float("nan")})
        s.add_all([good, blown])
        s.flush()
        s.add_all([WeightVersion(version=1, kind="train", parent_version=0, run_id=good.id, status="superseded",
                                 eval={"accuracy": 0.75, "canary_perplexity": 12.5}),
                   WeightVersion(version=2, kind="train", parent_version=1, run_id=blown.id, status="superseded"),
                   WeightVersion(version=3, kind="restore", parent_version=1, status="live")])
        s.commit()
    state.weight_version = 3
    got = httpx.get(f"{server.url}/api/versions").json()
    assert got["live"] == 3
    assert [(v["version"], v["run_id"] is not None, v["run_loss"]) for v in got["items"]] == [
        (3, False, None), (2, True, None), (1, True, 0.4321), (0, False, None)]
    assert got["items"][2]["eval"] == {"accuracy": 0.75, "canary_perplexity": 12.5}
    schema = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]["WeightVersionOut"]
    assert "last step" in schema["properties"]["run_loss"]["description"]
