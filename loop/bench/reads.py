"""`loop bench reads`: what the web UI's polled reads cost on a large database, and what polling does to /health.

How: a fresh SQLite database in a temporary folder is migrated and filled by bulk inserts (not through HTTP) with
N ratings over N/5 responses (answers in prompt groups of two, as A/B candidates make them; a tenth of the
ratings superseded; held out as the scheduler's split marks them), N/10 comparisons, and the older 80 % of the
feedback consumed by training runs. loop's API is started as its own process (uvicorn,
`create_app(settings, manage=False)` plus a scheduler without a trainer, so `GET /api/scheduler` answers) and
timed over HTTP:
1. quiet: `GET /api/stats`, `/api/scheduler`, `/api/responses` (a page; and one rater's), `/health`, one after
   another;
2. fresh: `GET /api/stats` and `/api/scheduler` each right after a new rating (`POST /api/ratings`), so no
   cached figure can answer them;
3. polled under continuous writes: P pollers each ask for `/api/scheduler?stale_ok=true` every 3 s and
   `/api/stats?stale_ok=true` every 10 s, as the Training view's timers do (requests fire on time whether or not
   the previous one answered, like the browser's timers), `/health` is asked every 0.25 s, and a rater posts a
   rating every 0.5 s, so the figures' inputs change between nearly every two polls.

    loop bench reads                  # 100,000 ratings, 4 pollers for 30 s
    loop bench reads -n 20000 --pollers 8 --duration 10
Targets (2-core machine, 100k ratings): stats and scheduler p50 ≤ 50 ms, quiet and polled under writes (how old a polled answer was is reported beside it); /health p99 under polling ≤ 50 ms; no errors (a request the server failed or that timed out is counted, not hidden).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from loop.bench import started_api

RATERS = 40
HOLDOUT_FRACTION = 0.1  # the setting's default: the split the scheduler would mark
CONSUMED = 0.8  # share of the (older) feedback already trained on
SCHEDULER_PERIOD_S, STATS_PERIOD_S, HEALTH_PERIOD_S, WRITE_PERIOD_S = 3.0, 10.0, 0.25, 0.5
GRACE_S = 60.0  # after polling stops, how long the answers still owed may take before they count as errors


def bench_app():  # noqa: ANN201 - the uvicorn factory: settings from LOOP_* variables
    """The API without vLLM or a worker, plus a scheduler object (no trainer, no loop task) for its status."""
    from loop.api.app import create_app
    from loop.config import Settings

    app = create_app(Settings(), manage=False)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):  # noqa: ANN001, ANN202 - Starlette's lifespan signature
        async with inner(a) as value:
            from loop.scheduler import Scheduler

            a.state.loop.scheduler = Scheduler(a.state.loop)
            yield value

    app.router.lifespan_context = lifespan
    return app


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores a DateTime on SQLite (UTC wall time)


def seed(db_path: Path, n_ratings: int, *, seed_: int = 0) -> dict[str, int]:
    """Fill a migrated database with n_ratings ratings (and the rest, see the module docstring) by bulk inserts."""
    from loop.db.session import migrate
    from loop.scheduler.batches import is_held_out

    migrate(f"sqlite:///{db_path}")
    rng = random.Random(seed_)
    n_resp = max(2, n_ratings // 5)
    n_comp = max(1, n_ratings // 10)
    start = datetime.now(timezone.utc) - timedelta(days=60)
    span_s = 60 * 86400 - 3600

    def at(i: int, n: int) -> str:
        return _ts(start + timedelta(seconds=span_s * i / max(1, n)))

    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    resp_ids = [f"resp-{k:032x}" for k in range(n_resp)]
    rows = []
    for k, rid in enumerate(resp_ids):
        group = k // 2
        messages = [{"role": "user", "content": f"Question {group}: say something about topic {group % 997}."}]
        tokens = [rng.randrange(50000) for _ in range(64)]
        rows.append((rid, f"grp-{k:032x}", 0, at(k, n_resp), "chat", "bench", 0, 0,
                     json.dumps({"model": "bench", "messages": messages}), json.dumps(messages), None,
                     f"{group:064x}", f"Answer {k}: " + "words " * rng.randrange(10, 60),
                     json.dumps(list(range(32))), json.dumps(tokens),
                     json.dumps([round(-rng.random(), 4) for _ in tokens]),
                     "length" if k % 17 == 0 else "stop", 32, 64, 120.0, 15.0, 0, 0, None))
    conn.executemany("INSERT INTO responses (id, group_id, choice_index, created_at, endpoint, model, weight_version, "
                     "weight_version_last, request, messages, prompt_text, prompt_hash, completion, prompt_token_ids, "
                     "completion_token_ids, completion_logprobs, finish_reason, prompt_tokens, completion_tokens, "
                     "latency_ms, ttft_ms, stream, truncated, error) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    rows = []
    for i in range(n_ratings):
        k = rng.randrange(n_resp)
        thumb = rng.choice((1, 1, -1, None))
        score = rng.randrange(1, 11) if thumb is None or rng.random() < 0.4 else None
        rows.append((i + 1, resp_ids[k], f"rater-{i % RATERS}", thumb, score, None, '["bench"]', None,
                     0 if rng.random() < 0.1 else 1, int(is_held_out("rating", i + 1, HOLDOUT_FRACTION)),
                     at(i, n_ratings)))
    conn.executemany("INSERT INTO ratings (id, response_id, rater, thumb, score, comment, tags, idempotency_key, "
                     "is_current, held_out, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    rows = []
    for i in range(n_comp):
        group = rng.randrange(n_resp // 2)
        rows.append((i + 1, resp_ids[2 * group], resp_ids[2 * group + 1], rng.choice(("a", "b", "a", "b", "tie",
                                                                                          "both_bad")),
                     f"rater-{i % RATERS}", None, None, 1, int(is_held_out("comparison", i + 1, HOLDOUT_FRACTION)),
                     at(i, n_comp)))
    conn.executemany("INSERT INTO comparisons (id, response_a_id, response_b_id, winner, rater, comment, "
                     "idempotency_key, is_current, held_out, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    runs = 100
    conn.executemany("INSERT INTO training_runs (id, created_at, status, trigger, objective, batch, metrics, history, "
                     "version_before, version_after) VALUES (?, ?, 'succeeded', 'scheduler', 'dpo', '{}', '{}', "
                     "'[]', ?, ?)", [(r + 1, at(r, runs), r, r + 1) for r in range(runs)])
    consumed = []
    for kind, n in (("rating", n_ratings), ("comparison", n_comp)):
        cut = int(n * CONSUMED)
        consumed += [(1 + i * runs // max(1, cut), i + 1 if kind == "rating" else None,
                      i + 1 if kind == "comparison" else None) for i in range(cut)
                     if not is_held_out(kind, i + 1, HOLDOUT_FRACTION)]
    conn.executemany("INSERT INTO run_feedback (run_id, rating_id, comparison_id) VALUES (?, ?, ?)", consumed)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return {"responses": n_resp, "ratings": n_ratings, "comparisons": n_comp, "consumed": len(consumed)}


def started_reads_api(data_dir: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    return started_api("loop.bench.reads:bench_app", data_dir, "/api/runs?limit=1",
                       {"LOOP_HOLDOUT_FRACTION": str(HOLDOUT_FRACTION)})


def summary(xs: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p99 (nearest rank) and max of the given seconds."""
    if not xs:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    s = sorted(xs)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {"n": len(s), "p50": statistics.median(s) * 1000, "p99": p99 * 1000, "max": s[-1] * 1000}


