"""`loop bench reads` end to end at a small size: it fills a database, starts the API and times every polled read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from loop.bench.reads import report, run, seed
from loop.cli import main


def test_seed_fills_the_database_as_described(tmp_path: Path) -> None:
    sizes = seed(tmp_path / "loop.db", 1000)
    db = sqlite3.connect(tmp_path / "loop.db")
    try:
        count = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
                 for t in ("responses", "ratings", "comparisons", "run_feedback")}
        held = db.execute("SELECT count(*) FROM ratings WHERE held_out").fetchone()[0]
        groups = db.execute("SELECT count(DISTINCT prompt_hash) FROM responses").fetchone()[0]
    finally:
        db.close()
    assert count == {"responses": 200, "ratings": 1000, "comparisons": 100, "run_feedback": sizes["consumed"]}
    assert sizes == {"responses": 200, "ratings": 1000, "comparisons": 100, "consumed": sizes["consumed"]}
    assert 0.6 * 1100 < sizes["consumed"] < 0.8 * 1100 and 50 < held < 150 and groups == 100


def test_small_run_times_every_read_without_errors() -> None:
    r = run(500, repeats=2, n_pollers=1, duration=1.0)
    assert r["errors"] == {}
    for name in ("stats", "scheduler", "responses", "responses_by_rater", "health"):
        assert r["quiet"][name]["n"] == 2 and 0 < r["quiet"][name]["p50"] <= r["quiet"][name]["max"]
    assert r["fresh"]["stats"]["n"] == 2 and r["polled"]["health"]["n"] >= 1
    text = report(r)
    assert "500 ratings" in text and "GET /api/scheduler" in text and "after a new rating" in text
    assert "targets" in text


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "reads", "-n", "5"]) == 2
    assert "at least 10" in capsys.readouterr().err
