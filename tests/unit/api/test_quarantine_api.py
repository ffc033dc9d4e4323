"""Quarantine and per-rater signal routes (loop/api/routes/quarantine.py) and their CLI (`loop quarantine`, `loop
raters`), over real HTTP (uvicorn) on a real SQLite file (PostgreSQL too when LOOP_TEST_POSTGRES_URL is set).

Specifies: held batches are listed with their evidence; requeue gives exactly the held feedback back to the queue
(not the run's other feedback) and drop keeps it consumed; a batch is decided once — a second decision, or two
operators at once, get one success and one 409 that says who decided; unknown ids 404, bad bodies 422, no token
401; a failed commit leaves the batch held and its feedback consumed; the signal flags the rater whose items keep
pulling back.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, select

from loop.api.app import create_app
from loop.cli import main as cli_main
from loop.config import Settings
from loop.db.models import Comparison, Quarantine, Response, RunFeedback, TrainingRun
from loop.db.session import make_engine, migrate
from tests.support import ServedApp
from tests.unit.feedback_support import db_url  # noqa: F401 - fixture

ADMIN = "q" * 32


def _screen(items: list[tuple[str, float, bool, int]]) -> dict[str, Any]:
    return {"alpha": 0.01, "p_value": 0.5, "n": len(items), "note": "", "quarantined": sum(h for *_, h, _ in items),
            "groups": {}, "items": [{"group": g, "contribution": c, "held": h, "rating_ids": [],
                                     "comparison_ids": [cid]} for g, c, h, cid in items]}


def seed(settings: Settings) -> dict[str, Any]:
    """One scheduled run that trained alice's 3 comparisons and holds mallory's 4 in quarantine; a second held
    batch from another run."""
    engine = make_engine(settings.db_url)
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        cids = []
        for i in range(10):
            a, b = f"r{i}a", f"r{i}b"
            for rid, text in ((a, "x"), (b, "y")):
                s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                               messages=[{"role": "user", "content": str(i)}], prompt_hash=f"{i:064d}",
                               completion=text))
            s.flush()
            c = Comparison(response_a_id=a, response_b_id=b, winner="a", rater="alice" if i < 3 else "mallory")
            s.add(c)
            s.flush()
            cids.append(c.id)
        items = ([("alice", 1.0, False, c) for c in cids[:3]] + [("mallory", -1.0, True, c) for c in cids[3:7]])
        run = TrainingRun(status="succeeded", trigger="scheduler", objective="dpo", batch={},
                          metrics={"screen": _screen(items)})
        other = TrainingRun(status="rejected", trigger="scheduler", objective="dpo", batch={},
                            metrics={"screen": _screen([("mallory", -2.0, True, c) for c in cids[7:]])})  # 3 items
        s.add_all([run, other])
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, comparison_id=c) for c in cids[:7]]
                  + [RunFeedback(run_id=other.id, comparison_id=c) for c in cids[7:]])
        q1 = Quarantine(run_id=run.id, scope="rater:mallory", reason="rater mallory: 4 of 4 items pull back",
                        evidence={"p_value": 0.0625}, comparison_ids=cids[3:7], rating_ids=[])
        q2 = Quarantine(run_id=other.id, scope="batch", reason="the batch: 3 of 3", evidence={"p_value": 0.125},
                        comparison_ids=cids[7:], rating_ids=[])
        s.add_all([q1, q2])
        s.commit()
        out = {"run": run.id, "other": other.id, "cids": cids, "q1": q1.id, "q2": q2.id}
    engine.dispose()
    return out


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[ServedApp, dict[str, Any]]]:  # noqa: F811 - fixture
    settings = Settings(data_dir=tmp_path, database_url=db_url, admin_token=ADMIN, vllm_url="http://fake",
                        worker_enabled=False, scheduler_enabled=False)
    settings.ensure_dirs()
    migrate(settings.db_url)
    ids = seed(settings)
    with ServedApp(create_app(settings, manage=False)) as server:
        yield server, ids


def _consumed(server: ServedApp) -> set[int]:
    with server.app.state.loop.sessions() as s:
        return set(s.scalars(select(RunFeedback.comparison_id)))


AUTH = {"authorization": f"Bearer {ADMIN}"}


def test_list_show_requeue_drop(served: tuple[ServedApp, dict[str, Any]]) -> None:
    server, ids = served
    listed = httpx.get(f"{server.url}/api/quarantine").json()
    assert listed["held"] == 2 and [q["id"] for q in listed["items"]] == [ids["q2"], ids["q1"]]
    q1 = httpx.get(f"{server.url}/api/quarantine/{ids['q1']}").json()
    assert q1["scope"] == "rater:mallory" and q1["comparison_ids"] == ids["cids"][3:7] and q1["state"] == "held"

    r = httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/requeue", headers=AUTH,
                   json={"by": "ops", "note": "mallory is our new style guide"})
    assert r.status_code == 200 and r.json()["state"] == "requeued" and r.json()["decided_by"] == "ops"
    # exactly the held feedback is back in the queue; alice's trained feedback and the other batch stay consumed
    assert _consumed(server) == set(ids["cids"][:3]) | set(ids["cids"][7:])

    again = httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/drop", headers=AUTH)
    assert again.status_code == 409 and "already requeued by ops" in again.json()["error"]["message"]
    r = httpx.post(f"{server.url}/api/quarantine/{ids['q2']}/drop", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "dropped"
    assert set(ids["cids"][7:]) <= _consumed(server)  # dropped: never trained, never queued again
    assert httpx.get(f"{server.url}/api/quarantine", params={"state": "held"}).json()["items"] == []


def test_errors_say_what_was_wrong(served: tuple[ServedApp, dict[str, Any]]) -> None:
    server, ids = served
    assert httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/requeue").status_code == 401
    missing = httpx.post(f"{server.url}/api/quarantine/999999/requeue", headers=AUTH)
    assert missing.status_code == 404 and "GET /api/quarantine" in missing.json()["error"]["message"]
    assert httpx.post(f"{server.url}/api/quarantine/0/drop", headers=AUTH).status_code == 422
    assert httpx.post(f"{server.url}/api/quarantine/{2**63}/drop", headers=AUTH).status_code == 422
    bad = httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/drop", headers=AUTH, json={"whom": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["param"]
    assert httpx.get(f"{server.url}/api/quarantine", params={"state": "lost"}).status_code == 422
    assert _consumed(server) == set(ids["cids"])  # nothing changed


def test_two_operators_at_once_one_decision(served: tuple[ServedApp, dict[str, Any]]) -> None:
    server, ids = served

    def act(action: str) -> int:
        return httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/{action}", headers=AUTH,
                          json={"by": action}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(act, ["requeue", "drop"] * 4))
    assert sorted(codes) == [200] + [409] * 7
    state = httpx.get(f"{server.url}/api/quarantine/{ids['q1']}").json()["state"]
    held_back = set(ids["cids"][3:7]) & _consumed(server)
    assert (state, held_back) in (("requeued", set()), ("dropped", set(ids["cids"][3:7])))


def test_a_failed_commit_keeps_the_batch_held(served: tuple[ServedApp, dict[str, Any]]) -> None:
    server, ids = served
    engine = server.app.state.loop.engine

    def fail(conn: Any) -> None:
        raise RuntimeError("disk full")

    event.listen(engine, "commit", fail)
    try:
        r = httpx.post(f"{server.url}/api/quarantine/{ids['q1']}/requeue", headers=AUTH)
    finally:
        event.remove(engine, "commit", fail)
    assert r.status_code == 500 and r.json()["error"]["type"]
    assert httpx.get(f"{server.url}/api/quarantine/{ids['q1']}").json()["state"] == "held"
    assert _consumed(server) == set(ids["cids"])


def test_rater_signal_flags_the_account_that_pulls_back(served: tuple[ServedApp, dict[str, Any]]) -> None:
    server, ids = served
    data = httpx.get(f"{server.url}/api/raters/signal").json()
    by = {r["rater"]: r for r in data["raters"]}
    assert data["runs"] == 2 and by["alice"]["down"] == 0 and not by["alice"]["flagged"]
    assert by["mallory"] == {**by["mallory"], "items": 7, "down": 7, "quarantined": 7, "flagged": True}
    assert by["mallory"]["p_value"] == pytest.approx(1 / 128) and data["alpha"] == 0.01


def test_cli(served: tuple[ServedApp, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    server, ids = served
    common = ["--url", server.url, "--token", ADMIN]
    assert cli_main(["quarantine", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "rater:mallory" in out and "2 held" in out
    assert cli_main(["quarantine", "requeue", *common]) == 2  # no id: says what to send
    assert "needs an id" in capsys.readouterr().err
    assert cli_main(["quarantine", "drop", str(ids["q1"]), "--by", "cli", *common]) == 0
    assert "dropped" in capsys.readouterr().out
    assert cli_main(["quarantine", "drop", str(ids["q1"]), *common]) == 2
    assert "409" in capsys.readouterr().err
    assert cli_main(["raters", "signal", *common]) == 0
    assert "FLAGGED" in capsys.readouterr().out