ERRORS: dict[str, int] = {}  # "GET path -> status": count, for the report


AGES: dict[str, list[float]] = {}  # path: seconds between a stale_ok answer's as_of and its arrival


async def _timed(client: httpx.AsyncClient, path: str, out: list[float]) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.get(path)
        status = r.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    out.append(time.perf_counter() - t0)
    if status == 200 and "stale_ok" in path:
        body = r.json()
        as_of = body.get("as_of") or body.get("untrained_as_of")
        AGES.setdefault(path, []).append(time.time() - datetime.fromisoformat(as_of).timestamp())
    if status != 200 and not (path == "/health" and status == 503):  # /health says 503 without vLLM: still timed
        ERRORS[f"GET {path} -> {status}"] = ERRORS.get(f"GET {path} -> {status}", 0) + 1


async def _rate(client: httpx.AsyncClient, n_responses: int, i: int) -> None:
    r = await client.post("/api/ratings", json={"response_id": f"resp-{i % n_responses:032x}", "thumb": "up",
                                                "rater": "bench-reads"})
    if r.status_code != 201:
        raise RuntimeError(f"POST /api/ratings answered {r.status_code}: {r.text[:300]}")


@asynccontextmanager
async def pollers(client: httpx.AsyncClient, n: int, times: dict[str, list[float]]) -> AsyncIterator[None]:
    """n pollers firing on fixed periods (each request its own task, like setInterval + fetch)."""
    inflight: set[asyncio.Task[None]] = set()

    async def every(period: float, path: str, offset: float) -> None:
        await asyncio.sleep(offset)
        while True:
            task = asyncio.create_task(_timed(client, path, times[path]))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            await asyncio.sleep(period)

    loops = [asyncio.create_task(every(period, path, i * period / n))
             for i in range(n) for period, path in ((SCHEDULER_PERIOD_S, POLLED["scheduler"]),
                                                    (STATS_PERIOD_S, POLLED["stats"]))]
    try:
        yield
    finally:
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if inflight:  # let the slow answers land (they are measured), up to a point
            _, late = await asyncio.wait(set(inflight), timeout=GRACE_S)
            for task in late:
                task.cancel()
            if late:
                ERRORS[f"unanswered {GRACE_S:.0f} s after polling stopped"] = len(late)


POLLED = {"scheduler": "/api/scheduler?stale_ok=true", "stats": "/api/stats?stale_ok=true"}  # as the UI asks


async def measure(url: str, *, n_responses: int, repeats: int, n_pollers: int, duration: float
                  ) -> dict[str, dict[str, dict[str, float]]]:
    paths = {"stats": "/api/stats", "scheduler": "/api/scheduler", "responses": "/api/responses?limit=50",
             "responses_by_rater": "/api/responses?limit=50&rater=rater-3", "health": "/health"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for path in paths.values():  # warm: imports, first queries, the page cache
            await _timed(client, path, [])
        quiet: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                await _timed(client, path, quiet[name])
        fresh: dict[str, list[float]] = {"stats": [], "scheduler": []}  # the first read after a new rating
        for i in range(repeats):
            for name in fresh:
                await _rate(client, n_responses, 7 * i + len(fresh[name]))
                await _timed(client, paths[name], fresh[name])
        polled: dict[str, list[float]] = {POLLED["scheduler"]: [], POLLED["stats"]: [], "/health": []}

        async def writer() -> None:
            i = 0
            while True:
                await _rate(client, n_responses, 1_000 + i)
                i += 1
                await asyncio.sleep(WRITE_PERIOD_S)

        async with pollers(client, n_pollers, polled):
            writes = asyncio.create_task(writer())
            end = time.monotonic() + duration
            while time.monotonic() < end:
                await _timed(client, "/health", polled["/health"])
                await asyncio.sleep(HEALTH_PERIOD_S)
            writes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writes
    return {"quiet": {name: summary(xs) for name, xs in quiet.items()},
            "fresh": {name: summary(xs) for name, xs in fresh.items()},
            "polled": {"stats": summary(polled[POLLED["stats"]]), "scheduler": summary(polled[POLLED["scheduler"]]),
                       "health": summary(polled["/health"])},
            "ages": {name: summary(AGES.get(path, [])) for name, path in POLLED.items()}}


def run(n_ratings: int, *, repeats: int = 10, n_pollers: int = 4, duration: float = 30.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="loop-bench-reads-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        t0 = time.perf_counter()
        sizes = seed(data_dir / "loop.db", n_ratings)
        seed_s = time.perf_counter() - t0
        with started_reads_api(data_dir) as (url, _pid):
            ERRORS.clear()
            AGES.clear()
            figures = asyncio.run(measure(url, n_responses=sizes["responses"], repeats=repeats, n_pollers=n_pollers,
                                          duration=duration))
    return {"sizes": sizes, "seed_s": seed_s, "pollers": n_pollers, "duration": duration,
            "load": os.getloadavg()[0], "errors": dict(ERRORS), **figures}


def report(r: dict) -> str:
    s = r["sizes"]
    q, f, p = r["quiet"], r["fresh"], r["polled"]

    def line(name: str, f: dict[str, float]) -> str:
        return f"  {name:<28} p50 {f['p50']:8.1f} ms   p99 {f['p99']:8.1f} ms   max {f['max']:8.1f} ms   (n={f['n']})"

    ok = (q["stats"]["p50"] <= 50 and q["scheduler"]["p50"] <= 50 and p["stats"]["p50"] <= 50
          and p["scheduler"]["p50"] <= 50 and p["health"]["p99"] <= 50 and not r["errors"])
    ages = r["ages"]

    def age(name: str) -> str:
        a = ages[name]
        return f"  {'':<28} its figures were p50 {a['p50'] / 1000:.1f} s, max {a['max'] / 1000:.1f} s old"
    return "\n".join([
        f"reads: SQLite WAL, {s['ratings']:,} ratings, {s['comparisons']:,} comparisons, {s['responses']:,} responses, "
        f"{s['consumed']:,} feedback rows consumed (filled in {r['seed_s']:.1f} s)",
        "quiet (one request at a time):",
        line("GET /api/stats", q["stats"]),
        line("GET /api/scheduler", q["scheduler"]),
        line("GET /api/responses (page)", q["responses"]),
        line("GET /api/responses?rater=", q["responses_by_rater"]),
        line("GET /health", q["health"]),
        "the first read after a new rating (nothing cached can answer it):",
        line("GET /api/stats", f["stats"]),
        line("GET /api/scheduler", f["scheduler"]),
        f"polled with stale_ok ({r['pollers']} pollers: scheduler every {SCHEDULER_PERIOD_S:.0f} s, stats every "
        f"{STATS_PERIOD_S:.0f} s, for {r['duration']:.0f} s; a new rating every {WRITE_PERIOD_S} s):",
        line("GET /api/stats", p["stats"]),
        age("stats"),
        line("GET /api/scheduler", p["scheduler"]),
        age("scheduler"),
        line("GET /health", p["health"]),
        *([f"  errors: {r['errors']}"] if r["errors"] else []),
        f"  load average {r['load']:.1f} on {os.cpu_count()} cores"
        + (" — the machine is busy, figures are pessimistic" if r["load"] > (os.cpu_count() or 1) else ""),
        "  targets: stats and scheduler p50 ≤ 50 ms (quiet, and polled under writes), /health p99 under "
        "polling ≤ 50 ms, no errors: "
        + ("met" if ok else "NOT met"),
    ])


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("reads", help="polled reads (stats, scheduler, responses, health) on a large SQLite database",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ratings", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=10, help="quiet requests per route")
    p.add_argument("--pollers", type=int, default=4, help="simulated Training views")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of polling")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.ratings < 10 or args.repeats < 1 or args.pollers < 0 or args.duration <= 0:
        print("loop: -n must be at least 10, --repeats at least 1, --pollers at least 0, --duration above 0",
              file=sys.stderr)
        return 2
    print(report(run(args.ratings, repeats=args.repeats, n_pollers=args.pollers, duration=args.duration)))
    return 0
